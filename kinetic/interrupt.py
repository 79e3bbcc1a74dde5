"""Stop a run cleanly on SIGTERM or Ctrl-C: finish the step, write a checkpoint, say how to resume.

The first SIGTERM (what schedulers and `kill` send) or SIGINT (Ctrl-C) only sets
`StopRequest.signal`; the loop reads it after each step, writes a checkpoint and returns. The
handlers are then put back as they were, so a second Ctrl-C raises `KeyboardInterrupt` at once
(Python's default) and a second SIGTERM terminates the process at once: a user who does not want
to wait for the step or the checkpoint does not have to.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["SIGNALS", "RunInterrupted", "StopRequest", "resume_command"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Overrides that a resume command replaces with its own.
_RUN_KEYS = ("resume=", "overwrite=", "hydra.run.dir=", "+resume=", "+overwrite=")


class RunInterrupted(Exception):
    """The run stopped on a signal after `step`, with a checkpoint at `checkpoint`.

    `exit_code` is the conventional 128 + signal number (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signal: str, exit_code: int, step: int, checkpoint: Path | None) -> None:
        self.signal, self.exit_code, self.step, self.checkpoint = (
            signal,
            exit_code,
            step,
            checkpoint,
        )
        super().__init__(f"{signal}: stopped after step {step}; checkpoint: {checkpoint}")


class StopRequest:
    """A context manager that turns the first SIGTERM/SIGINT into a request to stop.

    `signal` is None until a signal arrives, then its name ("SIGTERM", "SIGINT");
    `exit_code` is the conventional 128 + signal number. Outside the main thread (where Python
    cannot install handlers) it installs nothing and `signal` stays None.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.signal = signal.Signals(signum).name
        self._restore()  # the next signal acts at once
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(
            f"\n{self.signal}: finishing this step and writing a checkpoint "
            f"({again} again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )


def resume_command(run_dir: str | Path, overrides: Sequence[str], program: str = "train.py") -> str:
    """The command line that continues the run in `run_dir` from its latest checkpoint: the
    run's own overrides (its resume, overwrite and run-directory keys replaced), quoted for a
    POSIX shell."""
    kept = [o for o in overrides if not o.startswith(_RUN_KEYS)]
    words = ["python", program, *kept, f"hydra.run.dir={run_dir}", "resume=auto"]
    return " ".join(shlex.quote(str(w)) for w in words)
