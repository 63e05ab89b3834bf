"""Prompts for text-to-image distillation: read from a captions file, stored as an LMDB like the image datasets.

A captions file is one of
    .txt            one prompt per line (blank lines are skipped)
    .csv            a header row and a column named caption, prompt or text (the first of these it has)
    .jsonl          one JSON object per line, with one of the same keys
    .parquet        a table with one of the same columns (needs pyarrow)
The LMDB holds one record per prompt, with the same meta record, checksums and checks as the image LMDBs
(`dmd2.data`):
    __meta__        JSON: schema_version, kind "prompts", count, split, source, source_sha256
    prompt/{i:08d}  UTF-8 bytes
    crc/{i:08d}     CRC-32 of the prompt bytes
"""

from __future__ import annotations

import csv
import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import torch

from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.data import META_KEY, SCHEMA_VERSION, DataError, _forget, _open, read_meta

CAPTION_KEYS = ("caption", "prompt", "text")
FORMATS = (".txt", ".csv", ".jsonl", ".parquet")
KIND = "prompts"


def read_captions(path: str | Path) -> list[str]:
    """The prompts of a captions file, in file order (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file {path} {'is a directory' if path.is_dir() else 'not found'}; give the path "
                        f"of a {', '.join(FORMATS)} file")
    if path.suffix not in FORMATS:
        raise DataError(f"captions file {path}: unknown format {path.suffix or '(no suffix)'}; "
                        f"use one of {', '.join(FORMATS)}")
    try:
        prompts = _READERS[path.suffix](path)
    except UnicodeDecodeError as err:
        raise DataError(f"captions file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not prompts:
        raise DataError(f"captions file {path} holds no prompts")
    return prompts


def _txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _caption_key(keys: Sequence[str], path: Path) -> str:
    key = next((k for k in CAPTION_KEYS if k in keys), None)
    if key is None:
        raise DataError(f"captions file {path} has no column named {', '.join(CAPTION_KEYS)} (it has "
                        f"{', '.join(map(str, keys)) or 'none'}); rename the prompt column")
    return key


def _csv(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        key = _caption_key(reader.fieldnames or [], path)
        return [_prompt(row[key], path, n) for n, row in enumerate(reader, start=2)]


def _jsonl(path: Path) -> list[str]:
    prompts, key = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"captions file {path}, line {n}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"captions file {path}, line {n}: expected a JSON object with a caption")
        key = key or _caption_key(list(record), path)
        prompts.append(_prompt(record.get(key), path, n))
    return prompts


def _parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"captions file {path}: reading parquet needs pyarrow (pip install pyarrow), or convert "
                        "it to .jsonl or .csv") from None
    table = pq.read_table(path)
    key = _caption_key(table.column_names, path)
    return [_prompt(value, path, n) for n, value in enumerate(table.column(key).to_pylist(), start=1)]


def _prompt(value: Any, path: Path, where: int) -> str:
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else "empty" if isinstance(value, str) else f"not text ({value!r})"
        raise DataError(f"captions file {path}, record {where}: the caption is {what}")
    return value.strip()


_READERS = {".txt": _txt, ".csv": _csv, ".jsonl": _jsonl, ".parquet": _parquet}


# ---------------------------------------------------------------------------------------------------- LMDB


def _crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "little")


def write_prompts_lmdb(path: str | Path, prompts: Sequence[str], meta: dict[str, Any]) -> None:
    """Write `prompts` atomically (into `path.tmp`, then renamed over `path`)."""
    path = Path(path)
    encoded = [p.encode("utf-8") for p in prompts]
    tmp = fresh_staging_dir(path, create=False)
    map_size = max(1 << 24, 4 * sum(len(e) + 64 for e in encoded))
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True)
    with env.begin(write=True) as txn:
        for i, data in enumerate(encoded):
            txn.put(f"prompt/{i:08d}".encode(), data)
            txn.put(f"crc/{i:08d}".encode(), _crc(data))
        full = {"schema_version": SCHEMA_VERSION, "kind": KIND, "count": len(encoded), **meta}
        txn.put(META_KEY, json.dumps(full, sort_keys=True).encode())
    env.sync()
    env.close()
    _forget(path)
    replace_directory(tmp, path)


def prompts_lmdb_from_captions(captions: str | Path, out: str | Path, split: str = "train") -> dict[str, Any]:
    """Read a captions file and write its prompts LMDB; returns the meta record."""
    captions = Path(captions)
    prompts = read_captions(captions)
    meta = {"split": split, "source": str(captions), "source_sha256": hashlib.sha256(captions.read_bytes()).hexdigest()}
    write_prompts_lmdb(out, prompts, meta)
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "count": len(prompts), **meta}


class PromptDataset:
    """Prompts read lazily from an LMDB written by `write_prompts_lmdb`, each checked against its checksum."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path, kind=KIND)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _read(self, txn: lmdb.Transaction, index: int) -> str:
        data, crc = txn.get(f"prompt/{index:08d}".encode()), txn.get(f"crc/{index:08d}".encode())
        fix = "rebuild it with `dmd2 prepare-data`"
        if data is None or crc is None:
            raise DataError(f"prompts LMDB {self.path}: prompt {index} is missing; {fix}")
        if _crc(data) != crc:
            raise DataError(f"prompts LMDB {self.path}: prompt {index} is corrupt (its checksum does not match); {fix}")
        return data.decode("utf-8")

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(index)
        with _open(self.path).begin() as txn:
            return self._read(txn, index)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> list[str]:
        with _open(self.path).begin() as txn:
            return [self._read(txn, int(i)) for i in indices]

    def close(self) -> None:
        _forget(self.path)
