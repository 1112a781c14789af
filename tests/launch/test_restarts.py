"""torchrun's restart loop: `accelerate launch --max_restarts N` with resume=allow and a stable run name. A rank that
dies takes its group down; torchrun starts the group again, and the same command line continues the run from its
newest checkpoint."""

import contextlib
import subprocess

import psutil
import pytest
import torch
from safetensors.torch import load_file
from support.checks import lines, status, step_losses
from support.launching import ENV, REPO, LaunchResult, launch, launch_command

DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]
LAUNCHER = [*DDP, "--max_restarts", "1"]
# The 500 held-out digits in global batches of 32 (16 a rank): 15 steps an epoch, steps 1..30 over 2 epochs. A step
# line every 2 steps, a checkpoint every 8 and at each epoch's end: steps 8 15 16 24 30.
RUN = [
    "data.train_split=test",
    "data.batch_size=32",
    "train.epochs=2",
    "log.every_steps=2",
    "checkpoint.every_steps=8",
    "train.precision=fp32",
    "resume=allow",
]
# mid-epoch 2, after the checkpoint at 16: a step line is written at the exchange after its own, so the lines of
# steps 18 and 20 are in metrics.jsonl when the victim dies in step 23 (22's is not yet), and the restart drops them
STEPS, CHECKPOINT, KILL_AT, WRITTEN_AFTER = 30, 16, 23, 2
# Measured: the restarted run's exported weights and logged losses equal the uninterrupted run's bit for bit (max
# |diff| 0.0, in every run so far): the same world size, the same checkpoint, the same batches, fp32 on CPU. The
# tolerances leave room for reduction-order noise only, far below what a resume from the wrong step or with lost
# optimizer / RNG state changes.
WEIGHT_TOLERANCE = 1e-6  # absolute, per element
LOSS_TOLERANCE = 1e-6  # relative


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("runs"), "straight", DDP, RUN)


# rank 0 writes metrics.jsonl and status.json (and dies with them open); rank 1 only trains
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_restarts_the_group_and_the_run_continues_from_its_checkpoint(tmp_path, straight, victim):
    # the victim sends itself SIGKILL in step 23 of the first attempt (tests/support/fault_entry.py `die`)
    run = launch_logged(tmp_path, "restarted", fault=("die", KILL_AT, victim))
    output, run_dir = run.output, run.run_dir
    # torchrun keeps one rendezvous store for all attempts: a restarted group that inits env:// on it unprefixed reads
    # the dead attempt's gloo addresses ("connectFullMesh failed ... Connection refused", or a hang in init)
    assert run.returncode == 0, output[-6000:]

    # torchrun saw the rank die and started the group again: two starts, each of 2 processes
    assert f"failed (exitcode: -9) local_rank: {victim}" in output, output[-6000:]
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in output, output[-6000:]
    assert output.count("2 process(es), precision fp32") == 2, output[-6000:]  # rank 0's first line, per start
    # the second start resumed the newest checkpoint and dropped the first attempt's lines after it
    resumed = f"resumed from {run_dir / 'checkpoints' / f'step-{CHECKPOINT:09d}'}: epoch 2, step {CHECKPOINT}"
    assert output.count(resumed) == 1, output[-6000:]
    assert f"metrics.jsonl: dropped {WRITTEN_AFTER} line(s) after step {CHECKPOINT}" in output, output[-6000:]
    assert status(run_dir)["state"] == "completed"

    # metrics.jsonl as if nothing had happened: every step line, epoch line and checkpoint once, the last at 30
    restarted = lines(run_dir)
    assert kinds(restarted) == kinds(lines(straight.run_dir))
    assert [r["step"] for r in restarted if "train/step_loss" in r] == list(range(2, STEPS + 1, 2))
    assert restarted[-1]["step"] == STEPS
    # each rank's record is the second start's, world size 2, its steps counted on from the checkpoint's: the run's
    ranks = [(r["rank"], r["world_size"], r["steps"]) for r in run.ranks()]
    assert ranks == [(0, 2, STEPS), (1, 2, STEPS)]
    assert run.wandb_config()["world_size"] == 2  # the newest W&B run: the second start's

    # the losses after the restart and the final weights are the uninterrupted run's
    after = {s: loss for s, loss in step_losses(run_dir).items() if s > CHECKPOINT}
    want = {s: loss for s, loss in step_losses(straight.run_dir).items() if s > CHECKPOINT}
    assert after == pytest.approx(want, rel=LOSS_TOLERANCE) and len(after) == (STEPS - CHECKPOINT) // 2
    epochs = [e["train/loss"] for e in run.epochs()]
    assert epochs == pytest.approx([e["train/loss"] for e in straight.epochs()], rel=LOSS_TOLERANCE)
    a, b = (load_file(d / "model" / "model.safetensors") for d in (run_dir, straight.run_dir))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= WEIGHT_TOLERANCE, f"final weights differ from the uninterrupted run's by up to {diff:g}"
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # BatchNorm's batch counts
    print(f"restart: final weights within {diff:g} of the uninterrupted run's")


def kinds(records: list[dict]) -> list[tuple[int, str]]:
    """metrics.jsonl's lines as (step, what): step lines, epoch lines and checkpoints (`checkpoint:steps`, ...); not
    straggler reports, which come and go with the load on the machine."""
    kinds = [(r["step"], r.get("event", "epoch" if "train/loss" in r else "step")) for r in records]
    return [k for k in kinds if k[1] in ("step", "epoch") or k[1].startswith("checkpoint:")]


def launch_logged(tmp_path, name: str, fault: tuple, timeout: float = 180) -> LaunchResult:
    """`launch`, with torchrun's agent at LOGLEVEL=INFO (it then says when it restarts the worker group). A launch that
    hangs is killed with every worker (torchrun starts each in a session of its own), and its output so far reported."""
    log_path = tmp_path / f"{name}.log"
    cmd = launch_command(tmp_path, name, LAUNCHER, RUN, fault=fault)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, "LOGLEVEL": "INFO"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait()
            raise AssertionError(
                f"{name}: no result within {timeout} s (hang?)\n{log_path.read_text()[-6000:]}"
            ) from None
    return LaunchResult(proc.returncode, log_path.read_text(), tmp_path / name)
