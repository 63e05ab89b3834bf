"""Dataset sources in their official formats (written by the tests), and EDM checkpoints as teachers: what is read,
and one clear line for each way they go wrong."""

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from edm_fixtures import write_cifar10_archive, write_dataset_tool_zip, write_edm_checkpoint
from tiny import EDM_TINY_NETWORKS

from dmd2.config import DataConfig
from dmd2.data import DataError, open_source, prepare
from dmd2.families import ModelError, import_teacher
from dmd2.families.edm import EDMTeacherConfig
from dmd2.sources import SourceError


def test_cifar10_binary_archive_records_and_splits(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    md5 = write_cifar10_archive(archive, per_batch=4, test=3)
    source = open_source(DataConfig(source="cifar10", path=str(archive), md5=md5, resolution=32))
    assert len(source) == 23 and len(source.splits["train"]) == 20 and list(source.splits["heldout"]) == [20, 21, 22]
    with tarfile.open(archive) as tar:  # record 0 of data_batch_1: label byte, then the red, green, blue planes
        raw = tar.extractfile("cifar-10-batches-bin/data_batch_1.bin").read()
    assert source.labels[0] == raw[0]
    assert np.array_equal(source.read_image(0), np.frombuffer(raw[1:3073], np.uint8).reshape(3, 32, 32))
    summary = prepare(tmp_path / "data", source, 32, 0.1, 0)
    assert (summary["train"], summary["heldout"]) == (20, 3)


def test_cifar10_archive_problems_are_one_line_with_the_fix(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with pytest.raises(DataError, match=r"missing; fetch it on a connected machine with `curl -L -o .*cifar-10-binary"):
        open_source(DataConfig(source="cifar10", path=str(archive), resolution=32))
    write_cifar10_archive(archive, per_batch=2, test=2)
    with pytest.raises(DataError, match="has md5 [0-9a-f]{32}, not c32a1d4ab5d03f1284b67883e8d87530"):
        open_source(DataConfig(source="cifar10", path=str(archive), resolution=32))

    python_version = tmp_path / "cifar-10-python.tar.gz"  # the pickled version: refused, never unpickled
    with tarfile.open(python_version, "w:gz") as tar:
        data = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    md5 = __import__("hashlib").md5(python_version.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="not the CIFAR-10 binary version"):
        open_source(DataConfig(source="cifar10", path=str(python_version), md5=md5, resolution=32))


def test_dataset_tool_zip_and_folder_give_the_same_images_and_labels(tmp_path):
    import zipfile

    write_dataset_tool_zip(tmp_path / "set.zip", 12, 8, 3)
    zipfile.ZipFile(tmp_path / "set.zip").extractall(tmp_path / "folder")
    zipped = open_source(DataConfig(source="image_folder", path=str(tmp_path / "set.zip"), resolution=8))
    folder = open_source(DataConfig(source="image_folder", path=str(tmp_path / "folder"), resolution=8))
    labels = dict(json.loads((tmp_path / "folder/dataset.json").read_text())["labels"])
    assert list(zipped.labels) == list(folder.labels) == [labels[f"00000/img{i:08d}.png"] for i in range(12)]
    assert all(np.array_equal(zipped.read_image(i), folder.read_image(i)) for i in range(12))
    assert zipped.read_image(0).shape == (3, 8, 8) and zipped.num_classes == max(labels.values()) + 1

    table = json.loads((tmp_path / "folder/dataset.json").read_text())
    table["labels"] = table["labels"][1:]
    (tmp_path / "folder/dataset.json").write_text(json.dumps(table))
    with pytest.raises(DataError, match="dataset.json has no label for 00000/img00000000.png"):
        open_source(DataConfig(source="image_folder", path=str(tmp_path / "folder"), resolution=8))
    with pytest.raises(DataError, match="missing; prepare it with EDM's dataset_tool"):
        open_source(DataConfig(source="image_folder", path=str(tmp_path / "nowhere"), resolution=8))


def test_image_folder_labels_and_images_are_checked_where_they_enter(tmp_path):
    import zipfile

    write_dataset_tool_zip(tmp_path / "set.zip", 12, 8, 3)
    zipfile.ZipFile(tmp_path / "set.zip").extractall(tmp_path / "folder")
    table_path = tmp_path / "folder/dataset.json"
    good = json.loads(table_path.read_text())

    def opened(text: str, **data):
        table_path.write_text(text)
        return open_source(DataConfig(source="image_folder", path=str(tmp_path / "folder"), resolution=8, **data))

    assert opened(json.dumps(good), num_classes=5).num_classes == 5  # classes no image uses, when asked for
    for text, message in [
        ('{"labels": [["00000/img00000000.png", 1]', "dataset.json is malformed"),
        ("[1, 2]", "dataset.json is malformed"),
        (json.dumps({"labels": [[n, "cat"] for n, _ in good["labels"]]}), "labels 00000/img00000000.png as 'cat'"),
        (json.dumps({"labels": [[n, -1] for n, _ in good["labels"]]}), "has label -1"),
        (json.dumps({"labels": [[n, 1_000_000 if i == 0 else y] for i, (n, y) in enumerate(good["labels"])]}),
         "labels run to 1000000 but use only"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            opened(text)
    with pytest.raises(DataError, match="has label 2, but data.num_classes is 2"):
        opened(json.dumps(good), num_classes=2)

    (tmp_path / "folder/00000/img00000003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SourceError, match=r"img00000003.png is not a readable image .*: replace or remove it"):
        opened(json.dumps(good)).read_image(3)


def _teacher(tmp_path: Path, **fields) -> EDMTeacherConfig:
    return EDMTeacherConfig(source="edm_pickle", pickle=str(tmp_path / "net.pkl"), **fields)


def test_an_edm_teacher_must_fit_the_data_and_its_pin(tmp_path):
    write_edm_checkpoint(tmp_path / "net.pkl", EDM_TINY_NETWORKS["cifar10-tiny"])
    config, weights = import_teacher(_teacher(tmp_path), (3, 32, 32), 10, tmp_path)
    assert config["source"]["type"] == "edm_pickle" and len(config["source"]["sha256"]) == 64
    assert config["architecture"] == "ddpmpp" and "unet" not in config and len(weights) == 149

    with pytest.raises(ModelError, match=r"10-class network for \(3, 32, 32\) images, but the data is \(1, 16, 16\)"):
        import_teacher(_teacher(tmp_path), (1, 16, 16), 10, tmp_path)
    with pytest.raises(ModelError, match="not the pinned teacher.pickle_sha256"):
        import_teacher(_teacher(tmp_path, pickle_sha256="0" * 64), (3, 32, 32), 10, tmp_path)


def test_an_edm_checkpoint_url_is_not_fetched_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DMD2_CACHE", str(tmp_path / "cache"))
    from dmd2.families.edm import local_pickle

    url = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"
    with pytest.raises(ModelError, match=r"this machine is offline .* `curl -L --create-dirs -o .*cache/edm/"
                                         r"edm-cifar10-32x32-cond-vp.pkl https://"):
        local_pickle(url, tmp_path)
    cached = tmp_path / "cache/edm/edm-cifar10-32x32-cond-vp.pkl"  # once fetched, the cached copy is used offline
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert local_pickle(url, tmp_path) == cached


def _write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_files_give_their_own_train_and_heldout_splits(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5, 6]))
    source = open_source(DataConfig(source="idx", path=str(tmp_path), resolution=28))
    assert list(source.splits["heldout"]) == [5, 6, 7] and list(source.labels) == [0, 1, 2, 3, 9, 4, 5, 6]
    assert np.array_equal(source.read_image(6)[0], test[1]) and source.num_classes == 10

    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        open_source(DataConfig(source="idx", path=str(tmp_path), resolution=28))
