"""Training logs: `metrics.jsonl` always, wandb when `wandb.mode` says so (never required), and progress: a bar on
a terminal, plain periodic lines in a log file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dmd2.config import WandbConfig

LOG_LINE_SECONDS = 30.0  # how often a log file gets a progress line


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A progress reporter for a loop of `total` steps: tqdm's bar when stderr is a terminal (`dmd2 <stage>` or `dvc
    repro` at a prompt); elsewhere a `LogLines`, whose lines `grep`, `tail -f` and `less` read: Snakemake sends a
    stage's output to logs/<exp>/<stage>.log (through `tee` to the terminal too, when it runs at one)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2, disable=disable)
    return LogLines(total, initial, desc, disable=disable)


class LogLines:
    """Progress as plain lines, one every `every` seconds and one at the end: `distill 480/800 (60%) 1.9 it/s
    ETA 2m48s dm=0.21 fake=0.49` (tqdm's redraws are carriage returns: a log file would hold one endless line)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: float = LOG_LINE_SECONDS,
                 disable: bool = False, file: Any = None):
        self.total, self.n, self.desc, self.every, self.disable = total, initial, desc, every, disable
        self.file, self.postfix = file, {}
        self._start_n, self._start = initial, time.monotonic()
        self._last = self._start
        self._printed_at = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every or self.n == self.total:
            self._last = now
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f" ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        values = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc} {self.n}/{self.total}{share} {rate:.3g} it/s elapsed {_duration(elapsed)}{eta}{values}"

    def _print(self) -> None:
        if not self.disable and self._printed_at != self.n:
            self._printed_at = self.n
            sys.stdout.flush()  # in a log that holds both streams, what the stage printed before comes before
            print(self.line(), file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.n != self._start_n:
            self._print()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLog:
    """Append-only JSON lines, one per logged step. A resumed run keeps the whole log: the first record it writes
    replaces the lines from its step on (records of steps it is about to recompute, and a torn last line), so the
    log never holds a step twice, and a run whose steps were lowered and raised again loses no record."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled, self._appending = Path(path), enabled, False
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self._appending and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) < record["step"]]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._appending = True
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def text_through(self, step: int) -> str:
        """The log's lines up to `step` (what a model written at `step` ships as its metrics.jsonl)."""
        if not self.path.exists():
            return ""
        return "".join(line + "\n" for line in self.path.read_text().splitlines() if _step_of(line) <= step)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; a torn line (a killed writer) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _step_of(line: str) -> float:
    """A log line's step; a torn line (the writer was killed mid-write) counts as past any resume point."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(*candidates: Path) -> dict[str, str]:
    """Commit and dirty flag of the first candidate folder inside a git work tree with a commit."""
    for folder in candidates:
        if not folder.is_dir():
            continue
        commit = _git(["rev-parse", "HEAD"], folder)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
            dirty = "unknown" if status is None else ("yes (uncommitted changes)" if status else "no")
            return {"commit": commit, "dirty": dirty, "where": str(folder.resolve())}
    return {"commit": "unknown", "dirty": "unknown", "where": "no git repository with a commit found"}


def tracking_config(params: Any, experiment: str, stage: str, run_dir: Path) -> dict[str, Any]:
    """What a tracked run records beside its metrics: the whole experiment block (data, teacher, distill, ...), which
    run directory (its fingerprint) and which commit of the code, so a run in the tracker says what made it."""
    from dmd2.config import to_dict

    here = Path(__file__).resolve().parent
    return {"experiment": experiment, "stage": stage, "run": run_dir.name, "code": git_state(here),
            **to_dict(params.current(experiment))}


class Wandb:
    """A thin wrapper: a no-op when mode is 'disabled' or on non-main ranks."""

    def __init__(self, cfg: WandbConfig, stage: str, experiment: str, config: dict[str, Any], enabled: bool = True):
        self.run = None
        self.cfg = cfg
        if cfg.mode == "disabled" or not enabled:
            return
        import wandb

        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name or f"{experiment}-{stage}",
                              dir=cfg.dir, mode=cfg.mode, config=config, job_type=stage, reinit="finish_previous")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(record, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.run is not None and self.cfg.log_images:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    @property
    def logs_checkpoints(self) -> bool:
        return self.run is not None and self.cfg.log_checkpoints

    def log_checkpoint(self, path: str | Path, name: str) -> None:
        if self.logs_checkpoints:
            import wandb

            artifact = wandb.Artifact(name, type="checkpoint")
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact)

    def finish(self) -> None:
        if self.run is not None:
            where = Path(self.run.dir).parent  # the run's folder under wandb.dir
            self.run.finish()
            if self.cfg.mode == "offline":
                print(f"wandb: the offline run is in {where}; upload it with `wandb sync {where}`")


def hardware_summary() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": "cpu", "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return info


def write_stage_record(path: str | Path, stage: str, started: float, **extra: Any) -> None:
    """`stage.json` beside a stage's outputs: wall time, hardware and whatever the stage adds (read by the report)."""
    record = {"stage": stage, "wall_s": round(time.time() - started, 2), "finished_unix": round(time.time(), 1),
              "hardware": hardware_summary(), **extra}
    Path(path).write_text(json.dumps(record, indent=2))
