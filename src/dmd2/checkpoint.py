"""Rolling training checkpoints: written atomically, rotated, loaded safely.

A checkpoint is a directory `ckpt-<step>` holding safetensors files (one per model), `state.pt` (optimisers,
schedulers, RNG and data position; plain tensors and numbers, loaded with `weights_only=True`) and
`meta.json`. It is written into a hidden `.ckpt-<step>.tmp` directory and renamed into place only when
complete, so a process killed mid-write leaves the previous checkpoint untouched and the next run ignores
the debris.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^ckpt-(\d{7})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:07d}"
    tmp = root / f".ckpt-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tensors in models.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json); pick a ckpt-XXXXXXX directory "
                                "written by `dmd2 teacher` or `dmd2 distill`")
    models = {f.stem: load_file(f) for f in path.glob("*.safetensors")}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return models, state, meta


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
