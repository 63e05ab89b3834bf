"""The EDM family: σ-space denoisers D(x; σ) with EDM preconditioning (Karras et al. 2022), class labels as
one-hot vectors, pixel samples, and EDM's deterministic Heun sampler.

Serves the teachers trained here (`teacher.family: edm`); EDM's released CIFAR-10 and ImageNet-64 networks are
the same parameterisation. DMD2 indexes noise levels through an ascending Karras table of
`num_train_timesteps` entries (t = 999 ↔ σ_max = 80, t = 20 … 980 ↔ σ ≈ 0.0032 … 72), as the original does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmd2.config import EDMTeacherConfig, UNetConfig, to_dict
from dmd2.families.base import Family
from dmd2.families.edm_unet import EDMPrecond, UNet

# ----------------------------------------------------------------------------------------- EDM formulas


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


@torch.no_grad()
def heun_sample(denoise, noise: torch.Tensor, num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic Heun, 2n−1 evaluations of `denoise(x, σ)`); one step is a single call
    at σ_max."""
    sigmas = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    x = noise.double() * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x.float(), s.float().expand(x.shape[0])).double()) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoise(x_next.float(), s_next.float().expand(x.shape[0])).double()) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x.float()


def heun_nfe(num_steps: int) -> int:
    return 2 * num_steps - 1


def one_hot(labels: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """Integer labels → one-hot; label −1 means 'no label' (all zeros: the unconditional branch of CFG)."""
    if labels is None or num_classes == 0:
        return None
    out = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    keep = labels >= 0
    out[keep] = F.one_hot(labels[keep].long(), num_classes).float()
    return out


# ----------------------------------------------------------------------------------------- the family


class EDMFamily(Family):
    name, sampler_name = "edm", "Heun"

    @staticmethod
    def teacher_config(cfg: EDMTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        return teacher_config(cfg, sample_shape, num_classes)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        s = config["sampler"]
        self.sigma_data = float(config["sigma_data"])
        self.sigmas = karras_sigmas(self.num_train_timesteps, s["sigma_min"], s["sigma_max"], s["rho"]).flip(0).float()

    def build_network(self) -> nn.Module:
        c = self.config
        return EDMPrecond(UNet(UNetConfig(**c["unet"]), c["in_channels"], c["resolution"], c["label_dim"]), c["sigma_data"])

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        net.enable_gradient_checkpointing()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config["in_channels"], self.config["resolution"], self.config["resolution"])

    @property
    def num_classes(self) -> int:
        return int(self.config["label_dim"])

    def encode_conditions(self, raw, device):
        return one_hot(raw.to(device), self.num_classes) if raw is not None else None

    def unconditional(self, cond):
        return torch.zeros_like(cond)  # the all-zero one-hot: the branch label dropout trained

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t.long()]

    def add_noise(self, x0, noise, t):
        return x0 + self.sigma(t).reshape(-1, *[1] * (x0.ndim - 1)) * noise

    def generator_input(self, noise, t):
        return self.add_noise(torch.zeros_like(noise), noise, t)

    def denoise(self, net, x_t, t, cond):
        return net(x_t, self.sigma(t), cond)

    def fake_score_loss(self, net, x0, t, cond, noise):
        sigma = self.sigma(t).reshape(-1, *[1] * (x0.ndim - 1))
        pred = net(x0 + sigma * noise, sigma.flatten(), cond)
        return (edm_loss_weight(sigma, self.sigma_data) * (pred.float() - x0.float()) ** 2).mean()

    def gan_features(self, net, x_t, t, cond):
        return net(x_t, self.sigma(t), cond, features_only=True)

    @property
    def gan_feature_shape(self) -> tuple[int, int, int]:
        unet = self.config["unet"]
        spatial = self.config["resolution"] // 2 ** (len(unet["channel_mult"]) - 1)
        return (unet["channels"] * unet["channel_mult"][-1], spatial, spatial)

    def teacher_loss(self, net, x0, cond):
        """EDM-weighted x0 regression at log-normal σ: mean λ(σ)·(D(x0 + σε; σ) − x0)²."""
        training = self.config["training"]
        sigma = sample_training_sigma(len(x0), training["p_mean"], training["p_std"]).reshape(-1, *[1] * (x0.ndim - 1))
        pred = net(x0 + sigma * torch.randn_like(x0), sigma.flatten(), cond)
        return (edm_loss_weight(sigma, self.sigma_data) * (pred - x0) ** 2).mean()

    def sample_teacher(self, net, noise, cond, num_steps, guidance_scale=1.0):
        s = self.config["sampler"]

        def denoise(x, sigma):
            return self.guided(lambda c: net(x, sigma, c), cond, guidance_scale)

        return heun_sample(denoise, noise, num_steps, s["sigma_min"], s["sigma_max"], s["rho"])

    def teacher_nfe(self, num_steps: int) -> int:
        return heun_nfe(num_steps)


def teacher_config(cfg: EDMTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The config.json of an EDM teacher trained here on samples of `sample_shape`."""
    channels, resolution = sample_shape[0], sample_shape[-1]
    return {"family": "edm", "kind": "teacher", "in_channels": channels, "resolution": resolution,
            "label_dim": num_classes, "sigma_data": cfg.sigma_data, "unet": to_dict(cfg.unet),
            "sampler": to_dict(cfg.sampler), "training": {"p_mean": cfg.p_mean, "p_std": cfg.p_std}}
