"""Fixed-seed sampling, image grids and the `dmd2 generate` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmd2.models import load_model, sample, to_uint8


def fixed_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same noise for every model and checkpoint: sample i always gets the same latent for a given seed."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def balanced_labels(n: int, num_classes: int) -> torch.Tensor | None:
    return torch.arange(n) % num_classes if num_classes else None


def sample_images(model, config, n: int, seed: int, batch_size: int = 256, num_steps: int | None = None,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N×C×H×W images from fixed noise (seed) and balanced labels, in batches."""
    shape = (config["in_channels"], config["resolution"], config["resolution"])
    noise = fixed_noise(n, shape, seed)
    if labels is None:
        labels = balanced_labels(n, config["label_dim"])
    renoise = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(0, n, batch_size):
        y = labels[i : i + batch_size] if labels is not None else None
        out.append(to_uint8(sample(model, config, noise[i : i + batch_size], y, num_steps, renoise)).cpu())
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


def class_major_labels(per_class: int, num_classes: int) -> torch.Tensor:
    """Labels laid out so that each grid column is one class and each row one seed."""
    return torch.arange(num_classes).repeat(per_class)


def generate_folder(model_dir: Path, output_dir: Path, per_class: int, num_steps: int | None, seed: int) -> Path:
    model, config = load_model(model_dir)
    classes = max(1, config["label_dim"])
    labels = class_major_labels(per_class, classes) if config["label_dim"] else None
    images = sample_images(model, config, per_class * classes, seed, num_steps=num_steps, labels=labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = img.numpy().transpose(1, 2, 0)
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(output_dir / f"{i:05d}.png")
    return save_grid(images, per_class, output_dir / "grid.png", scale=2)
