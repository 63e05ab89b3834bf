"""Text-to-image FID in the COCO protocol (DMD2 §6.3), with clean-fid's Inception features.

Each model generates `eval.coco.num_samples` images from the first captions of `eval.coco.captions`, in file order,
batch b from the fixed noise of seed `eval.seed + b`. Generated and reference images (`eval.coco.images`, every
image file in the folder, sorted by name) go through the same transform: a square centre crop (the shorter side)
and a PIL LANCZOS resize to `eval.coco.resolution`, then clean-fid's "clean" resize to 299 and its Inception-v3.
This is `cleanfid.fid.compute_fid(gen_dir, ref_dir, mode="clean", custom_image_tranform=…)` (tested against it),
without writing the images to disk, and with the reference statistics cached once by `dmd2 fid-reference`
(the original recomputes them at every evaluation). CLIP score, when `eval.clip.enabled`, is computed on the same
images against their own captions.

Patch FID (SDXL's protocol, `eval.coco.patch_size: 299`): the centre patch of every image at its full resolution,
with no resize (generated 1024² against COCO's ~640×480 originals), so it sees the fine detail that resizing to
512 px averages away.
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


def center_patch(image: np.ndarray, size: int, name: str = "an image") -> np.ndarray:
    """uint8 H×W×3 → its centre size×size crop, not resized (patch FID)."""
    height, width = image.shape[:2]
    if min(height, width) < size:
        raise CocoError(f"eval.coco.patch_size {size} is larger than {name} ({width}x{height}): lower patch_size or "
                        "set it to null")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


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


def reference_features(extractor, cfg, root: Path,
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Inception features of every reference image (transformed as the protocol says), of their centre patches
    (None without `patch_size`), and a description."""
    from dmd2.paths import input_path

    folder = input_path(cfg.images, root)
    files = reference_files(folder)
    feats, patches = [], []
    for i in range(0, len(files), batch_size):
        images = [(f, np.asarray(Image.open(f).convert("RGB"))) for f in files[i : i + batch_size]]
        feats.append(_features(extractor, [crop_and_resize(image, cfg.resolution) for _, image in images]))
        if cfg.patch_size:
            patches.append(_features(extractor, [center_patch(image, cfg.patch_size, str(f)) for f, image in images]))
    info = {"folder": str(folder), "count": len(files), "resolution": cfg.resolution, "patch_size": cfg.patch_size}
    return np.concatenate(feats), np.concatenate(patches) if patches else None, info


def _features(extractor, images: list[np.ndarray]) -> np.ndarray:
    return extractor(np.stack(images).transpose(0, 3, 1, 2))


@torch.no_grad()
def generated_features(model, extractor, captions: list[str], resolution: int, seed: int, batch_size: int,
                       num_steps: int | None = None, clip=None, prefix: str = "",
                       patch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Inception features of the model's images for `captions` (batch by batch: nothing but features is kept), of
    their centre patches (None without `patch_size`), and their mean CLIP score against those captions (None
    without `clip`)."""
    from dmd2.clip_score import clip_similarities
    from dmd2.sampling import fixed_noise, sample, to_uint8

    feats, patches, similarities = [], [], []
    renoise = torch.Generator().manual_seed(seed + 1)
    for b, start in enumerate(range(0, len(captions), batch_size)):
        prompts = captions[start : start + batch_size]
        noise = fixed_noise(len(prompts), model.family.sample_shape, seed + b)
        images = to_uint8(sample(model, noise, prompts, num_steps, renoise)).cpu().numpy()
        pixels = [img.transpose(1, 2, 0) for img in images]
        feats.append(_features(extractor, [crop_and_resize(img, resolution) for img in pixels]))
        if patch_size:
            patches.append(_features(extractor, [center_patch(img, patch_size, "a generated image") for img in pixels]))
        if clip is not None:
            similarities.append(clip_similarities(*clip, list(images), prompts, prefix))
    return (np.concatenate(feats), np.concatenate(patches) if patches else None,
            float(np.concatenate(similarities).mean()) if similarities else None)
