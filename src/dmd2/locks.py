"""One lock per stage output and experiment, taken by the stage itself, so every front-end respects it.

Snakemake, DVC and a person at the shell all run the same `dmd2 <stage>` commands, so the commands lock what they
read and write: a stage holds a shared lock on each output it reads and an exclusive lock on each output it writes.
Two readers share; a writer never runs under a reader or another writer. `dvc repro` started while Snakemake
trains therefore stops at once (`data/<exp>` is in use by the running distillation) instead of rebuilding the
training set under it. The locks are OS file locks in `work/<exp>/locks/`, released when the process ends however
it ends. Processes a stage starts itself (`accelerate launch` ranks) run under their parent's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dmd2.errors import RunLockedError
from dmd2.paths import ExperimentPaths

# stage → (outputs it reads, outputs it writes), in the names of `ExperimentPaths`
STAGE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare-data": ((), ("data",)),
    "teacher": (("data",), ("teacher",)),
    "regression": (("data", "teacher"), ("regression",)),
    "distill": (("data", "teacher", "regression"), ("student",)),
    "fid-reference": (("data",), ("feature_net",)),
    "evaluate": (("data", "teacher", "student", "feature_net"), ("results",)),
    "report": (("results",), ("report",)),
}


def _launched_by_a_stage() -> bool:
    """A rank started by a stage's own launcher (or any distributed launcher): its parent holds the locks."""
    from dmd2.launch import LAUNCHED_ENV

    return bool(os.environ.get(LAUNCHED_ENV)) or "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def stage_locks(paths: ExperimentPaths, stage: str) -> Iterator[None]:
    """Hold `stage`'s locks for the block; refuse at once (naming the holder) if another stage holds one that
    conflicts."""
    if stage not in STAGE_IO or _launched_by_a_stage():
        yield
        return
    reads, writes = STAGE_IO[stage]
    folder = paths.work("locks")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for name in sorted(set(reads) | set(writes)):  # one order for every stage: no two wait on each other
            exclusive = name in writes
            held.enter_context(_locked(folder / f"{name}.lock", exclusive, _describe(paths, name), stage))
        yield


def _describe(paths: ExperimentPaths, name: str) -> str:
    return str(getattr(paths, name)) if name != "report" else str(paths.results / "report.html")


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool, what: str, stage: str) -> Iterator[None]:
    handle = open(path, "a+")  # noqa: SIM115 - held open for the duration of the block
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLockedError(f"{what} is in use by another running stage ({_holder(path)}); `dmd2 {stage}` would "
                             f"{'rewrite' if exclusive else 'read'} it under that stage. Let it finish (or stop it), "
                             "then run this again") from None
    if exclusive:  # a writer says who it is; readers are many, and leave the file alone
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"stage": stage, "pid": os.getpid(), "command": " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
    try:
        yield
    finally:
        if exclusive:
            handle.truncate(0)
        handle.close()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "a stage that reads it"
    return f"`dmd2 {info.get('stage')}`, pid {info.get('pid')}, started {info.get('started')}"
