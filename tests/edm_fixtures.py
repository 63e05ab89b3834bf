"""Files in the formats of EDM's releases and CIFAR-10's, written by the tests themselves (no EDM code, no download):
an EDM-style network pickle, the CIFAR-10 binary archive, and a dataset_tool folder/zip."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmd2.families.edm_networks import Preconditioned, build_edm_network
from dmd2.families.edm_pickle import network_config_from_edm


def build_edm(constructor: dict, class_name: str = "EDMPrecond", meta: bool = False) -> Preconditioned:
    """Our network for EDM constructor arguments (as a checkpoint records them)."""
    config = network_config_from_edm(class_name, constructor)
    with torch.device("meta" if meta else "cpu"):
        net = build_edm_network(config["architecture"], config["resolution"], config["in_channels"],
                                config["label_dim"], config["network"])
    return Preconditioned(net, config["precond"], config["sigma_data"])


def edm_style_pickle(net: Preconditioned, constructor: dict, path: Path, class_name: str = "EDMPrecond") -> None:
    """Write `net` as EDM's training loop does — dict(ema=…, loss_fn=…, augment_pipe=…, dataset_kwargs=…) — with
    every module reduced through a stand-in `torch_utils.persistence._reconstruct_persistent_obj` of this test's
    own (module containers pickle normally, as in EDM)."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called here: the loader under test must not call it either
        raise AssertionError("the persistence hook was executed")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj, package.persistence = _reconstruct_persistent_obj, module

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and not isinstance(obj, torch.nn.ModuleDict | torch.nn.ModuleList):
                state = dict(obj.__dict__)
                name = class_name if obj is net else type(obj).__name__
                if obj is net:
                    state["_init_kwargs"] = constructor
                    state["skip_scale"] = __import__("numpy").float64(0.5) ** 0.5  # EDM keeps numpy floats around
                meta = {"type": "class", "version": 6, "module_src": "raise SystemExit('executed')",
                        "class_name": name, "state": state}
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, module
    try:
        with open(path, "wb") as f:
            Pickler(f, protocol=4).dump({"ema": net, "loss_fn": None, "augment_pipe": None,
                                         "dataset_kwargs": {"path": "datasets/cifar10-32x32.zip", "use_labels": True}})
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]




def write_edm_checkpoint(path: Path, constructor: dict, seed: int = 0) -> Preconditioned:
    """A randomly initialised network of `constructor`'s shape, pickled as EDM's releases are."""
    torch.manual_seed(seed)
    net = build_edm(constructor)
    with torch.no_grad():  # output layers start at zero: give them weights so the network is not the identity
        for name, p in net.named_parameters():
            if "out_conv" in name or "aux_conv" in name or name.endswith("conv1.weight") or "proj" in name:
                p.normal_(0, 0.02)
    edm_style_pickle(net, constructor, path)
    return net


def class_images(labels: np.ndarray, resolution: int, seed: int) -> np.ndarray:
    """uint8 N×3×R×R images whose colour and stripe direction depend on the class (learnable, not noise)."""
    rng = np.random.default_rng(seed)
    labels, n = labels.astype(np.int64), len(labels)
    colours = np.stack([(labels * 37) % 256, (labels * 91 + 60) % 256, (labels * 53 + 120) % 256], 1)
    ramp = np.linspace(0, 1, resolution)
    stripes = np.where((labels % 2)[:, None, None] == 0, ramp[None, :, None], ramp[None, None, :])
    images = colours[:, :, None, None] * (0.5 + 0.5 * stripes[:, None]) + rng.normal(0, 12, (n, 3, resolution, resolution))
    return images.clip(0, 255).astype(np.uint8)


def write_cifar10_archive(path: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> str:
    """A cifar-10-binary.tar.gz in the official layout (label byte + 3,072 pixel bytes per record); returns its md5."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for i, name in enumerate(names):
            n = test if name == "test_batch.bin" else per_batch
            labels = rng.integers(0, 10, n).astype(np.uint8)
            images = class_images(labels, 32, seed + i)
            data = np.concatenate([labels[:, None], images.reshape(n, -1)], 1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        meta = "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]).encode()
        info = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_dataset_tool_zip(path: Path, count: int, resolution: int, num_classes: int, seed: int = 0) -> None:
    """A zip in the layout EDM's dataset_tool writes: 00000/img00000000.png … and dataset.json with the labels."""
    labels = np.random.default_rng(seed).integers(0, num_classes, count)
    images = class_images(labels, resolution, seed)
    with zipfile.ZipFile(path, "w") as z:
        table = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            z.writestr(name, buffer.getvalue())
            table.append([name, int(label)])
        z.writestr("dataset.json", json.dumps({"labels": table}))
