"""Stopping a training run on request, without losing it.

A cluster sends a warning signal before a job's time limit or preemption (Slurm: `--signal=USR1@<seconds>`), and
a person can send one too (`kill -USR1 <pid>`, or SIGTERM). A training loop inside `StopOnSignal` finishes the
iteration in progress, writes a checkpoint there (every rank at the same iteration: the decision is all-reduced),
and ends with `StopRequested`, which the CLI turns into one `stopped:` line and exit status 75 (EX_TEMPFAIL,
"try again": `dmd2.errors.EXIT_RESUMABLE`). Running the same command again resumes from that checkpoint: nothing is
lost or repeated.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from dmd2.errors import StopRequested
from dmd2.training import all_ranks_agree

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopOnSignal:
    """While active, SIGUSR1 and SIGTERM only note that a stop was asked for; `requested()` says so at an
    iteration boundary, on every rank at once. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
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
        """True on every rank if any rank received a stop signal (one small all-reduce per call when distributed)."""
        return not all_ranks_agree(self.received is None, device)

    def stop(self, step: int, checkpoint: object) -> StopRequested:
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        return StopRequested(f"{name} at iteration {step}: checkpoint {checkpoint} written; run the same command "
                             "again to resume from it")
