"""CLIP score as DMD2 reports it (OpenCLIP ViT-g/14, ≈0.33 on SDXL samples).

Protocol (the paper's `compute_clip_score`): each image is centre-cropped to a square and resized with
LANCZOS to 256, then passed through the model's own open_clip preprocess; each caption gets the prefix
"A photo depicts " right after the start token; the score is the mean raw cosine similarity of image and text
embeddings, with no x100 and no clamp at 0. Any open_clip model works, so tests use a tiny random one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmd2.config import CLIPConfig

RESIZE = 256


def load_clip(cfg: CLIPConfig, device: str | torch.device = "cpu") -> tuple[Any, Callable, Callable]:
    """(model, preprocess, tokenizer) for `cfg.model` / `cfg.pretrained`, in fp32 and eval mode."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=cfg.pretrained,
                                                                     device=device, precision="fp32")
    except RuntimeError as err:
        raise RuntimeError(f"could not load CLIP {cfg.model}/{cfg.pretrained}: {err}. The weights are downloaded "
                           "from the Hugging Face hub on first use; fetch them on a connected machine (they are "
                           "cached under ~/.cache/huggingface) or set eval.clip.pretrained to a local .pt file") from err
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(cfg.model)


def to_pil(image: np.ndarray | torch.Tensor | Image.Image) -> Image.Image:
    """uint8 C×H×W (1 or 3 channels) or a PIL image → an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def center_crop_resize(image: Image.Image, size: int = RESIZE) -> Image.Image:
    """Square centre crop (side = the shorter side), then LANCZOS to size x size."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def with_prefix(prompts: Sequence[str], prefix: str) -> list[str]:
    # The tokenizer adds the start token, so prefixing the text splices the prefix right after it; open_clip's
    # tokenizer truncates to 77 tokens and forces the last one to EOT, as the paper's code does.
    return [prefix + p for p in prompts]


@torch.no_grad()
def clip_similarities(model: Any, preprocess: Callable, tokenizer: Callable, images: Sequence[Any],
                      prompts: Sequence[str], prefix: str = "A photo depicts ", batch_size: int = 32,
                      resize: int = RESIZE) -> np.ndarray:
    """Per-pair cosine similarity between image i and prompt i (float64 array)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    dev = next(model.parameters()).device
    texts = with_prefix(prompts, prefix)
    out = []
    for i in range(0, len(texts), batch_size):
        pixels = torch.stack([preprocess(center_crop_resize(to_pil(im), resize)) for im in images[i : i + batch_size]])
        img = model.encode_image(pixels.to(dev)).float()
        txt = model.encode_text(tokenizer(texts[i : i + batch_size]).to(dev)).float()
        out.append(torch.nn.functional.cosine_similarity(img, txt, dim=-1).cpu())
    return torch.cat(out).double().numpy()


def clip_score(model: Any, preprocess: Callable, tokenizer: Callable, images: Sequence[Any], prompts: Sequence[str],
               prefix: str = "A photo depicts ", batch_size: int = 32, resize: int = RESIZE) -> float:
    """Mean raw cosine similarity (no x100, no clamp): DMD2's CLIP score."""
    return float(clip_similarities(model, preprocess, tokenizer, images, prompts, prefix, batch_size, resize).mean())
