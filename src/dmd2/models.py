"""The normalised model format that every stage after `teacher` reads: `model.safetensors` + `config.json`.

Teachers trained here, converted or downloaded, and students written by `distill`, all land in this format,
so `distill`, `generate` and `evaluate` never care where a model came from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmd2.config import UNetConfig
from dmd2.edm import heun_nfe, heun_sample
from dmd2.networks import EDMPrecond, UNet, one_hot

FORMAT = "dmd2-denoiser/1"


class ModelError(RuntimeError):
    """A model directory is missing or not in the normalised format."""


def build_denoiser(config: dict[str, Any]) -> EDMPrecond:
    if config.get("family") != "edm":
        raise ModelError(f"model family {config.get('family')!r} is not supported by this build (supported: 'edm')")
    unet = UNet(UNetConfig(**config["unet"]), config["in_channels"], config["resolution"], config["label_dim"])
    return EDMPrecond(unet, config["sigma_data"])


def save_model(out_dir: str | Path, denoiser: torch.nn.Module | dict[str, torch.Tensor], config: dict[str, Any],
               extra_files: dict[str, str] | None = None) -> None:
    """Write weights (a module or its state dict) + config into `out_dir` atomically (a temp dir renamed over
    the old one)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = denoiser.state_dict() if isinstance(denoiser, torch.nn.Module) else denoiser
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"no model at {path} (missing {cfg_file}); run the stage that writes it "
                         "(`dmd2 teacher` or `dmd2 distill`) first")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT:
        raise ModelError(f"{cfg_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EDMPrecond, dict[str, Any]]:
    path = Path(path)
    config = load_config(path)
    model = build_denoiser(config)
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}/model.safetensors does not match its config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device).eval().requires_grad_(False), config


def model_nfe(config: dict[str, Any], num_steps: int | None = None) -> int:
    if config["kind"] == "student":
        return len(config["generator"]["sigmas"])
    return heun_nfe(num_steps or config["sampler"]["num_steps"])


@torch.no_grad()
def sample(
    model: EDMPrecond,
    config: dict[str, Any],
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] from unit Gaussian `noise`: Heun for teachers, the few-step generator for students."""
    noise = noise.to(next(model.parameters()).device)
    cond = one_hot(labels, config["label_dim"]) if labels is not None else None
    if cond is not None:
        cond = cond.to(noise.device)
    if config["kind"] == "student":
        sigmas = config["generator"]["sigmas"]
        x = noise * sigmas[0]
        for i, s in enumerate(sigmas):
            x0 = model(x, torch.full((x.shape[0],), s, device=x.device), cond)
            if i + 1 < len(sigmas):  # re-noise with fresh noise to the next step's level
                fresh = torch.randn(x0.shape, generator=generator).to(x0.device)
                x = x0 + sigmas[i + 1] * fresh
        return x0.clamp(-1, 1)
    s = config["sampler"]
    return heun_sample(model, noise, cond, num_steps or s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"]).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
