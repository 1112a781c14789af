"""Stopping cleanly: signals (Ctrl-C, preemption, a closed terminal; SIGUSR2: a profile), exit codes, `status.json`."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from cvae_dist import strict_json
from cvae_dist.files import remove_partial_files, write_safely

log = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL: "try again later". The trainer exits with it after checkpointing on SIGTERM/SIGUSR1,
# and slurm/*.sbatch requeue the job when they see it (or `status.json` saying "preempted").
REQUEUE_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class Stopped(Exception):
    """Every rank stopped on a signal after saving a checkpoint; `command` continues the run. SIGTERM / SIGUSR1 (what
    Slurm sends before preemption or the time limit): "preempted", exit 75; SIGINT (Ctrl-C), SIGHUP: "interrupted"."""

    state, exit_code = "preempted", REQUEUE_EXIT_CODE

    def __init__(self, signum: int | None, step: int, checkpoint: str, command: str):
        name = signal.Signals(signum).name if signum else "a peer's signal"
        super().__init__(f"stopped on {name} at step {step}; checkpoint {checkpoint}; continue with: {command}")
        self.step, self.checkpoint = step, checkpoint
        if signum in (signal.SIGINT, signal.SIGHUP):  # the user's side ended the run (a hangup too): never requeued
            self.state, self.exit_code = "interrupted", INTERRUPTED_EXIT_CODE


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; names the steps and ranks."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; names the step, the rank and the memory snapshot written before the run failed."""


class _Handlers(contextlib.AbstractContextManager):
    """Signal handlers for a `with` block; `restore` puts back `previous` (the default where Python set none)."""

    previous: dict

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def __exit__(self, *_exc) -> None:
        self.restore()


class StopSignal(_Handlers):
    """Once armed, SIGINT, SIGTERM, SIGUSR1 and SIGHUP ask for a checkpoint after the step in progress (`StopPoll`)
    and a repeat more than REPEAT_GRACE_S later exits at once; unarmed, they exit at once. nohup's SIGHUP stays off."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    REPEAT_GRACE_S = 3.0

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed, self.command = False, "the same command with run_name=<the run> resume=auto"
        nohup = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS if not (nohup and s == signal.SIGHUP)}

    def arm(self, command: str | None = None) -> None:
        """From now on a signal checkpoints; `command` is what continues the run (for the messages)."""
        self.armed, self.command = True, command or self.command

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            _leave_closed_terminal()
        if not self.armed:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(f"stopped by {name} before training started")
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            if signum == signal.SIGINT:
                print(
                    "\nCtrl-C: checkpointing after the step in progress, then stopping (Ctrl-C again to quit at once)",
                    flush=True,
                )
            return
        # Slurm signals every process and torchrun forwards the same signal a moment later (a terminal's Ctrl-C reaches
        # the launcher and its workers at once): only a repeat later than that means "stop now, no checkpoint".
        if time.monotonic() - self.received_at > self.REPEAT_GRACE_S:
            said = f"{'Ctrl-C' if signum == signal.SIGINT else name} again: stopped at once, without a checkpoint"
            with contextlib.suppress(OSError):
                os.write(2, f"{said} (continue from the last one with: {self.command})\n".encode())
            remove_partial_files()
            os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def stopped(self, step: int, checkpoint: str) -> Stopped:
        """The exception that ends the run after the checkpoint a signal asked for."""
        return Stopped(self.received, step, checkpoint, self.command)

    def __exit__(self, exc_type, *_exc) -> None:
        # After a signal the process is on its way out with its exit code: keep absorbing the launcher's repeat of
        # the signal so it cannot cut that exit short. Any other ending gives the handlers back.
        if exc_type is None or not issubclass(exc_type, Stopped):
            self.restore()


def _leave_closed_terminal() -> None:
    """After a hangup every write to the closed terminal fails (EIO): the next print would end the run before its
    checkpoint. stdout and stderr, where they were that terminal, go to /dev/null instead."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            try:
                os.write(fd, b"")  # a file or a live terminal takes it
            except OSError:
                os.dup2(null, fd)
        os.close(null)


def resume_command(cfg) -> str:
    """The command that continues this run: this launch's arguments, with the run's name and resume=auto."""
    args = sys.argv[1:]
    args = args[args.index("train") + 1 :] if "train" in args else args
    kept = [a for a in args if not a.startswith(("run_name=", "resume="))]
    command = shlex.join(["cvae-dist", "train", *kept, f"run_name={cfg.run_name}", "resume=auto"])
    launched = "LOCAL_RANK" in os.environ  # under accelerate launch / torchrun: the same launcher again
    return f"{command} (under the same launcher)" if launched else command


class StopPoll:
    """Whether any rank was asked to stop: an exchange about every POLL_S seconds, at steps every rank works out alike
    from the slowest rank's pace, so a stop waits about that long whatever log.every_steps is."""

    POLL_S = 1.0

    def __init__(self, step: int):
        self.next, self.gap = step + 1, 1  # the first poll learns the pace
        self.since, self.since_step = time.perf_counter(), step

    def due(self, step: int) -> bool:
        return step >= self.next

    def local(self, requested: bool, step: int) -> dict[str, float]:
        """This rank's part of the exchange sent at `step`; the next poll is due `gap` steps on."""
        now = time.perf_counter()
        pace = (now - self.since) / max(step - self.since_step, 1)
        self.since, self.since_step, self.next = now, step, step + self.gap
        return {"stop": float(requested), "poll/seconds_per_step": pace}

    def polled(self, gathered: dict) -> bool:
        """An exchange read: the polls' spacing from the slowest rank's pace; true where some rank asked to stop."""
        self.gap = max(1, int(self.POLL_S / max(gathered["poll/seconds_per_step"].max().item(), 1e-6)))
        return bool(gathered["stop"].any())


class ProfileSignal(_Handlers):
    """SIGUSR2 asks for a profile of the next `log.profile_len` steps: noted here (`take`), the trainer's next exchange
    carries it to every rank. Takes over a request `hold_profile_requests` noted."""

    SIGNAL = signal.SIGUSR2
    early = False  # a request noted by `hold_profile_requests`' handler

    def __init__(self) -> None:
        self.pending, ProfileSignal.early = ProfileSignal.early, False
        self.previous = {self.SIGNAL: signal.signal(self.SIGNAL, self._handle)}

    def _handle(self, _signum: int, _frame) -> None:
        self.pending = True

    def take(self) -> bool:
        """Whether SIGUSR2 arrived since the last call (then it is taken: one request per signal burst)."""
        pending, self.pending = self.pending, False
        return pending


def hold_profile_requests() -> None:
    """Note SIGUSR2 from now on (for `ProfileSignal`): call it before the heavy imports, which take seconds in which
    the signal's default action would end the process. USR2 is never a stop."""
    signal.signal(ProfileSignal.SIGNAL, lambda *_: setattr(ProfileSignal, "early", True))


def tell_wrapper(run_dir: Path) -> None:
    """Write the run directory where a wrapper (slurm/job.sh) asks for it ($CVAE_DIST_RUN_DIR_FILE)."""
    target = os.environ.get("CVAE_DIST_RUN_DIR_FILE")
    if target:
        write_safely(lambda tmp: tmp.write_text(f"{run_dir.resolve()}\n"), Path(target))


@contextlib.contextmanager
def run_status(run_dir: Path, write: bool):
    """`status.json` says running / completed / preempted / interrupted / failed (torchrun exits 1 whatever it is)."""

    def put(state: str, **extra) -> None:
        record = strict_json.dumps({"state": state, "time": time.time(), **extra})
        try:
            if write:
                write_safely(lambda tmp: tmp.write_text(record), run_dir / "status.json")
        except OSError as e:  # a full disk: the file keeps its previous content
            log.warning("%s; it still says what it said before", e)

    put("running")
    try:
        yield
    except Stopped as e:
        put(e.state, step=e.step, checkpoint=e.checkpoint, exit_code=e.exit_code)
        raise
    except BaseException as e:
        put("failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    put("completed")
