"""LMDB datasets: round trip, deterministic split, lazy per-process opening, and clear errors."""

import lmdb
import numpy as np
import pytest
import torch

from dmd2.data import (
    DataError,
    ImagesInMemory,
    LMDBImageDataset,
    RandomBatches,
    open_split,
    read_meta,
    split_indices,
    write_lmdb,
)


def make(path, n=10, shape=(1, 4, 4)):
    images = np.arange(n * int(np.prod(shape)), dtype=np.int64).reshape(n, *shape).astype(np.uint8)
    labels = np.arange(n) % 3
    write_lmdb(path, images, labels, {"num_classes": 3, "source": "test", "source_sha256": "x"})
    return images, labels


def test_round_trip_and_meta(tmp_path):
    images, labels = make(tmp_path / "d.lmdb")
    ds = LMDBImageDataset(tmp_path / "d.lmdb")
    assert len(ds) == 10 and ds.num_classes == 3 and ds.shape == (1, 4, 4)
    x, y = ds[3]
    assert y == 3 % 3 and x.dtype == torch.float32
    np.testing.assert_allclose(((x.numpy() + 1) * 127.5).round(), images[3])
    got, got_labels = ds.all_uint8()
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    assert read_meta(tmp_path / "d.lmdb")["schema_version"] == 2


def test_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 50)
    a_train, a_held = split_indices(labels, 0.1, seed=0)
    b_train, b_held = split_indices(labels, 0.1, seed=0)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_held, b_held)
    assert not set(a_train) & set(a_held) and len(a_held) == 50
    assert np.array_equal(np.bincount(labels[a_held]), np.full(10, 5))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*dmd2 prepare-data"):
        LMDBImageDataset(tmp_path / "nope.lmdb")


def test_truncated_file_is_named(tmp_path):
    make(tmp_path / "d.lmdb")
    env = lmdb.open(str(tmp_path / "d.lmdb"))
    with env.begin(write=True) as txn:
        txn.delete(b"image/00000009")
    env.close()
    with pytest.raises(DataError, match=r"d\.lmdb is truncated"):
        LMDBImageDataset(tmp_path / "d.lmdb")


def test_missing_meta_and_wrong_shape(tmp_path):
    env = lmdb.open(str(tmp_path / "raw.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"image/00000000", b"\x00" * 16)
    env.close()
    with pytest.raises(DataError, match="no __meta__ record"):
        LMDBImageDataset(tmp_path / "raw.lmdb")
    make(tmp_path / "train.lmdb")
    with pytest.raises(DataError, match="data.resolution is 8"):
        open_split(tmp_path, "train", 8)


def test_forked_dataloader_workers_open_their_own_environment(tmp_path):
    make(tmp_path / "d.lmdb", n=32)
    ds = LMDBImageDataset(tmp_path / "d.lmdb")
    _ = ds[0]  # the parent has an open environment now
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork")
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [i % 3 for i in range(32)]


def test_random_batches_resume_exactly(tmp_path):
    make(tmp_path / "d.lmdb", n=50)
    ds = LMDBImageDataset(tmp_path / "d.lmdb")
    a = RandomBatches(ds, 4, seed=1)
    a.next()
    state = a.state_dict()
    expected = a.next()[1]
    b = RandomBatches(ds, 4, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.next()[1], expected)


def test_a_small_dataset_read_into_memory_gives_the_batches_the_lmdb_gives(tmp_path):
    make(tmp_path / "d.lmdb", n=50)
    ds = LMDBImageDataset(tmp_path / "d.lmdb")
    in_memory, from_lmdb = RandomBatches(ds, 8, seed=3), RandomBatches(ds, 8, seed=3, in_memory_bytes=0)
    assert isinstance(in_memory._reader, ImagesInMemory) and from_lmdb._reader is ds
    for _ in range(3):
        (x_a, y_a), (x_b, y_b) = in_memory.next(), from_lmdb.next()
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and x_a.dtype == torch.float32 and y_a.dtype == torch.long


def test_the_map_is_large_enough_for_many_small_records(tmp_path):
    """60,000 16x16 images (Fashion-MNIST's train split) once overflowed the map size estimated from the image bytes
    alone: three keys per record cost more than the pixels."""
    images = np.zeros((60000, 1, 16, 16), np.uint8)
    write_lmdb(tmp_path / "big.lmdb", images, np.arange(60000) % 10, {"num_classes": 10, "source": "test",
                                                                        "source_sha256": "x"})
    assert len(LMDBImageDataset(tmp_path / "big.lmdb")) == 60000
