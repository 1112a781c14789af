"""Stopping cleanly: signals (Ctrl-C, preemption, a closed terminal; SIGUSR2 asks for a profile), the exit codes that
say what happened, `status.json`."""

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
    """Every rank stopped on a signal after saving a checkpoint; `command` continues the run."""

    state, exit_code = "preempted", REQUEUE_EXIT_CODE

    def __init__(self, signal_name: str, step: int, checkpoint: str, command: str):
        super().__init__(f"stopped on {signal_name} at step {step}; checkpoint {checkpoint}; continue with: {command}")
        self.step, self.checkpoint = step, checkpoint


class Preempted(Stopped):
    """SIGTERM / SIGUSR1: what Slurm sends before preemption or the time limit. Exit 75: requeue me."""


class Interrupted(Stopped):
    """SIGINT (Ctrl-C), or SIGHUP (the terminal or ssh session closed). Exit 130."""

    state, exit_code = "interrupted", INTERRUPTED_EXIT_CODE


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; names the steps and ranks."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; names the step, the rank and the memory snapshot written before the run failed."""


class StopSignal:
    """Once armed (the run has a directory to checkpoint into), SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGHUP (a
    closed terminal) ask for a checkpoint and a clean exit after the step in progress (`StopPoll`); a second one (more
    than REPEAT_GRACE_S later) exits at once. Before that, they stop the process at once: there is nothing to save
    yet. A SIGHUP that nohup ignores stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    REPEAT_GRACE_S = 3.0

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed, self.command = False, "the same command with run_name=<the run> resume=auto"
        nohup = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                         if not (nohup and sig == signal.SIGHUP)}  # fmt: skip

    def arm(self, command: str | None = None) -> None:
        """From now on a signal checkpoints; `command` is what continues the run (for the messages)."""
        self.armed, self.command = True, command or self.command

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            _leave_closed_terminal()
        if not self.armed:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(f"stopped by {signal.Signals(signum).name} before training started")
        if self.received is not None:
            # Slurm signals every process and torchrun forwards the same signal a moment later (a terminal's Ctrl-C
            # reaches the launcher and its workers at once): only a repeat that comes later than that means
            # "stop now, no checkpoint".
            if time.monotonic() - self.received_at > self.REPEAT_GRACE_S:
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                with contextlib.suppress(OSError):
                    os.write(2, f"{name} again: stopped at once, without a checkpoint (continue from the last one "
                                f"with: {self.command})\n".encode())  # fmt: skip
                remove_partial_files()
                os._exit(128 + signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        if signum == signal.SIGINT:
            print("\nCtrl-C: checkpointing after the step in progress, then stopping (Ctrl-C again to quit at once)",
                  flush=True)  # fmt: skip

    @property
    def requested(self) -> bool:
        return self.received is not None

    def stopped(self, step: int, checkpoint: str) -> Stopped:
        """The exception that ends the run after the checkpoint a signal asked for."""
        # A hangup is the user's side ending the run, as Ctrl-C: "interrupted" (130), continued by the user; never 75,
        # which has the Slurm scripts requeue the job.
        kind = Interrupted if self.received in (signal.SIGINT, signal.SIGHUP) else Preempted
        name = signal.Signals(self.received).name if self.received else "a peer's signal"
        return kind(name, step, checkpoint, self.command)

    def restore(self) -> None:
        """Put back the handlers that were there before (the default where Python did not set one)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def __enter__(self) -> StopSignal:
        return self

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
    """Whether any rank was asked to stop, between step lines too: every rank sends its answer in a one-collective
    exchange about every POLL_S seconds, at steps all ranks work out alike (from the slowest rank's pace, as
    gathered), so a stop request waits about that long whatever log.every_steps is. A step line's exchange carries it
    as well."""

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


class ProfileSignal:
    """SIGUSR2 asks for a profile of the next `log.profile_len` steps: the handler only notes it (`take`), and the
    trainer's next exchange carries the request to every rank, which then profile the same steps
    (`profiling.Profiler`). SIGUSR2's default action ends a process: `hold_profile_requests` handles it from the
    command line's start, and a request that came before the trainer was ready is taken over here."""

    SIGNAL = signal.SIGUSR2
    early = False  # a request noted by `hold_profile_requests`' handler

    def __init__(self) -> None:
        self.pending, ProfileSignal.early = ProfileSignal.early, False
        self.previous = signal.signal(self.SIGNAL, self._handle)

    def _handle(self, _signum: int, _frame) -> None:
        self.pending = True

    def take(self) -> bool:
        """Whether SIGUSR2 arrived since the last call (then it is taken: one request per signal burst)."""
        pending, self.pending = self.pending, False
        return pending

    def restore(self) -> None:
        signal.signal(self.SIGNAL, signal.SIG_DFL if self.previous is None else self.previous)

    def __enter__(self) -> ProfileSignal:
        return self

    def __exit__(self, *_exc) -> None:
        self.restore()


def hold_profile_requests() -> None:
    """Note SIGUSR2 from now on (for `ProfileSignal`): call it before the heavy imports, which take seconds in which
    the signal's default action would end the process. USR2 is never a stop."""

    def note(_signum: int, _frame) -> None:
        ProfileSignal.early = True

    signal.signal(ProfileSignal.SIGNAL, note)


RUN_DIR_FILE_ENV = "CVAE_DIST_RUN_DIR_FILE"


def tell_wrapper(run_dir: Path) -> None:
    """Where a wrapper (slurm/job.sh) asks for it with $CVAE_DIST_RUN_DIR_FILE, write this attempt's run directory
    (absolute) there once it exists: the wrapper then reads that run's `status.json`, whatever run_name or
    output_dir the recipe and overrides gave. No file: this attempt was refused (or died) before its run started."""
    target = os.environ.get(RUN_DIR_FILE_ENV)
    if target:
        write_safely(lambda tmp: tmp.write_text(f"{run_dir.resolve()}\n"), Path(target))


def write_status(run_dir: Path, state: str, **extra) -> None:
    """`status.json`, replaced atomically. Where the disk is full it keeps its previous content and says so."""
    record = strict_json.dumps({"state": state, "time": time.time(), **extra})
    try:
        write_safely(lambda tmp: tmp.write_text(record), run_dir / "status.json")
    except OSError as e:
        log.warning("%s; it still says what it said before", e)


@contextlib.contextmanager
def run_status(run_dir: Path, write: bool):
    """Keep `status.json` saying running / completed / preempted / interrupted / failed, for wrappers such as
    slurm/*.sbatch (a launcher's own exit code does not carry the trainer's: torchrun reports 1 whatever its
    workers said)."""

    def put(state: str, **extra) -> None:
        if write:
            write_status(run_dir, state, **extra)

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
