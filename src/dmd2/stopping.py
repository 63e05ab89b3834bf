"""Stopping a training run on request, without losing it.

A person can ask a run to stop (`kill -USR1 <pid>`, or SIGTERM, which is also what Slurm sends on preemption), and
inside a Slurm job the run stops itself `slurm.stop_before_limit_minutes` before the job's time limit. A training
loop inside `StopOnSignal` finishes the iteration in progress, writes a checkpoint there (every rank at the same
iteration: the decision is all-reduced), and ends with `StopRequested`, which the CLI turns into one `stopped:`
line and exit status 75 (EX_TEMPFAIL, "try again": `dmd2.errors.EXIT_RESUMABLE`). Running the same command again
resumes from that checkpoint: nothing is lost or repeated. After a time-limit stop the job also puts itself back
in the queue (`scontrol requeue`, when `slurm.requeue` is on): Slurm starts the same batch script again, and the
stage resumes without anyone resubmitting it.

Why the time limit is read rather than signalled: under `snakemake --profile slurm` a stage runs inside
Snakemake's own job-step process, and Slurm's `--signal=USR1@N` goes to every process of the step, which ends
that Snakemake (USR1's default action) and with it the step, before the training loop has written anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from dmd2.errors import StopRequested
from dmd2.training import all_ranks_agree

if TYPE_CHECKING:
    from dmd2.config import SlurmConfig

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def parse_time_left(text: str) -> float | None:
    """Seconds in Slurm's time-left format (`squeue -o %L`): `[days-][hours:]minutes:seconds`; None for a job
    without a limit (UNLIMITED, NOT_SET) or anything unreadable."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts) or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


class SlurmTimeLimit:
    """The time limit of the Slurm job this process runs in, read with `squeue` at most every `poll_seconds`
    (an administrator may move it while the job runs) and counted down in between."""

    def __init__(self, job_id: str, stop_before_s: float, requeue: bool, poll_seconds: float = 30.0) -> None:
        self.job_id, self.stop_before_s, self.requeue_on_stop = job_id, stop_before_s, requeue
        self.poll_seconds = poll_seconds
        self._left: float | None = None  # seconds left at the last successful read
        self._read_at = -float("inf")

    @classmethod
    def of_this_job(cls, stop_before_minutes: int, requeue: bool) -> SlurmTimeLimit | None:
        """The limit of the batch job we run in; None outside Slurm (or where its commands are not installed)."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id or shutil.which("squeue") is None:
            return None
        return cls(job_id, 60.0 * stop_before_minutes, requeue)

    def seconds_left(self) -> float | None:
        now = time.monotonic()
        if now - self._read_at >= self.poll_seconds:
            self._read_at = now
            try:
                out = subprocess.run(["squeue", "--noheader", "--jobs", self.job_id, "--format", "%L"],
                                     capture_output=True, text=True, timeout=20)
                if out.returncode == 0:
                    self._left = parse_time_left(out.stdout)
                    self._read_at = time.monotonic()
            except (OSError, subprocess.TimeoutExpired):  # a busy controller: count down from the last read
                pass
        return None if self._left is None else self._left - (time.monotonic() - self._read_at)

    def due(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= self.stop_before_s

    def requeue(self) -> str:
        """Put the job back in the queue (Slurm ends this run of it); a sentence for the stop message."""
        try:
            out = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"requeueing Slurm job {self.job_id} failed ({err}); resubmit it"
        if out.returncode != 0:
            return f"requeueing Slurm job {self.job_id} failed ({out.stderr.strip()}); resubmit it"
        return f"Slurm job {self.job_id} is requeued and resumes from it when it starts again"


def _main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class StopOnSignal:
    """While active, SIGUSR1 and SIGTERM only note that a stop was asked for; `requested()` says so at an
    iteration boundary, on every rank at once, and also when `time_limit` is near (read by rank 0 only). The
    previous handlers come back on exit."""

    def __init__(self, time_limit: SlurmTimeLimit | None = None) -> None:
        self.received: int | None = None
        self.time_limit = time_limit
        self.time_limit_reached = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, device: str | object = "cpu") -> bool:
        """True on every rank if any rank received a stop signal or the job's time limit is near (one small
        all-reduce per call when distributed). Called after an iteration, so each run of a job makes progress."""
        if self.time_limit is not None and self.received is None and _main_rank() and self.time_limit.due():
            self.time_limit_reached = True
        return not all_ranks_agree(self.received is None and not self.time_limit_reached, device)

    def stop(self, step: int, checkpoint: object) -> StopRequested:
        """The error that ends the run, once `checkpoint` is written by every rank. After a time-limit stop, rank 0
        requeues the job here (which ends this run of it)."""
        resume = "run the same command again to resume from it"
        if self.time_limit_reached:
            limit = self.time_limit
            why = f"Slurm job {limit.job_id}'s time limit is {limit.stop_before_s / 60:g} min away"
            if limit.requeue_on_stop:  # said first: Slurm ends this run of the job as it requeues it
                print(f"requeueing Slurm job {limit.job_id}: it resumes from {checkpoint} when it starts again",
                      flush=True)
                resume = limit.requeue()
        else:
            why = signal.Signals(self.received).name if self.received else "a signal or time limit on another rank"
        return StopRequested(f"{why} at iteration {step}: checkpoint {checkpoint} written; {resume}")


def stop_requests(slurm: SlurmConfig) -> StopOnSignal:
    """What a training stage stops for: the signals, and inside a Slurm job its time limit (params.yaml
    `slurm.stop_before_limit_minutes` and `slurm.requeue`; outside Slurm they do nothing)."""
    return StopOnSignal(SlurmTimeLimit.of_this_job(slurm.stop_before_limit_minutes, slurm.requeue))
