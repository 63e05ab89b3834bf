"""DMD2's losses, written once against the family interface (Yin et al. 2024, §4; method notes §2.2–2.5)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmd2.families import Family


def dm_step_range(num_train_timesteps: int, min_percent: float, max_percent: float) -> tuple[int, int]:
    """The DM loss's timestep range: int(0.02·1000)=20 … int(0.98·1000)=980 by default."""
    return int(min_percent * num_train_timesteps), int(max_percent * num_train_timesteps)


def distribution_matching_loss(
    family: Family,
    real_net: nn.Module,
    fake_net: nn.Module,
    x: torch.Tensor,
    cond: Any,
    t: torch.Tensor,
    noise: torch.Tensor,
    real_guidance_scale: float = 1.0,
    fake_in_fp32: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DMD's KL gradient through a stop-gradient surrogate.

    grad = (x̂_fake − x̂_real) / w with w = mean|x − x̂_real| per sample, and L = ½·mean((x − sg(x − grad))²),
    so ∂L/∂x = grad / N: the generator moves its samples towards the teacher's denoised estimate and away from
    the critic's. The value of L is a monitor, not an objective. `fake_in_fp32` runs the critic's prediction with
    autocast off, as the original's text-to-image path does, whatever precision the caller autocasts to.
    """
    with torch.no_grad():
        x_t = family.add_noise(x.detach(), noise, t)
        pred_real = family.predict_x0(real_net, x_t, t, cond, real_guidance_scale).double()
        with torch.autocast(x.device.type, enabled=False) if fake_in_fp32 else contextlib.nullcontext():
            pred_fake = family.predict_x0(fake_net, x_t.float(), t, cond).double()
        p_real = x.detach().double() - pred_real
        p_fake = x.detach().double() - pred_fake
        w = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        # A sample with w = 0 (x̂_real == x exactly) has no usable direction: it contributes nothing, rather
        # than the float-max values that `nan_to_num`'s defaults would feed into the loss.
        grad = torch.nan_to_num((p_real - p_fake) / w, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
    return loss, {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item(), "dm_weight": w.mean().item()}


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(−ℓ(G(z)))."""
    return F.softplus(-logits_fake).mean()


def gan_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: mean softplus(ℓ(fake)) + mean softplus(−ℓ(real))."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
