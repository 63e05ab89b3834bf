"""The EDM family: σ-space denoisers D(x; σ) with EDM preconditioning (Karras et al. 2022; VP and VE too), class
labels as one-hot vectors, pixel samples, and EDM's deterministic Heun sampler.

Serves the teachers trained here (`teacher.family: edm`: our small UNet, or EDM's ADM / DDPM++ / NCSN++) and EDM's
released CIFAR-10 and ImageNet-64 checkpoints, converted by `edm_pickle` into the same format. DMD2 indexes noise levels through an ascending Karras table of
`num_train_timesteps` entries (t = 999 ↔ σ_max = 80, t = 20 … 980 ↔ σ ≈ 0.0032 … 72), as the original does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dmd2.config import Strict, TeacherTraining, to_dict
from dmd2.families.base import ARCHITECTURES, Family, ModelError
from dmd2.families.edm_networks import Preconditioned, build_edm_network, check_network_arguments
from dmd2.families.edm_unet import UNet, UNetConfig
from dmd2.paths import input_path

# ------------------------------------------------------------------------------ params.yaml's teacher block


class SamplerConfig(Strict):
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    num_steps: int = Field(18, ge=1, description="Heun steps of the teacher's full sampler (NFE = 2n-1)")


class EDMTeacherConfig(TeacherTraining):
    """`family: edm`: a σ-space denoiser with EDM (or VP/VE) preconditioning — the small UNet of this project or
    one of EDM's networks (ADM, DDPM++, NCSN++) — trained here, or converted from one of EDM's `.pkl` checkpoints."""

    family: Literal["edm"] = "edm"
    source: Literal["train", "edm_pickle"] = Field("train", description="train: train it here; edm_pickle: convert "
                                                   "EDM's released checkpoint `pickle` (its code is never run)")
    pickle: str | None = Field(None, description="source: edm_pickle: a local EDM .pkl, or an http(s) URL fetched "
                               "once into ~/.cache/dmd2/edm when online")
    pickle_sha256: str | None = Field(None, description="optional pin of the .pkl's sha256: a different file at the "
                                      "same path is refused (and changing the pin reruns the teacher stage)")
    architecture: Literal["unet", "adm", "ddpmpp", "ncsnpp"] = Field(
        "unet", description="source: train: unet (this project's small UNet, configured by `unet`), or EDM's adm / "
        "ddpmpp / ncsnpp (configured by `network`)")
    network: dict[str, Any] = Field(default_factory=dict, description="adm/ddpmpp/ncsnpp constructor arguments, "
                                    "EDM's names (model_channels, channel_mult, num_blocks, attn_resolutions, dropout …)")
    precond: Literal["edm", "vp", "ve"] = Field("edm", description="preconditioning of a network trained here")
    unet: UNetConfig = Field(default_factory=UNetConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    sigma_data: float = Field(0.5, gt=0)
    p_mean: float = Field(-1.2, description="log-normal training sigma: mean of ln(sigma)")
    p_std: float = Field(1.2, gt=0, description="log-normal training sigma: std of ln(sigma)")

    @model_validator(mode="after")
    def _check(self) -> EDMTeacherConfig:
        if self.source == "edm_pickle" and not self.pickle:
            raise ValueError("source: edm_pickle needs `pickle:` (a local EDM .pkl or its URL)")
        if self.architecture != "unet" and self.source == "train":
            check_network_arguments(self.architecture, self.network)
        return self


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
    sigmas = sigmas.to(noise.device)  # the σ handed to `denoise` live where the samples do (GPU evaluation)
    x = noise.double() * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x.float(), s.float().expand(x.shape[0])).double()) / s
        x_next = x + (s_next - s) * d
        if i < num_steps - 1:  # every step but the last (to σ = 0) takes Heun's correction
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
    # a comparison with every class: −1 matches none, with no masked assignment (a boolean index costs a
    # nonzero() and a scatter, twice per distillation iteration)
    return (labels.long().unsqueeze(1) == torch.arange(num_classes, device=labels.device)).float()


# ----------------------------------------------------------------------------------------- the family


class EDMFamily(Family):
    schema = EDMTeacherConfig  # its `teacher:` block in params.yaml
    name, sampler_name = "edm", "Heun"

    @staticmethod
    def teacher_config(cfg: EDMTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        return teacher_config(cfg, sample_shape, num_classes)

    @staticmethod
    def import_teacher(cfg: EDMTeacherConfig, sample_shape: tuple[int, ...], num_classes: int, root: Path):
        return import_edm_pickle(cfg, sample_shape, num_classes, root)

    @staticmethod
    def architecture_config(cfg: EDMTeacherConfig, root: Path) -> dict[str, Any]:
        """From the constructor arguments a released EDM checkpoint records (a JSON of its class_name and kwargs in
        `ARCHITECTURES`, by the pickle's file name), the config its import would write. A teacher trained here takes
        its shape from its data."""
        import json

        from dmd2.families.edm_pickle import network_config_from_edm

        published = ARCHITECTURES / f"{Path(cfg.pickle or '').stem}.json"
        if cfg.source != "edm_pickle" or not published.is_file():
            return Family.architecture_config(cfg, root)
        recorded = json.loads(published.read_text())
        return converted_config(cfg, network_config_from_edm(recorded["class_name"], recorded["kwargs"]))

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        s = config["sampler"]
        self.sigma_data = float(config["sigma_data"])
        self.sigmas = karras_sigmas(self.num_train_timesteps, s["sigma_min"], s["sigma_max"], s["rho"]).flip(0).float()

    def build_network(self) -> nn.Module:
        c = self.config
        architecture = c.get("architecture", "unet")
        if architecture == "unet":
            model = UNet(UNetConfig(**c["unet"]), c["in_channels"], c["resolution"], c["label_dim"])
        else:
            model = build_edm_network(architecture, c["resolution"], c["in_channels"], c["label_dim"], c["network"])
        return Preconditioned(model, c.get("precond", "edm"), c["sigma_data"])

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
    def has_unconditional_branch(self) -> bool:
        if not self.num_classes:
            return True
        dropout = self.config.get("label_dropout")
        if dropout is None:  # a config from before the key was recorded: converted checkpoints never learned it
            return self.config.get("source", {}).get("type") != "edm_pickle"
        return dropout > 0

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
        """The shape `gan_features` returns, found by running the network on the meta device (no memory, no
        arithmetic), so every architecture answers the same way."""
        with torch.device("meta"):
            net = self.build_network()
            x = torch.zeros(1, *self.sample_shape)
            labels = torch.zeros(1, self.num_classes) if self.num_classes else None
            return tuple(net(x, torch.ones(1), labels, features_only=True).shape[1:])

    def teacher_loss(self, net, x0, cond):
        """EDM-weighted x0 regression at log-normal σ: mean λ(σ)·(D(x0 + σε; σ) − x0)²."""
        training = self.config["training"]
        sigma = sample_training_sigma(len(x0), training["p_mean"], training["p_std"]).to(x0.device)
        sigma = sigma.reshape(-1, *[1] * (x0.ndim - 1))
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
    """The config.json of an EDM teacher trained here on samples of `sample_shape` (or, for `source: edm_pickle`,
    the part the checkpoint does not record: sampler and training settings)."""
    channels, resolution = sample_shape[0], sample_shape[-1]
    network = {"unet": to_dict(cfg.unet)} if cfg.architecture == "unet" else {"network": dict(cfg.network)}
    return {"family": "edm", "kind": "teacher", "in_channels": channels, "resolution": resolution,
            "label_dim": num_classes, "sigma_data": cfg.sigma_data, "architecture": cfg.architecture,
            "precond": cfg.precond, **network, "sampler": to_dict(cfg.sampler),
            "training": {"p_mean": cfg.p_mean, "p_std": cfg.p_std}, "label_dropout": cfg.label_dropout}


# ------------------------------------------------------------------------------------ EDM's checkpoints

def edm_cache() -> Path:
    """Where fetched EDM checkpoints are kept: $DMD2_CACHE/edm (default ~/.cache/dmd2/edm)."""
    return Path(os.environ.get("DMD2_CACHE", Path.home() / ".cache" / "dmd2")) / "edm"


def local_pickle(location: str, root: Path) -> Path:
    """A local path (relative to the project `root`); an http(s) URL fetched once into the cache (never offline)."""
    if not location.startswith(("http://", "https://")):
        path = input_path(location, root)
        if not path.is_file():
            raise ModelError(f"teacher.pickle: {path} does not exist; fetch EDM's checkpoint on a connected machine "
                             f"(e.g. `curl -L -o {path} https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
                             f"{path.name}`) or give its URL")
        return path
    target = edm_cache() / location.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return target
    fetch = f"`curl -L --create-dirs -o {target} {location}`"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DMD2_OFFLINE") == "1":
        raise ModelError(f"teacher.pickle: {location} is not in {target.parent} and this machine is offline "
                         f"(HF_HUB_OFFLINE/DMD2_OFFLINE); fetch it on a connected machine with {fetch}")
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(location, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise ModelError(f"teacher.pickle: fetching {location} failed ({err}); fetch it with {fetch}") from None
    os.replace(partial, target)
    return target


def converted_config(cfg: EDMTeacherConfig, network: dict[str, Any]) -> dict[str, Any]:
    """The config.json of an EDM network (`edm_pickle.network_config_from_edm`) under our sampler settings."""
    shape = (network["in_channels"], network["resolution"], network["resolution"])
    config = {**teacher_config(cfg, shape, network["label_dim"]), **network}
    config.pop("unet", None)
    config["label_dropout"] = float(network["network"].get("label_dropout", 0.0))  # as trained (EDM's: none)
    return config


def import_edm_pickle(cfg: EDMTeacherConfig, sample_shape: tuple[int, ...], num_classes: int, root: Path):
    """`teacher.source: edm_pickle`: EDM's checkpoint converted (nothing in it executed) into our format."""
    from dmd2.checkpoint import sha256_file
    from dmd2.families.edm_pickle import convert_edm_pickle

    path = local_pickle(cfg.pickle, root)
    digest = sha256_file(path)
    if cfg.pickle_sha256 and digest != cfg.pickle_sha256:
        raise ModelError(f"teacher.pickle: {path} has sha256 {digest}, not the pinned teacher.pickle_sha256 "
                         f"{cfg.pickle_sha256}; fetch the intended file again, or update the pin if the change is meant")
    network, weights = convert_edm_pickle(path)
    data_shape = (network["in_channels"], network["resolution"], network["resolution"])
    if tuple(sample_shape) != data_shape or network["label_dim"] != num_classes:
        raise ModelError(f"{path} is a {network['label_dim']}-class network for {data_shape} images, but the data is "
                         f"{tuple(sample_shape)} with {num_classes} classes: set data.resolution (and the dataset) to match")
    config = converted_config(cfg, network)
    source = {"type": "edm_pickle", "pickle": cfg.pickle, "path": str(path), "sha256": digest,
              "parameters": sum(v.numel() for v in weights.values())}
    print(f"teacher: converted {path} ({network['architecture']}, {network['precond']} preconditioning, "
          f"{source['parameters']:,} parameters) without running its code")
    return {**config, "source": source}, weights
