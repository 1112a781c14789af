"""Stopping cleanly: preemption signals, the requeue exit code, non-finite losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

# sysexits' EX_TEMPFAIL: "try again later". The trainer exits with it after checkpointing on SIGTERM/SIGUSR1,
# and slurm/*.sbatch requeue the job when they see it (or `status.json` saying "preempted").
REQUEUE_EXIT_CODE = 75


class Preempted(Exception):
    """Every rank stopped on a signal after saving a checkpoint; rerun with resume=auto to continue."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped on a signal at step {step}; checkpoint {checkpoint}; rerun with resume=auto")
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; names the steps and ranks."""


class StopSignal:
    """SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit at the next agreement point; a second one (more than
    REPEAT_GRACE_S later) exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    REPEAT_GRACE_S = 3.0

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None:
            # Slurm signals every process and torchrun forwards the same signal a moment later: only a repeat
            # that comes later than that means "stop now, no checkpoint".
            if time.monotonic() - self.received_at > self.REPEAT_GRACE_S:
                os._exit(128 + signum)
            return
        self.received, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Put back the handlers that were there before (the default where Python did not set one)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        # After a preemption the process is on its way out with REQUEUE_EXIT_CODE: keep absorbing the launcher's
        # repeat of the signal so it cannot cut that exit short. Any other ending gives the handlers back.
        if exc_type is not Preempted:
            self.restore()


@contextlib.contextmanager
def run_status(run_dir: Path, write: bool):
    """Keep `status.json` saying running / completed / preempted / failed, for wrappers such as slurm/*.sbatch
    (a launcher's own exit code does not carry the trainer's: torchrun reports 1 whatever its workers said)."""

    def put(state: str, **extra) -> None:
        if write:
            tmp = run_dir / ".status.json.tmp"
            tmp.write_text(json.dumps({"state": state, "time": time.time(), **extra}))
            os.replace(tmp, run_dir / "status.json")

    put("running")
    try:
        yield
    except Preempted as e:
        put("preempted", step=e.step, checkpoint=e.checkpoint, exit_code=REQUEUE_EXIT_CODE)
        raise
    except BaseException as e:
        put("failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    put("completed")
