"""Writing a directory so that a crash never leaves nothing: build it beside its final name, then swap it in.

The directories a stage writes whole (an LMDB, a model, an exported pipeline, a checkpoint) are written into
`staging_path(final)` and handed to `replace_directory`. The old version is moved aside before the new one is
renamed into place and deleted only after, so at every moment one complete version is on disk: `final`, or
`final.old` (put back by the next `replace_directory` of that path, or by `recover_directory`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staging_path(final: str | Path) -> Path:
    """Where the new version of `final` is built: a sibling (same file system, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def aside_path(final: str | Path) -> Path:
    """Where the old version of `final` waits while the new one is renamed into place."""
    final = Path(final)
    return final.with_name(final.name + ".old")


def fresh_staging_dir(final: str | Path, create: bool = True) -> Path:
    """An empty staging path for `final` (debris of an interrupted write is cleared first); `create=False` leaves
    the directory itself to the writer (LMDB and `save_pretrained` make their own)."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    if create:
        tmp.mkdir(parents=True)
    return tmp


def recover_directory(final: str | Path) -> None:
    """Put back the old version of `final` if a crash between the two renames of `replace_directory` left it
    aside with no `final`."""
    final, old = Path(final), aside_path(final)
    if old.exists() and not final.exists():
        os.replace(old, final)


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Rename the complete directory `tmp` over `final`, keeping the old `final` until the new one is in place."""
    tmp, final, old = Path(tmp), Path(final), aside_path(final)
    recover_directory(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
