"""The denoiser adapter: the one seam between DMD2's algorithm and a teacher family.

DMD2's losses only need to (1) noise a clean sample at a discrete timestep t, (2) ask a network for its x0
prediction at t (with optional classifier-free guidance), (3) build the generator's pure-noise input at t,
(4) compute the fake critic's own denoising loss, and (5) encode conditions. Everything else in
`dmd2.dmd2` is written against this interface. `EDMAdapter` serves σ-space EDM denoisers (the pipeline's own
teachers, EDM's CIFAR-10/ImageNet checkpoints); an ε-prediction adapter for SD/SDXL implements the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from dmd2.edm import edm_loss_weight, karras_sigmas
from dmd2.networks import one_hot


class DenoiserAdapter(Protocol):
    num_train_timesteps: int

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def predict_x0(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                   guidance_scale: float = 1.0, return_bottleneck: bool = False): ...

    def generator_input(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def fake_score_loss(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, cond: Any,
                        noise: torch.Tensor) -> torch.Tensor: ...

    def encode_conditions(self, labels: torch.Tensor | None) -> Any: ...


class EDMAdapter:
    """σ-space denoisers D(x; σ). Timestep t indexes an ascending 1000-entry Karras table (t=999 ↔ σ_max=80)."""

    def __init__(self, sigma_data: float = 0.5, label_dim: int = 0, num_train_timesteps: int = 1000,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_data, self.label_dim, self.num_train_timesteps = sigma_data, label_dim, num_train_timesteps
        self.sigmas = karras_sigmas(num_train_timesteps, sigma_min, sigma_max, rho).flip(0).float()

    @classmethod
    def from_model_config(cls, config: dict[str, Any], num_train_timesteps: int = 1000) -> EDMAdapter:
        s = config["sampler"]
        return cls(config["sigma_data"], config["label_dim"], num_train_timesteps, s["sigma_min"], s["sigma_max"], s["rho"])

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t.long()]

    def add_noise(self, x0, noise, t):
        return x0 + self.sigma(t).reshape(-1, *[1] * (x0.ndim - 1)) * noise

    def predict_x0(self, net, x_t, t, cond, guidance_scale=1.0, return_bottleneck=False):
        sigma = self.sigma(t)
        if guidance_scale == 1.0 or cond is None:
            return net(x_t, sigma, cond, return_bottleneck=return_bottleneck) if return_bottleneck else net(x_t, sigma, cond)
        assert not return_bottleneck, "guidance is only used for the frozen teacher"
        x0_cond = net(x_t, sigma, cond)
        x0_uncond = net(x_t, sigma, torch.zeros_like(cond))  # all-zero one-hot = the label-dropout branch
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond)

    def generator_input(self, noise, t):
        return self.add_noise(torch.zeros_like(noise), noise, t)

    def fake_score_loss(self, net, x0, t, cond, noise):
        sigma = self.sigma(t).reshape(-1, *[1] * (x0.ndim - 1))
        pred = net(x0 + sigma * noise, sigma.flatten(), cond)
        return (edm_loss_weight(sigma, self.sigma_data) * (pred.float() - x0.float()) ** 2).mean()

    def encode_conditions(self, labels):
        return one_hot(labels, self.label_dim)
