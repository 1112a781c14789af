"""Ctrl-C (SIGINT), a closed terminal (SIGHUP) and SIGUSR2 at start-up on real `cvae-dist train` processes and
2-process launches."""

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from support.checks import SMALL, leftovers, lines, status, train_argv
from support.launching import ENV, FAULT_ENTRY, REPO, launch_command

from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint

CVAE_DIST = str(Path(sys.executable).with_name("cvae-dist"))


DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_strays():
    """A test that fails while its training runs leaves no processes behind (only those it started)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:  # a launch in its own session: the launcher and its workers
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()


def start(tmp_path: Path, name: str, overrides: list[str], ddp: bool = False, fault=None, **popen) -> subprocess.Popen:
    """`cvae-dist train` (or a 2-process `accelerate launch`, in a session of its own as a terminal's job is);
    `fault`: tests/support/fault_entry.py's arguments, for a single process."""
    if ddp:
        cmd = launch_command(tmp_path, name, DDP, [*SMALL, *overrides])
        popen["start_new_session"] = True
    else:
        entry = [sys.executable, FAULT_ENTRY, *map(str, fault)] if fault else [CVAE_DIST]
        cmd = [*entry, *train_argv(tmp_path, name, *overrides)]
    with (tmp_path / f"{name}.log").open("w") as log:
        STARTED.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, **popen))
    return STARTED[-1]


def wait_until(proc: subprocess.Popen, what: str, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if ready():
                return
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {what} within {timeout} s")


def logged(run_dir: Path, test) -> bool:
    return any(test(r) for r in lines(run_dir))


def output(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


def assert_interrupted(run_dir: Path, before_step: int) -> int:
    """status.json says interrupted (exit code 130) at a step whose checkpoint is complete; returns that step."""
    st = status(run_dir)
    assert st["state"] == "interrupted" and st["exit_code"] == 130, st
    assert 0 < st["step"] < before_step
    assert verify_checkpoint(run_dir / "checkpoints" / f"step-{st['step']:09d}").step == st["step"]
    assert not (run_dir / "model").exists() and not leftovers(run_dir)  # stopped early, nothing half-written
    return st["step"]


@pytest.mark.parametrize("ddp", [False, True], ids=["single-process", "ddp-2-processes"])
def test_ctrl_c_after_the_first_epoch_checkpoints_and_stops(tmp_path, ddp):
    # The user watches epoch 1 finish and presses Ctrl-C in the terminal: the terminal sends SIGINT to the whole
    # foreground process group (the launcher and its workers under accelerate launch).
    proc = start(tmp_path, "run", ["train.epochs=3", "data.batch_size=32"], ddp=ddp)  # 15 steps an epoch
    run_dir = tmp_path / "run"
    wait_until(proc, "the end of epoch 1", lambda: logged(run_dir, lambda r: "train/loss" in r))
    if ddp:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = output(tmp_path, "run")
    step = assert_interrupted(run_dir, 45)
    # after the signal: at epoch 1's end (it landed between the epoch line and the epoch's stop poll, a window that
    # a busy machine widens) or in epoch 2
    assert step >= 15, "stopped before the signal"
    assert "Ctrl-C: checkpointing after the step in progress" in out
    if ddp:  # torchrun exits 1 whatever its workers said: status.json carries the code
        assert proc.returncode != 0
        assert out.count(f"cvae-dist train: stopped on SIGINT at step {step}") == 2, out[-4000:]
        # The only traceback is the launcher's own (torchrun's SignalException); none from the trainer's code.
        assert f'File "{REPO / "cvae_dist"}' not in out, out[-4000:]
    else:
        assert proc.returncode == 130, out[-4000:]
        assert (
            f"stopped on SIGINT at step {step}; checkpoint {run_dir}/checkpoints/step-{step:09d}; continue "
            f"with: cvae-dist train "
            in out
            and f"run_name={run_dir.name} resume=auto\n" in out
        )
        assert "Traceback" not in out, out


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "started-with-sigint-ignored"])
def test_ctrl_c_during_the_first_epoch_checkpoints_and_stops(tmp_path, sigint_ignored):
    # Ctrl-C in the middle of epoch 1. `started-with-sigint-ignored`: the job was started as `cmd &` from a script
    # (a non-interactive shell starts background jobs with SIGINT ignored), and the user then sends it SIGINT
    # (`kill -INT`): it must still checkpoint and stop, not ignore the signal.
    popen = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)} if sigint_ignored else {}
    proc = start(tmp_path, "run", ["train.epochs=2", "data.batch_size=32"], **popen)
    run_dir = tmp_path / "run"
    wait_until(proc, "step 2", lambda: logged(run_dir, lambda r: r.get("step", 0) >= 2))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = output(tmp_path, "run")
    assert proc.returncode == 130, out[-4000:]
    assert_interrupted(run_dir, 15)  # still in epoch 1
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert out.rstrip().splitlines()[-1].startswith("cvae-dist train: stopped on SIGINT at step")


def test_a_second_ctrl_c_more_than_3_s_later_exits_at_once(tmp_path):
    # The user pressed Ctrl-C, the run said it checkpoints after the step in progress, but that step is slow (here it
    # sleeps 60 s): a second Ctrl-C a few seconds later quits at once, without waiting for the checkpoint.
    proc = start(tmp_path, "run", ["train.epochs=2"], fault=("slow", 0, 60))
    wait_until(proc, "training to start", lambda: (tmp_path / "run" / "metrics.jsonl").exists())  # opened once armed
    proc.send_signal(signal.SIGINT)
    # the grace period counts from when the handler ran
    wait_until(proc, "the first Ctrl-C's answer", lambda: "Ctrl-C: checkpointing" in output(tmp_path, "run"))
    time.sleep(3.5)
    assert proc.poll() is None, "the first Ctrl-C must wait for the checkpoint, not quit"
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    proc.wait(timeout=30)
    elapsed = time.monotonic() - second
    out = output(tmp_path, "run")
    assert proc.returncode == 130, out[-4000:]
    assert elapsed < 3, f"took {elapsed:.1f} s after the second Ctrl-C"
    assert out.count("Ctrl-C: checkpointing after the step in progress") == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(
        "Ctrl-C again: stopped at once, without a checkpoint (continue from the last one with: cvae-dist train "
    ) and last.endswith("run_name=run resume=auto)"), last
    assert checkpoint_dirs(tmp_path / "run") == [] and not leftovers(tmp_path / "run")


@pytest.fixture(autouse=True)
def hangup_as_in_a_terminal():
    """A terminal's jobs start with SIGHUP at its default action; under nohup it is ignored, and the trainers these
    tests start would inherit that."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, before)


def start_on_a_terminal(tmp_path: Path, name: str, overrides: list[str]) -> tuple[subprocess.Popen, int]:
    """`cvae-dist train` in a session of its own whose controlling terminal is a pseudo-terminal, as a login shell's
    job is (an ssh session's, a terminal window's); returns the process and the terminal's other end (close it: the
    terminal hangs up and the kernel sends SIGHUP to the session's leader, the trainer)."""
    master, terminal = os.openpty()
    STARTED.append(
        subprocess.Popen(
            [CVAE_DIST, *train_argv(tmp_path, name, *overrides)],
            cwd=REPO,
            env=ENV,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0),
        )
    )
    os.close(terminal)
    return STARTED[-1], master


def read_terminal(master: int) -> bool:
    """Read what the trainer wrote to its terminal so far (a full terminal would block its writes); False."""
    while select.select([master], [], [], 0)[0] and os.read(master, 65536):
        pass
    return False


@pytest.mark.parametrize("how", ["terminal-closed", "kill-hup", "ddp-2-processes"])
def test_a_hangup_checkpoints_and_stops_as_ctrl_c_does(tmp_path, how):
    # The terminal or ssh session the run was started from is closed. `terminal-closed`: its pseudo-terminal hangs
    # up, which sends SIGHUP, and every later write to it fails (EIO), so the run cannot print its way out.
    # `kill-hup`: the signal alone, its messages kept. `ddp-2-processes`: the launcher gets it and passes it on.
    overrides = ["train.epochs=2", "data.batch_size=32"]  # 15 steps an epoch
    run_dir = tmp_path / "run"
    if how == "terminal-closed":
        proc, master = start_on_a_terminal(tmp_path, "run", overrides)
        wait_until(proc, "step 2", lambda: read_terminal(master) or logged(run_dir, lambda r: r.get("step", 0) >= 2))
        os.close(master)
    else:
        proc = start(tmp_path, "run", overrides, ddp=how == "ddp-2-processes")
        wait_until(proc, "step 2", lambda: logged(run_dir, lambda r: r.get("step", 0) >= 2))
        if how == "ddp-2-processes":  # the terminal's session: the launcher, which passes it on to the ranks
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            proc.send_signal(signal.SIGHUP)
    proc.wait(timeout=120)
    step = assert_interrupted(run_dir, 15)  # stopped in epoch 1: status.json says interrupted, exit code 130
    if how == "terminal-closed":
        assert proc.returncode == 130
        return
    out = output(tmp_path, "run")
    said = f"cvae-dist train: stopped on SIGHUP at step {step}; checkpoint {run_dir}/checkpoints/step-{step:09d}"
    if how == "ddp-2-processes":
        assert proc.returncode != 0 and out.count(said) == 2, out[-4000:]
    else:
        assert proc.returncode == 130 and out.rstrip().splitlines()[-1].startswith(said), out[-4000:]
        assert "Traceback" not in out, out


def test_sigusr2_during_start_up_does_not_stop_the_run(tmp_path):
    # USR2 asks for a profile and is never a stop, also while the command line still imports torch and the rest
    # (seconds): the request is kept and profiles the first steps.
    proc = start(tmp_path, "run", ["data.batch_size=32"])  # 15 steps
    proc_dir = Path(f"/proc/{proc.pid}")

    def handled_or_importing() -> bool:  # (the handler must come before the heavy imports: then USR2 is safe)
        if b"run_name=run" not in (proc_dir / "cmdline").read_bytes():  # not yet the trainer (before its exec)
            return False
        caught = int(re.search(r"SigCgt:\s*(\w+)", (proc_dir / "status").read_text())[1], 16) >> (signal.SIGUSR2 - 1)
        return bool(caught & 1) or "libtorch" in (proc_dir / "maps").read_text()

    deadline = time.monotonic() + 60
    while not handled_or_importing():
        assert proc.poll() is None and time.monotonic() < deadline, "no start within 60 s"
        time.sleep(0.005)
    sent = 0
    while not (tmp_path / "run").exists() and proc.poll() is None:  # all through the start-up
        proc.send_signal(signal.SIGUSR2)
        sent += 1
        time.sleep(0.5)
    proc.wait(timeout=300)
    out = output(tmp_path, "run")
    assert proc.returncode == 0 and sent >= 2, out[-4000:]
    assert status(tmp_path / "run")["state"] == "completed"
    assert re.search(r"SIGUSR2 \(rank 0\) at step \d+: profiling steps", out), out[-4000:]
