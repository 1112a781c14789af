"""Faults under real launches: SIGTERM and requeue, a dead rank, a NaN loss, a changed world size."""

import json
import os
import shlex
import signal
import subprocess
import time

import psutil
import pytest
from support.checks import FINISHED, SMALL, snapshot
from support.launching import DEBUG, ENV, REPO, launch, launch_command, wait_for_step

from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint
from cvae_dist.faults import REQUEUE_EXIT_CODE

DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]


RUN = ["train.epochs=1", "log.every_steps=5", "checkpoint.every_steps=20"]  # 35 steps


def start(tmp_path, name, overrides):
    log = (tmp_path / f"{name}.log").open("w")
    cmd = launch_command(tmp_path, name, DDP, overrides)
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def workers(proc):
    return sorted(
        (p for p in psutil.Process(proc.pid).children(recursive=True) if "cvae_dist.cli" in " ".join(p.cmdline())),
        key=lambda p: p.pid,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("runs"), "straight", DDP, RUN)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_exactly(tmp_path, uninterrupted):
    proc = start(tmp_path, "preempted", RUN)
    run_dir = tmp_path / "preempted"
    wait_for_step(run_dir, 10, proc)  # mid-epoch (35 steps)
    os.kill(proc.pid, signal.SIGTERM)  # what Slurm sends before preemption; torchrun forwards it to the ranks
    proc.wait(timeout=120)
    output = (tmp_path / "preempted.log").read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == REQUEUE_EXIT_CODE
    # torchrun reports its own failure when signalled (1, or 143 where it exits by the signal), whatever its workers
    # said: status.json carries the requeue code for wrappers (slurm/*.sbatch read it).
    assert proc.returncode != 0
    assert "got signal: 15" in output or "Received 15 death signal" in output, output[-4000:]  # torchrun's own words
    stopped_at = status["step"]
    assert 10 <= stopped_at < 35 and (run_dir / "checkpoints" / f"step-{stopped_at:09d}").is_dir()

    resumed = launch(tmp_path, "preempted", DDP, [*RUN, "resume=auto"])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:09d}'}" in resumed.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert [r["steps"] for r in resumed.ranks()] == [35] * 2  # the run's steps, the first launch's included
    straight = {r["rank"]: r["param_sha256"] for r in uninterrupted.ranks()}
    assert {r["rank"]: r["param_sha256"] for r in resumed.ranks()} == straight  # bit-identical parameters
    assert resumed.step_losses() == uninterrupted.step_losses()
    assert [e["train/loss"] for e in resumed.epochs()] == [e["train/loss"] for e in uninterrupted.epochs()]


def test_single_process_exits_with_the_requeue_code(tmp_path):
    cmd = [
        str(REPO / ".venv/bin/cvae-dist") if (REPO / ".venv/bin/cvae-dist").exists() else "cvae-dist",
        "train",
        "--config",
        str(DEBUG),
        f"output_dir={tmp_path}",
        "run_name=solo",
        "log.wandb=disabled",
        *RUN,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path / "solo", 10, proc)
    proc.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@<seconds> before the time limit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    # the message names the command that continues this run (its name given: the default would start a new one)
    command = shlex.split(out.split("continue with: ")[1].splitlines()[0])
    assert command[:2] == ["cvae-dist", "train"] and command[-2:] == ["run_name=solo", "resume=auto"], command
    resumed = subprocess.run([cmd[0], *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "solo" / "status.json").read_text())["state"] == "completed"


QUIET = ["train.epochs=2", "log.every_steps=1000", "checkpoint.every_epoch=false"]  # 70 steps, no step line


def test_a_signal_between_step_lines_checkpoints_there_and_resumes_exactly(tmp_path):
    # Step lines 1000 steps apart (beyond the run): only the stop poll between them can see the signal in time.
    straight = launch(tmp_path, "straight", DDP, QUIET)
    proc = start(tmp_path, "quiet", QUIET)
    run_dir = tmp_path / "quiet"
    wait_for_step(run_dir, 0, proc)  # the run's "started" line
    time.sleep(2)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", (tmp_path / "quiet.log").read_text()[-3000:]
    stopped_at = status["step"]
    assert 0 < stopped_at < 70 and verify_checkpoint(run_dir / "checkpoints" / f"step-{stopped_at:09d}")
    resumed = launch(tmp_path, "quiet", DDP, [*QUIET, "resume=auto"])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:09d}'}" in resumed.output
    # the loss sums up to the poll's step were in the checkpoint: the epochs' losses are the uninterrupted run's
    assert [e["train/loss"] for e in resumed.epochs()] == [e["train/loss"] for e in straight.epochs()]
    print(f"stopped at step {stopped_at} of 70 (no step line in the run)")


def test_dead_rank_fails_the_job_within_the_timeout(tmp_path):
    timeout_s = 20
    proc = start(tmp_path, "dead", [*RUN, "train.epochs=5", f"train.collective_timeout_s={timeout_s}"])
    wait_for_step(tmp_path / "dead", 5, proc)
    victim = workers(proc)[1]
    killed = time.monotonic()
    victim.kill()  # kill -9 of rank 1
    proc.wait(timeout=timeout_s + 60)
    elapsed = time.monotonic() - killed
    output = (tmp_path / "dead.log").read_text()
    assert proc.returncode != 0
    assert elapsed < timeout_s + 30, f"took {elapsed:.0f} s"
    assert "Signal 9 (SIGKILL)" in output and "rank      : 1" in output  # the lost rank is named
    assert not list((tmp_path / "dead" / "checkpoints").glob(".partial-*"))
    print(f"kill -9 to launch exit: {elapsed:.1f} s")


def test_nan_loss_stops_naming_steps_and_rank_and_keeps_the_last_checkpoint(tmp_path):
    run = launch(tmp_path, "nan", DDP, [*RUN, "checkpoint.every_steps=10"], check=False, fault=("nan", 12, 1))
    assert run.returncode != 0
    assert "non-finite loss in steps 11-15 (first at step 12 on rank(s) [1]; then on rank(s) [0, 1])" in run.output
    assert json.loads((run.run_dir / "status.json").read_text())["state"] == "failed"

    assert [d.name for d in checkpoint_dirs(run.run_dir)] == ["step-000000010"]  # nothing saved after the NaN
    assert verify_checkpoint(checkpoint_dirs(run.run_dir)[0]).step == 10


STOP_AT_ONCE_WHILE_WRITING = """
import os, signal, sys, time
from pathlib import Path
from cvae_dist import faults
from cvae_dist.files import write_safely

faults.StopSignal.REPEAT_GRACE_S = 0.0
faults.StopSignal().arm()

def write(tmp):
    tmp.write_bytes(b"half an image")
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: checkpoint after this step
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)  # the second: stop at once, here, in the middle of the write
    time.sleep(5)

write_safely(write, Path(sys.argv[1]) / "epoch_002.png")
"""


def test_a_second_ctrl_c_in_the_middle_of_a_write_leaves_no_half_file(tmp_path):
    proc = subprocess.run(
        [os.sys.executable, "-c", STOP_AT_ONCE_WHILE_WRITING, str(tmp_path)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "Ctrl-C again: stopped at once" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the image nor its .partial file


def test_resume_of_a_streamed_run_with_another_world_size_is_refused_and_changes_nothing(tmp_path):
    # A streamed split (larger than data.resident_mb) is dealt to the ranks by its shards: a 1-process run resumed
    # by a 2-process launch would change which digits each step sees. Refused on every rank, naming the world size
    # to relaunch with; the run is untouched. (A resident split resumes on any world size: test_world_size.py.)
    streamed = [*SMALL, *FINISHED, "data.resident_mb=0"]
    assert launch(tmp_path, "run", ["--config_file", "launch/cpu_debug.yaml"], streamed).returncode == 0
    run = tmp_path / "run"
    before = snapshot(run)
    result = launch(tmp_path, "run", DDP, [*streamed, "resume=auto"], check=False)
    assert result.returncode != 0
    refusal = "written by 1 rank(s), this launch has 2; a streamed split is dealt to the ranks by its shards"
    assert result.output.count(refusal) == 2, result.output[-4000:]  # one line from each rank
    assert "relaunch with 1 processes" in result.output
    assert f'File "{REPO / "cvae_dist"}' not in result.output, result.output[-4000:]  # no traceback of ours
    assert snapshot(run) == before


def test_a_second_launch_into_a_running_run_is_refused_and_a_dead_runs_lock_is_not_in_the_way(tmp_path):
    cvae_dist = str(REPO / ".venv/bin/cvae-dist") if (REPO / ".venv/bin/cvae-dist").exists() else "cvae-dist"
    argv = [
        cvae_dist,
        "train",
        "--config",
        str(DEBUG),
        f"output_dir={tmp_path}",
        "run_name=busy",
        "log.wandb=disabled",
        "data.train_split=test",
        "data.batch_size=32",
        "log.every_steps=5",
        "checkpoint.every_steps=5",
    ]
    first = subprocess.Popen(
        [*argv, "train.epochs=1000"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    run_dir = tmp_path / "busy"
    try:
        wait_for_step(run_dir, 5, first)
        second = subprocess.run(
            [*argv, "train.epochs=1000", "resume=auto"], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = [x for x in second.stderr.splitlines() if x.strip()]
        assert f"run {run_dir} is in use by pid {first.pid} on " in line and "one launch trains a run at a time" in line
        assert first.poll() is None  # the first run trains on
    finally:
        first.kill()  # kill -9: no handler runs, the lock file stays behind
        first.wait()
    assert (run_dir / ".lock").is_file()
    step = verify_checkpoint(checkpoint_dirs(run_dir)[-1]).step
    third = subprocess.run(
        [*argv, "resume=auto", f"train.max_steps={step + 1}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
