"""EDM formulas: the Karras noise table, log-normal training sigmas, the teacher loss and the Heun sampler."""

from __future__ import annotations

import torch
from torch import nn


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """n noise levels spaced as in EDM eq. 5, in **descending** order (sigma_max first)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return inv**rho


def sample_training_sigma(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ln σ ~ N(P_mean, P_std²), EDM's training distribution."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²: makes the x0 regression loss unit-variance at every σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(denoiser: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, labels, noise: torch.Tensor) -> torch.Tensor:
    """EDM-weighted x0 regression: mean λ(σ)·(D(x0 + σε; σ) − x0)²."""
    s = sigma.reshape(-1, 1, 1, 1)
    pred = denoiser(x0 + s * noise, sigma, labels)
    return (edm_loss_weight(s, denoiser.sigma_data) * (pred - x0) ** 2).mean()


def guided(denoiser: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels, guidance_scale: float, null_labels):
    """Classifier-free guidance in x0 space: D_u + s·(D_c − D_u). Scale 1 is the plain conditional denoiser."""
    cond = denoiser(x, sigma, labels)
    if guidance_scale == 1.0 or labels is None:
        return cond
    uncond = denoiser(x, sigma, null_labels)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def heun_sample(
    denoiser: nn.Module,
    noise: torch.Tensor,
    labels,
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic Heun, 2n−1 evaluations); one step is a single denoiser call at σ_max."""
    sigmas = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    x = noise.double() * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x.float(), s.float().expand(x.shape[0]), labels).double()) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next.float(), s_next.float().expand(x.shape[0]), labels).double()) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x.float()


def heun_nfe(num_steps: int) -> int:
    return 2 * num_steps - 1


class EMA:
    """Exponential moving average of a module's parameters (the teacher's sampling weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up so early EMA is not stuck at random init
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - decay)
            else:
                self.shadow[k].copy_(v)
