"""Sampling: the one few-step generator sampler, fixed-seed batches of images, grids, and `dmd2 generate`.

`few_step_sample` is the student's sampler everywhere: training (backward simulation, sample grids), `generate`,
`evaluate` and `evaluate-folder` all call it, and it only talks to the model's family.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dmd2.families import Family, Model, load_model


def few_step_sample(family: Family, net: nn.Module, noise: torch.Tensor, cond: Any, timesteps: list[int],
                    fresh_noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The few-step generator: start from `noise` at timesteps[0], predict x0, re-noise it with *fresh* noise
    to the next timestep, repeat; returns the last x0 (float32). One timestep is one network call."""
    n = noise.shape[0]

    def at(t: int) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=noise.device)

    x_t = family.generator_input(noise, at(timesteps[0]))
    for i, t in enumerate(timesteps):
        x0 = family.predict_x0(net, x_t, at(t), cond).float()
        if i + 1 < len(timesteps):
            x_t = family.add_noise(x0, fresh_noise(x0), at(timesteps[i + 1]))
    return x0


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, raw_cond: Any, num_steps: int | None = None,
           generator: torch.Generator | None = None, guidance_scale: float | None = None) -> torch.Tensor:
    """Images in [−1, 1] from unit Gaussian `noise`: the teacher's own sampler (`num_steps` steps, default its
    full sampler; guidance default its family's), or a student's few-step generator (re-noising draws from
    `generator`)."""
    device = next(model.net.parameters()).device
    noise = noise.to(device)
    cond = model.family.encode_conditions(raw_cond, device)
    if model.is_student:
        def fresh(x0: torch.Tensor) -> torch.Tensor:
            return model.family.draw_noise(tuple(x0.shape), generator).to(x0.device)

        x0 = few_step_sample(model.family, model.net, noise, cond, model.timesteps, fresh)
    else:
        scale = model.family.default_guidance_scale if guidance_scale is None else guidance_scale
        x0 = model.family.sample_teacher(model.net, noise, cond, model.steps(num_steps), scale)
    return model.family.decode(x0).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def fixed_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same noise for every model and checkpoint: sample i always gets the same latent for a given seed."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def sample_images(model: Model, n: int, seed: int, batch_size: int = 256, num_steps: int | None = None,
                  raw_cond: Any = None, batch_seconds: list[float] | None = None) -> torch.Tensor:
    """uint8 N×C×H×W images from fixed noise (seed) and, by default, balanced conditions, in batches; each batch's
    wall time is appended to `batch_seconds` when given (the evaluation's throughput figure)."""
    noise = fixed_noise(n, model.family.sample_shape, seed)
    if raw_cond is None:
        raw_cond = model.family.balanced_conditions(n)
    renoise = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(0, n, batch_size):
        cond = raw_cond[i : i + batch_size] if raw_cond is not None else None
        start = time.perf_counter()
        out.append(to_uint8(sample(model, noise[i : i + batch_size], cond, num_steps, renoise)).cpu())  # .cpu() syncs
        if batch_seconds is not None:
            batch_seconds.append(time.perf_counter() - start)
    return torch.cat(out)


def make_grid(images: torch.Tensor, rows: int, pad: int = 1) -> np.ndarray:
    """uint8 N×C×H×W → H'×W'×3 grid with `rows` rows."""
    n, c, h, w = images.shape
    cols = (n + rows - 1) // rows
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, cols)
        tile = np.repeat(img, 3, axis=0) if c == 1 else img
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tile.transpose(1, 2, 0)
    return grid


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 1) -> Path:
    image = Image.fromarray(make_grid(images, rows))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def grid_conditions(family: Family, per_class: int) -> tuple[Any, int]:
    """Conditions laid out so that each grid column is one condition (class or prompt) and each row one seed, and
    the column count."""
    return family.grid_conditions(per_class)


def sample_grid(model: Model, per_class: int, seed: int, batch_size: int, num_steps: int | None = None) -> torch.Tensor:
    """uint8 images for a class-major grid (`save_grid(images, per_class, ...)`)."""
    raw_cond, columns = grid_conditions(model.family, per_class)
    return sample_images(model, per_class * columns, seed, batch_size, num_steps, raw_cond)


def generate_folder(model_dir: Path, output_dir: Path, per_class: int, num_steps: int | None, seed: int,
                    prompts: list[str] | None = None) -> Path:
    """`per_class` samples of each class (or of each prompt, for a text-to-image model) as PNGs plus grid.png."""
    model = load_model(model_dir)
    if prompts:
        images = sample_images(model, per_class * len(prompts), seed, 256, num_steps, list(prompts) * per_class)
    elif model.family.latent_space:
        raise ValueError(f"{model_dir} is a text-to-image model: give the prompts to draw with --prompt")
    else:
        images = sample_grid(model, per_class, seed, 256, num_steps)
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = img.numpy().transpose(1, 2, 0)
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(output_dir / f"{i:05d}.png")
    return save_grid(images, per_class, output_dir / "grid.png", scale=2)
