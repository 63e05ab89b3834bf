"""An analytic teacher for DMD2 tests: a Gaussian mixture whose exact denoiser E[x0 | x0 + σε] is known.

For x0 ~ Σ_k π_k N(μ_k, s_k² I) and x_t = x0 + σε, the posterior mean is
    E[x0 | x_t] = Σ_k r_k(x_t) (μ_k + s_k²/(s_k² + σ²) (x_t − μ_k)),   r_k ∝ π_k N(x_t; μ_k, (s_k² + σ²) I).
"""

from __future__ import annotations

import torch
from torch import nn


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


class AnalyticTeacher(nn.Module):
    """The exact denoiser, behind the same call signature as `EDMPrecond`."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, cond=None, return_bottleneck=False):
        return self.mixture.denoise(x, sigma.reshape(-1).expand(x.shape[0]))


class ResidualDenoiser(nn.Module):
    """Analytic teacher + c_out(σ)·MLP, the MLP's last layer zero-initialised.

    At initialisation it *is* the teacher, as DMD2 initialises its critic and generator; training moves it
    away. The MLP's hidden layer is the bottleneck the GAN head reads.
    """

    def __init__(self, mixture: GaussianMixture, width: int = 128, sigma_data: float = 1.0):
        super().__init__()
        self.teacher, self.sigma_data = AnalyticTeacher(mixture), sigma_data
        dim = mixture.means.shape[1]
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.bottleneck_channels = width

    def forward(self, x, sigma, cond=None, return_bottleneck=False):
        sigma = sigma.reshape(-1, 1).expand(x.shape[0], 1).float()
        sd = self.sigma_data
        c_in, c_out = 1 / (sigma**2 + sd**2).sqrt(), sigma * sd / (sigma**2 + sd**2).sqrt()
        h = self.body(torch.cat([c_in * x, sigma.log() / 4], dim=1))
        out = self.teacher(x, sigma) + c_out * self.out(h)
        return (out, h) if return_bottleneck else out
