"""Text-to-image FID in the COCO protocol (DMD2 §6.3), with clean-fid's Inception features.

Each model generates `eval.coco.num_samples` images from the first captions of `eval.coco.captions`, in file order,
batch b from the fixed noise of seed `eval.seed + b`. Generated and reference images (`eval.coco.images`, every
image file in the folder, sorted by name) go through the same transform: a square centre crop (the shorter side)
and a PIL LANCZOS resize to `eval.coco.resolution`, then clean-fid's "clean" resize to 299 and its Inception-v3.
This is `cleanfid.fid.compute_fid(gen_dir, ref_dir, mode="clean", custom_image_tranform=…)` (tested against it),
without writing the images to disk, and with the reference statistics cached once by `dmd2 fid-reference`
(the original recomputes them at every evaluation). CLIP score, when `eval.clip.enabled`, is computed on the same
images against their own captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmd2.clip_score import center_crop_resize
from dmd2.errors import Dmd2Error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CocoError(Dmd2Error, RuntimeError):
    """The COCO evaluation's captions or reference images are missing or do not fit the settings."""


def crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 H×W×3 → uint8 size×size×3: square centre crop, then LANCZOS (the protocol's custom transform)."""
    return np.asarray(center_crop_resize(Image.fromarray(image).convert("RGB"), size))


def reference_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CocoError(f"eval.coco.images: {folder} is not a folder of reference images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CocoError(f"eval.coco.images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def coco_captions(cfg, root: Path) -> list[str]:
    """The first `num_samples` captions of `eval.coco.captions`."""
    from dmd2.data import DataError
    from dmd2.paths import input_path
    from dmd2.prompts import read_captions

    path = input_path(cfg.captions, root)
    try:
        captions = read_captions(path)
    except DataError as err:
        raise CocoError(f"eval.coco.captions: {err}") from None
    if len(captions) < cfg.num_samples:
        raise CocoError(f"eval.coco.captions {path} holds {len(captions)} captions, fewer than eval.coco.num_samples "
                        f"({cfg.num_samples}); lower num_samples or give more captions")
    return captions[: cfg.num_samples]


def reference_features(extractor, cfg, root: Path, batch_size: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """Inception features of every reference image (transformed as the protocol says) and a description."""
    from dmd2.paths import input_path

    folder = input_path(cfg.images, root)
    files = reference_files(folder)
    feats = []
    for i in range(0, len(files), batch_size):
        batch = [crop_and_resize(np.asarray(Image.open(f).convert("RGB")), cfg.resolution) for f in files[i : i + batch_size]]
        feats.append(extractor(np.stack(batch).transpose(0, 3, 1, 2)))
    return np.concatenate(feats), {"folder": str(folder), "count": len(files), "resolution": cfg.resolution}


@torch.no_grad()
def generated_features(model, extractor, captions: list[str], resolution: int, seed: int, batch_size: int,
                       num_steps: int | None = None, clip=None, prefix: str = "") -> tuple[np.ndarray, float | None]:
    """Inception features of the model's images for `captions` (batch by batch: nothing but features is kept) and
    their mean CLIP score against those captions (None without `clip`)."""
    from dmd2.clip_score import clip_similarities
    from dmd2.sampling import fixed_noise, sample, to_uint8

    feats, similarities = [], []
    renoise = torch.Generator().manual_seed(seed + 1)
    for b, start in enumerate(range(0, len(captions), batch_size)):
        prompts = captions[start : start + batch_size]
        noise = fixed_noise(len(prompts), model.family.sample_shape, seed + b)
        images = to_uint8(sample(model, noise, prompts, num_steps, renoise)).cpu().numpy()
        resized = np.stack([crop_and_resize(img.transpose(1, 2, 0), resolution) for img in images])
        feats.append(extractor(resized.transpose(0, 3, 1, 2)))
        if clip is not None:
            similarities.append(clip_similarities(*clip, list(images), prompts, prefix))
    return np.concatenate(feats), float(np.concatenate(similarities).mean()) if similarities else None
