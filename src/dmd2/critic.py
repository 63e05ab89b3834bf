"""The trainable side of DMD2: the fake-score critic and, optionally, the diffusion-GAN head on its features.

The original calls this pair "guidance" (beside `real_guidance_scale`, which is classifier-free guidance of the
teacher); here it is the critic. It is one module with one forward per critic turn, so DDP and FSDP see a single
forward before each backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dmd2.families import Family
from dmd2.losses import gan_critic_loss
from dmd2.training import take_rows


def _norm(channels: int) -> nn.GroupNorm:
    """The original head's GroupNorm(32) for its 768 and 1280 channels; fewer groups where 32 would leave fewer than
    4 channels in a group: on the head's 1×1 map a one-channel group normalises every value to zero, and a
    two-channel one to ±1 by the sign of a difference that rounding can flip."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


class GANHead(nn.Module):
    """Classifier on the critic's features: [conv4x4/2 → GN → SiLU] down to 4x4, then conv4x4/4 → GN → SiLU → 1x1.

    Feature maps smaller than 4x4 skip the halving blocks and use a global-average head, so the same class
    serves 8x8 (ImageNet-64, SD1.5), 32x32 (SDXL) and the tiny maps of the embedded experiments.
    """

    def __init__(self, channels: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        while spatial > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            spatial //= 2
        if spatial == 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=4), _norm(channels), nn.SiLU()]
        else:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.SiLU()]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (N, 1, 1, 1) → (N,) as a new tensor, not a view: FSDP2 warns about module outputs that are views
        return self.layers(features.float()).flatten().clone()


class TokenGANHead(nn.Module):
    """Classifier on token features (N × L × D: a transformer block's image tokens): per token LayerNorm → linear →
    SiLU, the mean over tokens, then a linear map to one logit."""

    def __init__(self, dim: int):
        super().__init__()
        self.tokens = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU())
        self.out = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.tokens(features.float()).mean(dim=1)).flatten().clone()


def gan_head(feature_shape: tuple[int, ...]) -> nn.Module:
    """The head for one sample's critic features: maps (C, H, W) → `GANHead`, tokens (L, D) → `TokenGANHead`."""
    if len(feature_shape) == 2:
        return TokenGANHead(feature_shape[1])
    channels, height, _ = feature_shape
    return GANHead(channels, height)


class Critic(nn.Module):
    """The fake-score network (initialised from the teacher) plus the GAN head that reads its features."""

    def __init__(self, family: Family, score: nn.Module, head: nn.Module | None, gan_max_timestep: int, draw,
                 times: str = "uniform", logit: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.family, self.score, self.head = family, score, head
        self.gan_max_timestep, self.draw = gan_max_timestep, draw
        self.times, self.logit = times, tuple(logit)  # the denoising loss's time distribution (distill.critic_times)

    def forward(self, fake: torch.Tensor, cond: Any, real: torch.Tensor | None = None,
                real_cond: Any = None, steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The critic turn's losses on detached generator samples (and, with the GAN, a real batch). `steps`, each
        row's student step, is for `StepCritics`; one critic takes every step's rows alike."""
        t = self.family.critic_timesteps(fake.shape[0], self.draw, fake.device, self.times, self.logit)
        out = {"loss_fake": self.family.fake_score_loss(self.score, fake, t, cond, self.draw.randn_like(fake))}
        if self.head is not None and real is not None:
            logits_real = self.logits(real, real_cond)
            logits_fake = self.logits(fake, cond)
            out["loss_gan_critic"] = gan_critic_loss(logits_real, logits_fake)
            out["logit_real"], out["logit_fake"] = logits_real.detach().mean(), logits_fake.detach().mean()
        return out

    @property
    def has_gan(self) -> bool:
        return self.head is not None

    def by_step(self, steps: torch.Tensor | None, n: int) -> list[tuple[Critic, slice, float]]:
        """Which critic judges which of n rows, and their share of them: this one, all of them."""
        return [(self, slice(None), 1.0)]

    def logits(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        """Diffusion-GAN: noise at the family's GAN timesteps (by default t ~ U{0 … gan_max_timestep − 1}), classify
        the critic's features there."""
        t = self.family.gan_timesteps(x.shape[0], self.draw, x.device, self.gan_max_timestep)
        x_t = self.family.add_noise(x, self.draw.randn_like(x), t)
        return self.head(self.family.gan_features(self.score, x_t, t, cond))


class StepCritics(nn.Module):
    """One critic per student step (`distill.critic_per_step`): the rows step j made train, and are scored by,
    critic j alone, so that each step's outputs are matched to the data. A single critic learns the mixture of
    the steps' outputs, which can match the data while no step's outputs do."""

    def __init__(self, critics: list[Critic]):
        super().__init__()
        self.critics = nn.ModuleList(critics)

    @property
    def has_gan(self) -> bool:
        return self.critics[0].head is not None

    def by_step(self, steps: torch.Tensor, n: int) -> list[tuple[Critic, torch.Tensor, float]]:
        """Each critic with the indices of its step's rows among the n, where it has any, and their share."""
        pieces = [(critic, (steps == j).nonzero().flatten()) for j, critic in enumerate(self.critics)]
        return [(critic, rows, len(rows) / n) for critic, rows in pieces if len(rows)]

    def forward(self, fake: torch.Tensor, cond: Any, real: torch.Tensor | None, real_cond: Any,
                steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each critic's losses on its step's rows (and as many rows of the real batch), weighted by their share of
        the batch: their sum is the batch mean, as for one critic. The critics' gradients are clipped, and logged,
        as one norm."""
        n, totals = len(fake), {}
        for critic, rows, share in self.by_step(steps, n):
            out = critic(fake[rows], take_rows(cond, n, rows), take_rows(real, n, rows), take_rows(real_cond, n, rows))
            for key, value in out.items():
                totals[key] = totals.get(key, 0) + share * value
        return totals
