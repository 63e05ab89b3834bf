"""Captions files → prompts LMDB: every format, the one-line errors, checksums and the meta record."""

import json

import lmdb
import numpy as np
import pytest

from dmd2.data import DataError, LMDBImageDataset, write_lmdb
from dmd2.prompts import PromptDataset, prompts_lmdb_from_captions, read_captions

PROMPTS = ["a photo of a cat", "two dogs, on a beach", 'a sign that says "open"', "ünïcödé caption"]


def write_captions(tmp_path, fmt: str):
    path = tmp_path / f"captions.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n", encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "caption"])
            writer.writerows([[i, p] for i, p in enumerate(PROMPTS)])
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "text": p}) for i, p in enumerate(PROMPTS)), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_each_captions_format_reads_the_prompts_in_order(tmp_path, fmt):
    assert read_captions(write_captions(tmp_path, fmt)) == PROMPTS


def test_parquet_captions_read_or_say_what_they_need(tmp_path):
    path = tmp_path / "captions.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="reading parquet needs pyarrow"):
            read_captions(path)
        return
    pq.write_table(pa.table({"prompt": PROMPTS}), path)
    assert read_captions(path) == PROMPTS


@pytest.mark.parametrize(("name", "content", "message"), [
    ("c.csv", "id,title\n1,x\n", r"c\.csv has no column named caption, prompt, text \(it has id, title\)"),
    ("c.jsonl", '{"caption": "a"}\n{"caption": ""}\n', r"c\.jsonl, record 2: the caption is empty"),
    ("c.jsonl", '{"caption": "a"}\nnot json\n', r"c\.jsonl, line 2: not JSON"),
    ("c.txt", "\n\n", r"c\.txt holds no prompts"),
    ("c.tsv", "a\n", r"unknown format \.tsv; use one of \.txt, \.csv, \.jsonl, \.parquet"),
])
def test_bad_captions_files_are_one_line_that_names_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_captions(tmp_path / name)


def test_prompts_lmdb_round_trips_with_its_meta_and_checks_every_record(tmp_path):
    captions = write_captions(tmp_path, "jsonl")
    meta = prompts_lmdb_from_captions(captions, tmp_path / "prompts.lmdb")
    dataset = PromptDataset(tmp_path / "prompts.lmdb")
    assert len(dataset) == 4 and dataset.meta == meta and meta["kind"] == "prompts"
    assert [dataset[i] for i in range(4)] == PROMPTS and dataset.batch([3, 0]) == [PROMPTS[3], PROMPTS[0]]
    dataset.close()

    env = lmdb.open(str(tmp_path / "prompts.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"prompt/00000002", b"a sign that says \"shut\"")
    env.close()
    with pytest.raises(DataError, match=r"prompts\.lmdb: prompt 2 is corrupt \(its checksum does not match\)"):
        PromptDataset(tmp_path / "prompts.lmdb")[2]


def test_an_image_lmdb_is_not_taken_for_prompts_nor_the_reverse(tmp_path):
    write_lmdb(tmp_path / "images.lmdb", np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]),
               {"num_classes": 2, "source": "t", "source_sha256": "x"})
    with pytest.raises(DataError, match=r"images\.lmdb is not a prompts LMDB .*kind 'images'"):
        PromptDataset(tmp_path / "images.lmdb")
    prompts_lmdb_from_captions(write_captions(tmp_path, "txt"), tmp_path / "prompts.lmdb")
    with pytest.raises(DataError, match=r"prompts\.lmdb is not an images LMDB \(kind 'prompts'\)"):
        LMDBImageDataset(tmp_path / "prompts.lmdb")
