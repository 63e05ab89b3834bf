"""Expected failures: bad input, a missing or corrupt file, a held lock, a diverged run.

Each carries one message that names the file or key and the fix. `dmd2` prints it as one `error:` line and exits
non-zero, without a traceback; set DMD2_DEBUG=1 to get the traceback as well.
"""


class Dmd2Error(Exception):
    """Base of every expected failure (the CLI prints these without a traceback)."""


class CheckpointError(Dmd2Error, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or cannot be written."""


class RunLockedError(Dmd2Error, RuntimeError):
    """Another live process is writing the same run directory."""


class TrainingDiverged(Dmd2Error, FloatingPointError):
    """A loss or an intermediate value became non-finite; the last good checkpoint is intact."""


class MissingInputError(Dmd2Error, FileNotFoundError):
    """A stage's input is missing: the message names it and the command that writes it."""


class LaunchError(Dmd2Error, RuntimeError):
    """The launch settings cannot run here (e.g. several machines outside Slurm)."""


EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the same command will carry on


class StopRequested(Dmd2Error):
    """A training run stopped by a signal after writing its checkpoint (dmd2.stopping); the CLI prints one
    `stopped:` line and exits with EXIT_RESUMABLE, and rerunning the command resumes it."""
