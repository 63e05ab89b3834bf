"""An analytic teacher for DMD2 tests: a Gaussian mixture whose exact denoiser E[x0 | x0 + σε] is known.

For x0 ~ Σ_k π_k N(μ_k, s_k² I) and x_t = x0 + σε, the posterior mean is
    E[x0 | x_t] = Σ_k r_k(x_t) (μ_k + s_k²/(s_k² + σ²) (x_t − μ_k)),   r_k ∝ π_k N(x_t; μ_k, (s_k² + σ²) I).
Under a variance-preserving schedule, x_t = √ᾱ·x0 + √(1−ᾱ)·ε is the same thing seen through x_t/√ᾱ = x0 + σε
with σ = √((1−ᾱ)/ᾱ), so the exact ε-predictor is ε̂ = (x_t − √ᾱ·E[x0 | x_t/√ᾱ]) / √(1−ᾱ).

Both families get the same test networks: the analytic teacher, and a trainable "residual" network that *is* the
teacher at initialisation (a zero-initialised MLP on top), as DMD2 initialises its generator and critic from the
teacher. In σ-space the residual enters as c_out(σ)·MLP; the ε-space network adds the residual to ε̂ scaled so
that its x0 changes by the same c_out(σ)·MLP, so the two families learn the same function and differ only in
what the family code does: noising, the x0 conversion, and the critic's own loss (EDM-weighted x0 regression
versus unweighted ε-MSE).
"""

from __future__ import annotations

import torch
from torch import nn

from dmd2.families.diffusers import DiffusersFamily
from dmd2.families.edm import EDMFamily
from dmd2.families.flow import FlowFamily


class GaussianMixture:
    def __init__(self, weights, means, stds):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.stds[k, None] * torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return x.float(), k

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x_t.double()[:, None, :]                              # N×1×D
        var = self.stds[None] ** 2 + sigma.double()[:, None] ** 2  # N×K
        d = x.shape[-1]
        log_r = (self.weights.log()[None] - 0.5 * ((x - self.means[None]) ** 2).sum(-1) / var - 0.5 * d * var.log())
        r = log_r.softmax(dim=1)                                    # N×K
        shrink = (self.stds[None] ** 2 / var)[..., None]            # N×K×1
        per_component = self.means[None] + shrink * (x - self.means[None])
        return (r[..., None] * per_component).sum(1).float()

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).argmin(dim=1)


# --------------------------------------------------------------------------------------------- σ-space (EDM)


class AnalyticTeacher(nn.Module):
    """The exact denoiser, behind the same call signature as `edm_networks.Preconditioned`."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, cond=None, features_only=False):
        return self.mixture.denoise(x, sigma.reshape(-1).expand(x.shape[0]))


class ResidualDenoiser(nn.Module):
    """Analytic teacher + c_out(σ)·MLP, the MLP's last layer zero-initialised.

    At initialisation it *is* the teacher, as DMD2 initialises its critic and generator; training moves it
    away. The MLP's hidden layer (`mid_block`) is what the GAN head reads.
    """

    def __init__(self, mixture: GaussianMixture, width: int = 128, sigma_data: float = 1.0):
        super().__init__()
        self.teacher, self.sigma_data = AnalyticTeacher(mixture), sigma_data
        dim = mixture.means.shape[1]
        self.inner = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width))
        self.mid_block = nn.SiLU()  # its output is the features the GAN head reads (a hook point, as in a UNet)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def residual(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_out(σ)·MLP(c_in·x, ln σ / 4), the MLP's hidden features) for x = x0 + σε."""
        sigma = sigma.reshape(-1, 1).expand(x.shape[0], 1).float()
        sd = self.sigma_data
        c_in, c_out = 1 / (sigma**2 + sd**2).sqrt(), sigma * sd / (sigma**2 + sd**2).sqrt()
        h = self.mid_block(self.inner(torch.cat([c_in * x, sigma.log() / 4], dim=1)))
        return c_out * self.out(h), h

    def forward(self, x, sigma, cond=None, features_only=False):
        correction, h = self.residual(x, sigma)
        return h if features_only else self.teacher(x, sigma) + correction


class MixtureEDM(EDMFamily):
    """The EDM family on 2-D points (the Karras table of the pipeline, σ_data = 1)."""

    def __init__(self):
        super().__init__({"family": "edm", "sigma_data": 1.0, "label_dim": 0, "in_channels": 2, "resolution": 1,
                          "sampler": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "num_steps": 18}})

    @property
    def sample_shape(self):
        return (2,)


# ------------------------------------------------------------------------------------------ ε-space (diffusers)


class MixtureDiffusers(DiffusersFamily):
    """The diffusers family on 2-D points, with Stable Diffusion's scaled-linear DDPM schedule (ᾱ_999 ≈ 0.0047)."""

    def __init__(self, prediction_type: str = "epsilon"):
        super().__init__({"family": "diffusers", "unet_class": "UNet2DModel", "num_classes": 0, "unet": {},
                          "scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
                                        "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                                        "prediction_type": prediction_type}})

    @property
    def sample_shape(self):
        return (2,)

    def edm_view(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t/√ᾱ, σ, √ᾱ, √(1−ᾱ)): the σ-space point a VP sample at t corresponds to."""
        abar = self.alphas_cumprod[t.long()].reshape(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        return (x_t.double() / a).float(), (s / a).flatten().float(), a, s


class AnalyticEpsilon(nn.Module):
    """The mixture's exact ε-predictor (or v-predictor) under `family`'s VP schedule, called like a UNet."""

    def __init__(self, mixture: GaussianMixture, family: MixtureDiffusers):
        super().__init__()
        self.mixture, self.family = mixture, family

    def output(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """What the network outputs for an x0 estimate at (x_t, t): ε̂, or v̂ = √ᾱ·ε̂ − √(1−ᾱ)·x0."""
        _, _, a, s = self.family.edm_view(x_t, t)
        eps = (x_t.double() - a * x0.double()) / s
        return (eps if self.family.prediction_type == "epsilon" else a * eps - s * x0.double()).float()

    def forward(self, x_t, t, class_labels=None):
        x, sigma, _, _ = self.family.edm_view(x_t, t)
        return self.output(x_t, t, self.mixture.denoise(x, sigma))


class ResidualEpsilon(nn.Module):
    """The exact ε-predictor, corrected so that its x0 moves by c_out(σ)·MLP: at initialisation it is the teacher;
    `mid_block` (the MLP's hidden features) is what the GAN head hooks, as on a UNet's mid block."""

    def __init__(self, mixture: GaussianMixture, family: MixtureDiffusers, width: int = 128):
        super().__init__()
        self.teacher, self.family = AnalyticEpsilon(mixture, family), family
        self.edm = ResidualDenoiser(mixture, width)
        self.mid_block = self.edm.mid_block

    def forward(self, x_t, t, class_labels=None):
        x, sigma, _, _ = self.family.edm_view(x_t, t)
        correction, _ = self.edm.residual(x, sigma)
        return self.teacher.output(x_t, t, self.edm.teacher(x, sigma) + correction)


class DirectEpsilon(nn.Module):
    """The exact ε-predictor plus a trainable MLP(x_t, t) added to ε̂ itself, as an ε-UNet's own output errors are:
    its x0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ then moves by √(1−ᾱ)/√ᾱ times the MLP, ×14.6 at t = 999 on SD's schedule, where
    `ResidualEpsilon` is preconditioned not to. The MLP's last layer starts at zero, so it starts as the teacher."""

    def __init__(self, mixture: GaussianMixture, family: MixtureDiffusers, width: int = 128):
        super().__init__()
        self.teacher = AnalyticEpsilon(mixture, family)
        dim = mixture.means.shape[1]
        self.inner = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width))
        self.mid_block = nn.SiLU()
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, t, class_labels=None):
        h = self.mid_block(self.inner(torch.cat([x_t, t.float().reshape(-1, 1) / 1000], dim=1)))
        return self.teacher(x_t, t) + self.out(h)



# ------------------------------------------------------------------------------------------ rectified flow


class MixtureFlow(FlowFamily):
    """The flow family on 2-D points, with SD3's static time shift (3.0) over a 1000-point table."""

    def __init__(self, shift: float = 3.0):
        super().__init__({"family": "flow", "unet_class": "UNet2DModel", "num_classes": 0, "unet": {},
                          "schedule": {"num_train_timesteps": 1000, "shift": shift}})

    @property
    def sample_shape(self):
        return (2,)


def analytic_x0(mixture: GaussianMixture, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] on the straight path: x_t/(1 − t) = x0 + σε with σ = t/(1 − t) (t = 1: the mixture's mean)."""
    keep = (1 - time.double()).clamp(min=1e-9).reshape(-1, 1)
    return mixture.denoise((x_t.double() / keep).float(), (time.double().reshape(-1, 1) / keep).flatten().float())


class AnalyticVelocity(nn.Module):
    """The mixture's exact velocity field v = (x_t − E[x0 | x_t]) / t, called like a UNet (timestep = 1000·t)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x_t, timestep, class_labels=None):
        time = timestep.double() / 1000
        x0 = analytic_x0(self.mixture, x_t, time)
        return ((x_t.double() - x0.double()) / time.reshape(-1, 1)).float()


class DirectVelocity(nn.Module):
    """The exact velocity plus a trainable MLP(x_t, t) added to v̂ itself, as a flow network's own output errors are:
    its x0 = x_t − t·v̂ moves by t times the MLP (at most once, at t = 1; ε's x0 carried it ×14.6). The MLP's last
    layer starts at zero, so it starts as the teacher; `mid_block` is what a GAN head would hook."""

    def __init__(self, mixture: GaussianMixture, width: int = 128):
        super().__init__()
        self.teacher = AnalyticVelocity(mixture)
        dim = mixture.means.shape[1]
        self.inner = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width))
        self.mid_block = nn.SiLU()
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, timestep, class_labels=None):
        h = self.mid_block(self.inner(torch.cat([x_t, timestep.float().reshape(-1, 1) / 1000], dim=1)))
        return self.teacher(x_t, timestep) + self.out(h)
