"""Rolling training checkpoints: written atomically, rotated, loaded safely.

A checkpoint is a directory `ckpt-<step>` holding `meta.json`, `state.pt` (schedulers, RNG and data
position; plain tensors and numbers, loaded with `weights_only=True`) and the weights: safetensors files (one
per model) for the teacher; for distillation, `training/` with both models and both optimisers written by
torch.distributed.checkpoint (every rank writes its own shards, and any number of ranks, sharded or not, can
load them) plus a full `generator.safetensors` for evaluation. It is written into a hidden
`.ckpt-<step>.tmp` directory and renamed into place only when complete, so a process killed mid-write leaves
the previous checkpoint untouched and the next run ignores the debris.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_NAME = re.compile(r"^ckpt-(\d{7})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pending_checkpoint(root: str | Path, step: int) -> Path:
    """The hidden directory a checkpoint is written into before `commit_checkpoint` renames it into place."""
    return Path(root) / f".ckpt-{step:07d}.tmp"


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """An empty `pending_checkpoint` directory (debris of an interrupted write is cleared first)."""
    tmp = pending_checkpoint(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(root: str | Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json, flush everything to disk, rename the pending directory into place, drop old ones."""
    root, tmp = Path(root), pending_checkpoint(root, step)
    final = root / f"ckpt-{step:07d}"
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    """A single-process checkpoint: one safetensors file per model, plus `state`."""
    tmp = begin_checkpoint(root, step)
    for name, tensors in models.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    torch.save(state, tmp / "state.pt")
    return commit_checkpoint(root, step, meta, keep_last)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted writes are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(models from the safetensors files, state.pt, meta.json) of a complete checkpoint."""
    state, meta = read_checkpoint(path)
    return {f.stem: load_file(f) for f in Path(path).glob("*.safetensors")}, state, meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.pt, meta.json) of a complete checkpoint."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json); pick a ckpt-XXXXXXX directory "
                                "written by `dmd2 teacher` or `dmd2 distill`")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return state, json.loads((path / "meta.json").read_text())


# ------------------------------------------------------------------------- sharded training state (DCP)

TrainingParts = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def _training_state(parts: TrainingParts) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (model, optimizer) in parts.items():
        weights, optim = get_state_dict(model, [optimizer])
        state[name] = {"model": weights, "optim": optim}
    return state


def save_training_state(directory: str | Path, parts: TrainingParts) -> None:
    """Models and their optimisers through torch.distributed.checkpoint. A collective: every rank calls it and
    writes its own shards (replicated tensors are written once), onto a filesystem all ranks share."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_fine():
        dcp.save(_training_state(parts), checkpoint_id=str(directory))


def load_training_state(directory: str | Path, parts: TrainingParts) -> None:
    """Load `save_training_state`'s files into `parts`, resharding to this run's ranks (any number, any mode)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise FileNotFoundError(f"{directory} holds no training state (no .metadata); this checkpoint was not "
                                "written by this version of `dmd2 distill`. Resume from another checkpoint, or "
                                "delete the run directory to start again.")
    state = _training_state(parts)
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(directory))
    for name, (model, optimizer) in parts.items():
        set_state_dict(model, [optimizer], model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"])


def full_state_dict(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """All of `model`'s weights, on the CPU, for rank 0; the other ranks get an empty dict. Under FSDP a
    collective: every rank must call it."""
    if not sharded:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return {}  # replicated: rank 0 has them all, a copy on every rank would be wasted memory
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def _single_process_is_fine():
    """DCP warns that it assumes a single process when no process group exists; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_directory(work_dir: str | Path, settings: dict[str, Any], ignore: set[str], inputs: list[Path]) -> Path:
    """`work_dir/run-<fingerprint>`: where one training run keeps its checkpoints and log.

    The fingerprint covers the settings that change what is trained (not `ignore`d ones such as the step count
    or logging cadence) and the contents of the input files. Rerunning with the same fingerprint resumes, and
    raising `steps` extends the run; changing a learning rate or retraining the teacher starts a fresh run
    beside the old one instead of resuming a run made with other settings (nothing is deleted).
    """
    digest = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k not in ignore}, sort_keys=True).encode())
    for path in inputs:
        digest.update(sha256_file(path).encode())
    return Path(work_dir) / f"run-{digest.hexdigest()[:12]}"
