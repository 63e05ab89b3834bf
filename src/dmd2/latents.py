"""Text-to-image data: real images as VAE latents paired with their captions, and the prompts files, written once by
the data stage (a latent family's `prepare_data`) so that distillation never runs the VAE encoder.

The latents LMDB has the image LMDBs' meta record, checksums and checks (`dmd2.data`):
    __meta__        JSON: schema_version, kind "latents", count, latent_shape, latent_dtype, scaling_factor,
                    shift_factor, pipeline, split, source, source_sha256
    latent/{i:08d}  raw float16 bytes, C×h×w ((the VAE posterior's sample − shift_factor) × scaling_factor)
    prompt/{i:08d}  the image's caption, UTF-8
    crc/{i:08d}     CRC-32 of the latent and caption bytes

Beside it the stage writes `prompts.lmdb` (what the generator trains on: `data.prompts`, else the training images'
captions) and `eval_prompts.lmdb` (the held-out images' captions, in the held-out LMDB's order: evaluation samples
image i from caption i, so FID and CLIP score compare like with like).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.data import META_KEY, SCHEMA_VERSION, DataError, LMDBImageDataset, _forget, _open, read_meta

KIND = "latents"
LATENT_DTYPE = np.float16


def _crc(latent: bytes, prompt: bytes) -> bytes:
    return zlib.crc32(prompt, zlib.crc32(latent)).to_bytes(4, "little")


def write_latents_lmdb(path: str | Path, latents: torch.Tensor, prompts: Sequence[str], meta: dict[str, Any]) -> None:
    """Write N×C×h×w latents with one caption each, atomically (into `path.tmp`, then renamed over `path`)."""
    path = Path(path)
    if len(latents) != len(prompts):
        raise DataError(f"{len(latents)} latents but {len(prompts)} captions for {path}")
    arrays = latents.detach().cpu().numpy().astype(LATENT_DTYPE)
    tmp = fresh_staging_dir(path, create=False)
    map_size = max(1 << 24, 2 * arrays.nbytes + sum(len(p) for p in prompts) * 2 + len(prompts) * 512 + (1 << 22))
    env = lmdb.open(str(tmp), map_size=int(map_size), subdir=True)
    with env.begin(write=True) as txn:
        for i, (latent, prompt) in enumerate(zip(arrays, prompts, strict=True)):
            data, text = np.ascontiguousarray(latent).tobytes(), prompt.encode("utf-8")
            txn.put(f"latent/{i:08d}".encode(), data)
            txn.put(f"prompt/{i:08d}".encode(), text)
            txn.put(f"crc/{i:08d}".encode(), _crc(data, text))
        full = {"schema_version": SCHEMA_VERSION, "kind": KIND, "count": len(prompts),
                "latent_shape": list(arrays.shape[1:]), "latent_dtype": np.dtype(LATENT_DTYPE).name, **meta}
        txn.put(META_KEY, json.dumps(full, sort_keys=True).encode())
    env.sync()
    env.close()
    _forget(path)
    replace_directory(tmp, path)


class LatentDataset:
    """Latents (float32 C×h×w) and their captions, read lazily from an LMDB written by `write_latents_lmdb`."""

    def __init__(self, path: str | Path, expect_shape: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path, kind=KIND)
        self.shape = tuple(self.meta["latent_shape"])
        if expect_shape is not None and tuple(expect_shape) != self.shape:
            raise DataError(f"latents LMDB {self.path} holds latents of shape {self.shape}, but the teacher's are "
                            f"{tuple(expect_shape)}: it was encoded for another pipeline or resolution; rerun "
                            "`dmd2 prepare-data`")

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _record(self, txn: lmdb.Transaction, index: int) -> tuple[np.ndarray, str]:
        data, text = txn.get(f"latent/{index:08d}".encode()), txn.get(f"prompt/{index:08d}".encode())
        crc = txn.get(f"crc/{index:08d}".encode())
        fix = "rebuild it with `dmd2 prepare-data`"
        if data is None or text is None or crc is None:
            raise DataError(f"latents LMDB {self.path}: record {index} is missing; {fix}")
        if _crc(data, text) != crc:
            raise DataError(f"latents LMDB {self.path}: record {index} is corrupt (its checksum does not match); {fix}")
        expected = int(np.prod(self.shape)) * np.dtype(LATENT_DTYPE).itemsize
        if len(data) != expected:
            raise DataError(f"latents LMDB {self.path}: record {index} has {len(data)} bytes, expected {expected} "
                            f"for {self.shape}; {fix}")
        return np.frombuffer(data, LATENT_DTYPE).reshape(self.shape), text.decode("utf-8")

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        with _open(self.path).begin() as txn:
            items = [self._record(txn, int(i)) for i in indices]
        return torch.from_numpy(np.stack([x for x, _ in items]).astype(np.float32)), [p for _, p in items]

    def close(self) -> None:
        _forget(self.path)


# ------------------------------------------------------------------------------------------------ captions


def image_captions(labels: np.ndarray, template: str, class_names: list[str] | None) -> list[str]:
    """One caption per image from its label: `template` with {label} and {class_name} (the source's class name,
    else the label) filled in."""
    try:
        return [template.format(label=int(y), class_name=class_names[y] if class_names else int(y)) for y in labels]
    except (KeyError, IndexError, ValueError, AttributeError) as err:  # {x}, {0}, {label:q}, {label.foo}
        raise DataError(f"data.caption_template {template!r} cannot be filled ({type(err).__name__}: {err}); it may "
                        "use {label} and {class_name} only") from None


def source_captions(cfg, labels: np.ndarray, class_names: list[str] | None, root: Path) -> list[str]:
    """Every source image's caption: `data.image_captions` (one per image, in the source's order), else the
    template."""
    from dmd2.paths import input_path
    from dmd2.prompts import read_captions

    if cfg.image_captions is None:
        return image_captions(labels, cfg.caption_template, class_names)
    path = input_path(cfg.image_captions, root)
    captions = read_captions(path)
    if len(captions) != len(labels):
        raise DataError(f"data.image_captions {path} holds {len(captions)} captions, but the source has "
                        f"{len(labels)} images: give one caption per image, in the source's order")
    return captions


@torch.no_grad()
def encode_split(images: LMDBImageDataset, codec, seed: int, batch_size: int = 64) -> torch.Tensor:
    """A split's images → latents, in batches, the posterior sampled with a seeded generator (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(images), batch_size):
        x, _ = images.batch(range(start, min(start + batch_size, len(images))))
        out.append(codec.encode(x, generator=generator))
    return torch.cat(out)


def training_prompts(cfg, root: Path) -> tuple[list[str], dict[str, Any]] | None:
    """`data.prompts` read and described (None: the generator trains on the images' captions)."""
    from dmd2.paths import input_path
    from dmd2.prompts import read_captions

    if not cfg.prompts:
        return None
    path = input_path(cfg.prompts, root)
    try:
        prompts = read_captions(path)
    except DataError as err:
        raise DataError(f"data.prompts: {err}") from None
    return prompts, {"split": "train", "source": str(path), "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def weights_digest(folder: Path) -> str:
    """sha256 over a model folder's weight files (names and bytes), so re-encoding follows a changed VAE."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
