"""Rolling training checkpoints: written atomically, rotated, loaded safely.

A checkpoint is a directory `ckpt-<step>` holding `meta.json`, `state.pt` (schedulers, RNG and data
position; plain tensors and numbers, loaded with `weights_only=True`) and the weights: safetensors files (one
per model) for the teacher; for distillation, both models and both optimisers (`training.safetensors`, or for
a sharded run `training/`, written by torch.distributed.checkpoint, every rank its own shards; any number of
ranks, sharded or not, can load either) plus the full generator as a student model directory for evaluation. It is written into a hidden
`.ckpt-<step>.tmp` directory and renamed into place only when complete, so a process killed mid-write leaves
the previous checkpoint untouched and the next run ignores the debris.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dmd2.atomic import replace_directory
from dmd2.errors import CheckpointError, RunLockedError

_NAME = re.compile(r"^ckpt-(\d{7})$")
T = TypeVar("T")


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
    replace_directory(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    """A single-process checkpoint: one safetensors file per model, plus `state`."""
    tmp = begin_checkpoint(root, step)
    with writing(tmp):
        for name, tensors in models.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        torch.save(state, tmp / "state.pt")
    return commit_checkpoint(root, step, meta, keep_last)


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write (a full disk, torch's 'unexpected pos' when it is full) into one line that names the
    place and says that the previous checkpoint is intact (the write goes to a temporary directory)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:  # safetensors' own error is neither of the others
        full = getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in str(err) or "No space" in str(err)
        why = "the disk is full" if full else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"writing {path} failed ({why}); the previous checkpoint is intact. Free space "
                              "(or fix the cause) and rerun the same command to resume.") from err


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
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json); pick a ckpt-XXXXXXX directory "
                              "written by `dmd2 teacher` or `dmd2 distill`")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    return state, meta


def checkpoint_at_or_refuse(ckpt_dir: Path, steps: int, key: str) -> Path | None:
    """When a run has already gone past `steps` (the setting was lowered): its checkpoint at exactly `steps` if
    one is kept, else a CheckpointError that says why and what to do. None when the run has not passed `steps`."""
    found = list_checkpoints(ckpt_dir)
    if not found or checkpoint_step(found[-1]) <= steps:
        return None
    exact = [c for c in found if checkpoint_step(c) == steps]
    if exact:
        return exact[0]
    kept = [checkpoint_step(c) for c in found]
    raise CheckpointError(f"{ckpt_dir.parent} has already trained to iteration {kept[-1]}, past {key}={steps}, and "
                          f"kept checkpoints only at {kept}: its weights at {steps} are gone. Set {key} to one of "
                          f"those iterations (or {kept[-1]} or more), or move {ckpt_dir.parent} away to train afresh")


def load_latest(ckpt_dir: Path, load: Callable[[Path], T], say: Callable[[str], None] = print,
                decide: Callable[[bool], bool] = lambda ok: ok) -> tuple[Path, T] | None:
    """Load the newest checkpoint in `ckpt_dir` that loads; a corrupt newer one is moved aside (renamed
    `corrupt-ckpt-…`, kept for inspection) with a warning, never deleted. None when there is no checkpoint;
    CheckpointError when none of them loads. `decide` lets every rank agree on success (a collective)."""
    found = list_checkpoints(ckpt_dir)
    errors = []
    for ckpt in reversed(found):
        try:
            result, ok = load(ckpt), True
        except Exception as err:  # noqa: BLE001 - any failure makes this checkpoint unusable: try the previous one
            result, ok = None, False
            errors.append(f"{ckpt.name}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        if decide(ok):
            return ckpt, result
        aside = ckpt.with_name(f"corrupt-{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if ckpt.exists() and not aside.exists():
            with contextlib.suppress(OSError):
                os.replace(ckpt, aside)
        say(f"warning: checkpoint {ckpt} does not load ({errors[-1] if errors else 'on another rank'}); moved it "
            f"aside to {aside.name} and trying the previous one")
    if found:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} loads ({'; '.join(errors)}); they were moved aside as "
                              "corrupt-ckpt-*. Delete the run directory to start again, or resume from a "
                              "checkpoint you trust with --resume_from_checkpoint")
    return None


# ------------------------------------------------------------------------- sharded training state (DCP)

TrainingParts = dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]  # None: weights only (an EMA)


def _training_state(parts: TrainingParts) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (model, optimizer) in parts.items():
        weights, optim = get_state_dict(model, [optimizer] if optimizer is not None else [])
        state[name] = {"model": weights, "optim": optim}
    return state


def save_training_state(checkpoint: str | Path, parts: TrainingParts, sharded: bool) -> Path:
    """Models and their optimisers. A collective: every rank calls it.

    Sharded (FSDP2): through torch.distributed.checkpoint into `training/`, each rank writing its own shards onto
    a filesystem all ranks share. Unsharded (one process, or DDP's identical replicas): rank 0 writes one
    `training.safetensors` (the tensors packed by `_pack`) whose metadata says where each one lies and holds the
    rest (optimiser hyper-parameters); one write instead of DCP's one per tensor, which cost more than the
    iterations between checkpoints on small models. Either loads into any number of ranks, sharded or not. Returns the path."""
    if sharded:
        import torch.distributed.checkpoint as dcp

        directory = Path(checkpoint) / "training"
        with _single_process_is_fine(), writing(directory):
            dcp.save(_training_state(parts), checkpoint_id=str(directory))
        return directory
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        return write_training_state(checkpoint, snapshot_training_state(parts))
    return Path(checkpoint) / "training.safetensors"


def _unsharded_training_state(parts: TrainingParts) -> dict[str, Any]:
    """What `_training_state` returns for modules that are not sharded (weights by name, optimiser state keyed by
    parameter name), built from the modules' and optimisers' own `state_dict()`s: DCP's `get_state_dict` looks up
    every parameter's name through its wrappers, 20 ms a checkpoint on the embedded experiment's small networks."""
    state = {}
    for name, (model, optimizer) in parts.items():
        optim: dict[str, Any] = {}
        if optimizer is not None:
            names = {param: key for key, param in model.named_parameters()}
            order = [names[param] for group in optimizer.param_groups for param in group["params"]]
            raw = optimizer.state_dict()  # parameters are numbered in param_groups order
            optim = {"state": {order[i]: moments for i, moments in raw["state"].items()},
                     "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                      for group in raw["param_groups"]]}
        state[name] = {"model": model.state_dict(), "optim": optim}
    return state


Snapshot = tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]


def snapshot_training_state(parts: TrainingParts) -> Snapshot:
    """The unsharded training state as a CPU copy that training may go on past while a `BackgroundWriter` writes
    it: (the tensors packed by `_pack`, where each one lies in them, the JSON skeleton around them)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(_unsharded_training_state(parts), "", tensors)
    return *_pack(tensors), skeleton


def write_training_state(checkpoint: str | Path, snapshot: Snapshot) -> Path:
    """Write a `snapshot_training_state` as `<checkpoint>/training.safetensors`."""
    packed, layout, skeleton = snapshot
    path = Path(checkpoint) / "training.safetensors"
    with writing(path):
        save_file(packed, path, metadata={"structure": json.dumps(skeleton), "packing": json.dumps(layout)})
    return path


def _pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """One flat CPU copy per dtype of all `tensors`, and {key: [dtype, offset, shape]} to find each in them.

    A training state is a thousand tensors or more (weights, two Adam moments and a step count per parameter);
    one copy per dtype is cheaper than a copy each, and writing a few tensors instead of a thousand keeps the
    writer thread from holding the interpreter lock for tens of milliseconds, which stalled the training loop."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(str(tensor.dtype).removeprefix("torch."), []).append((key, tensor.detach()))
    packed, layout = {}, {}
    for dtype, items in groups.items():
        packed[dtype] = torch.cat([tensor.reshape(-1) for _, tensor in items]).cpu()  # cat copies
        offset = 0
        for key, tensor in items:
            layout[key] = [dtype, offset, list(tensor.shape)]
            offset += tensor.numel()
    return packed, layout


def _unpack(packed: dict[str, torch.Tensor], layout: dict[str, list]) -> dict[str, torch.Tensor]:
    """`_pack`'s tensors again, each its own copy (a view would keep the whole flat buffer alive)."""
    return {key: packed[dtype][offset : offset + math.prod(shape)].reshape(shape).clone()
            for key, (dtype, offset, shape) in layout.items()}


class BackgroundWriter:
    """Checkpoint writes on one background thread, so the loop trains on while rank 0 serialises and fsyncs a
    snapshot (the loop's share of a checkpoint falls from about 0.13 s to 0.03 s in benchmarks/distill_overhead.py;
    docs/tuning.md). One write at a time: `submit` first waits for the previous
    one. A failed write raises its error at the next `submit` or `wait`; the checkpoint it was writing is never
    committed, so the previous one stays the latest."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = None

    def submit(self, write: Callable[[], Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def training_state_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint keeps its training state: `training.safetensors` (unsharded) or `training/` (DCP)."""
    single = Path(checkpoint) / "training.safetensors"
    return single if single.exists() else Path(checkpoint) / "training"


def load_training_state(path: str | Path, parts: TrainingParts) -> None:
    """Load `save_training_state`'s files into `parts`, resharding to this run's ranks (any number, any mode).

    Nothing in them can run code: the one-file form is safetensors plus JSON; DCP stores its index (`.metadata`)
    and non-tensor values as pickles, both read with restricted unpicklers here (`_SafeReader`,
    `_SafeLoadPlanner`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        state = _read_single_file(path)
        options = StateDictOptions(full_state_dict=True)  # each rank takes its own shards of the full tensors
    else:
        state, options = _read_dcp(path, parts), None
    for name, (model, optimizer) in parts.items():
        if name not in state:
            raise CheckpointError(f"{path} holds no state for the {name} (it has {sorted(state)})")
        set_state_dict(model, [optimizer] if optimizer is not None else [], model_state_dict=state[name]["model"],
                       optim_state_dict=state[name]["optim"], options=options)


def _read_single_file(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            skeleton = json.loads(metadata["structure"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if "packing" in metadata:  # files written before packing hold one tensor per key
            tensors = _unpack(tensors, json.loads(metadata["packing"]))
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    return _unflatten(skeleton, tensors)


def _read_dcp(directory: Path, parts: TrainingParts) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    if not (directory / ".metadata").exists():
        raise CheckpointError(f"{directory} holds no training state (no .metadata); this checkpoint was not "
                              "written by this version of `dmd2 distill`. Resume from another checkpoint, or "
                              "delete the run directory to start again.")
    reader = _SafeReader(str(directory))
    reader.read_metadata()  # refuses a hostile or foreign index here, with our message, before DCP wraps it
    state = _training_state(parts)
    with _single_process_is_fine():
        try:
            dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
        except dcp.api.CheckpointException as err:
            detail = next((line for line in str(err).splitlines() if "Error" in line), str(err).splitlines()[0])
            raise CheckpointError(f"{directory} cannot be loaded ({detail.strip()[:300]})") from err
    return state


_TENSOR = "__tensor__"


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of nested dicts/lists in which each tensor is replaced by {"__tensor__": its key}."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {str(k): _flatten(v, f"{key}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


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
    """The CPU generator (every draw that shapes training is made on the CPU: `GlobalBatchRandom`) and this
    process's own CUDA device, never a list per GPU: a checkpoint written on 8 GPUs resumes on 1."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():  # older checkpoints held a list: skipped
        torch.cuda.set_rng_state(cuda)


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


# ------------------------------------------------------------------------------------ safe DCP loading


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP index is made of; anything else (os.system, builtins.eval, ...) is refused by name
    before it is looked up, so nothing in the file runs."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):  # how some Python 3.11 releases (3.11.2, Debian 12's) pickle an enum member
            return _enum_member
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """`getattr(cls, name)` for the one use an index has for it: a member of an enum class the unpickler allowed."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"refused getattr({cls!r:.60}, {name!r:.60}): only an enum's members are read")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a training-state index this code wrote ({err}); it was not loaded "
                                  "(checkpoint indexes are read with a restricted unpickler)") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner reads non-tensor values with `torch.load(weights_only=False)`; these are plain
    numbers, lists and dicts (optimiser hyper-parameters), which `weights_only=True` reads without running code."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"a value in the training state ({read_item.dest_index.fqn}) is not plain data "
                                  f"({str(err).splitlines()[0]}); it was not loaded") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ------------------------------------------------------------------------------------ one writer per run


@contextlib.contextmanager
def run_lock(run_dir: Path, say: Callable[[str], None] = print):
    """Hold `run_dir`'s lock while training: a second trainer on the same run directory stops at once and names
    the holder (pid, host, start time, command). The lock is an OS file lock, released even when its process is
    killed; a lock file left by a dead process is taken over, with a line saying so."""
    import fcntl
    import sys

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "LOCK"
    handle = open(path, "a+")  # noqa: SIM115 - held open for the duration of the block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(path)
        handle.close()
        raise RunLockedError(f"{run_dir} is being written by another trainer: {holder}. Stop that one first (or let "
                             "it finish); two trainers on one run directory would interleave checkpoints") from None
    previous = _lock_holder(path, default="")
    if previous:
        say(f"note: took over {path}, left by a trainer that is no longer running ({previous})")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}))
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # a clean exit leaves an empty lock file: nothing to take over
        handle.close()


def one_writer(run_dir: Path, accelerator) -> contextlib.ExitStack:
    """`run_lock` for a run of several processes (an accelerate `Accelerator`'s): rank 0 holds the run directory's
    lock for the whole run, and every rank stops if it cannot (a second trainer on the same run directory, e.g.
    one left running by a killed snakemake). Use as a context manager."""
    from accelerate.utils import broadcast_object_list

    stack = contextlib.ExitStack()
    problem = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(run_lock(run_dir, accelerator.print))
        except RunLockedError as err:
            problem = str(err)
    problem = broadcast_object_list([problem])[0] if accelerator.num_processes > 1 else problem
    if problem:
        stack.close()
        raise RunLockedError(problem)
    return stack


def _lock_holder(path: Path, default: str = "unknown process") -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return default
    if not info:
        return default
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
            f"command `{info.get('command')}`")
