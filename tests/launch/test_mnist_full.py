"""Real launches on the full MNIST set (60,000 digits converted from the IDX files)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from support.launching import ENV, REPO, launch, launch_command, wait_for_step

MNIST = "configs/mnist.yaml"


DDP2 = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]


DDP3 = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "3"]


ONE = ["--config_file", "launch/cpu_debug.yaml"]


STEPS = 40  # of the 468 in an epoch


RUN = [
    f"train.max_steps={STEPS}",
    "log.every_steps=10",
    "checkpoint.every_steps=20",
    "log.sample_ids=true",
    "train.precision=fp32",
]


# Runs at different world sizes see different batches (each rank reads its own part) and BatchNorm statistics over
# 43 instead of 128 images: their losses agree statistically, not bit for bit (as in test_distributed.py).
LOSS_TOLERANCE = 0.05


LAUNCH_TIMEOUT = 600  # s: every rank decodes 60,000 digits before its first step, on a small shared machine


def source(mnist_full: Path) -> list[str]:
    return [f"data.source={mnist_full}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist_runs")


@pytest.fixture(scope="module")
def ddp(runs, mnist_full):
    """2 ranks, 60 steps, W&B offline (its config is checked): the 2-rank checks and the uninterrupted reference."""
    return launch(runs, "ddp", DDP2, [*source(mnist_full), *RUN], timeout=LAUNCH_TIMEOUT, config=MNIST)


def test_two_ranks_full_set_equal_steps_disjoint_ids_loss_falls_export(ddp, mnist_full):
    config = ddp.wandb_config()
    assert config["world_size"] == 2 and config["backend"] == "MULTI_CPU"
    assert (config["global_batch_size"], config["per_rank_batch_size"]) == (128, 64)
    assert config["steps_per_epoch"] == 468  # 2 ranks x 30,000 rows (4 whole shards each) // 64
    assert config["data"]["source"] == str(mnist_full) and config["data"]["train_split"] == "train"
    assert "468 steps per epoch (59904 images)" in ddp.output
    ranks = ddp.ranks()
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [(r["steps"], r["steps_per_epoch"]) for r in ranks] == [(STEPS, [STEPS])] * 2  # equal steps
    ids = [r["ids"]["1"] for r in ranks]
    assert [len(i) for i in ids] == [STEPS * 64] * 2 and all(len(set(i)) == len(i) for i in ids)
    assert not set(ids[0]) & set(ids[1])  # disjoint
    assert all(0 <= i < 60_000 for i in ids[0] + ids[1])  # the official training digits' ids
    losses = ddp.step_losses()
    assert len(losses) == STEPS // 10 and losses[-1] < 0.6 * losses[0]  # it learns
    assert ddp.epochs() == []  # train.max_steps ends the run inside epoch 1: no epoch line for it
    assert (ddp.run_dir / "model" / "model.safetensors").is_file() and (ddp.run_dir / "model" / "config.json").is_file()
    assert len({r["param_sha256"] for r in ranks}) == 1


def test_sigterm_mid_epoch_resumes_exactly_on_the_full_set(tmp_path, ddp, mnist_full):
    overrides = [*source(mnist_full), *RUN]
    log = (tmp_path / "preempted.log").open("w")
    cmd = launch_command(tmp_path, "preempted", DDP2, overrides, config=MNIST)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    run_dir = tmp_path / "preempted"
    try:
        wait_for_step(run_dir, 10, proc, timeout=LAUNCH_TIMEOUT)
        os.kill(proc.pid, signal.SIGTERM)  # the launcher's: torchrun forwards it to the ranks
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", (tmp_path / "preempted.log").read_text()[-4000:]
    stopped_at = status["step"]
    assert 10 <= stopped_at < STEPS and (run_dir / "checkpoints" / f"step-{stopped_at:09d}").is_dir()

    resumed = launch(tmp_path, "preempted", DDP2, [*overrides, "resume=auto"], timeout=LAUNCH_TIMEOUT, config=MNIST)
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:09d}'}" in resumed.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert [r["steps"] for r in resumed.ranks()] == [STEPS] * 2  # the run's, counted on from the checkpoint
    # the interrupted epoch's ids: this launch's (the first launch's part of the epoch ended with it)
    assert [r["ids"]["1"] for r in resumed.ranks()] == [r["ids"]["1"][stopped_at * 64 :] for r in ddp.ranks()]
    straight = {r["rank"]: r["param_sha256"] for r in ddp.ranks()}
    assert {r["rank"]: r["param_sha256"] for r in resumed.ranks()} == straight  # bit-identical parameters
    assert resumed.step_losses() == ddp.step_losses()  # every step line, before and after the signal
    assert [e["train/loss"] for e in resumed.epochs()] == [e["train/loss"] for e in ddp.epochs()]


def test_three_ranks_share_the_global_batch_and_track_one_rank_on_the_full_set(runs, mnist_full):
    overrides = [
        *source(mnist_full),
        "train.max_steps=20",
        "log.every_steps=10",
        "log.sample_ids=true",
        "train.precision=fp32",
        "log.wandb=disabled",
    ]
    three = launch(runs, "three", DDP3, overrides, timeout=LAUNCH_TIMEOUT, config=MNIST)
    one = launch(runs, "one", ONE, overrides, timeout=LAUNCH_TIMEOUT, config=MNIST)
    # resident: every rank slices its share of the same global batches (43 / 43 / 42), 468 of them at any world size
    assert "128 images per step (43 on this rank), 468 steps per epoch" in three.output
    assert "128 images per step (128 on this rank), 468 steps per epoch" in one.output
    ranks = three.ranks()
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 3), (1, 3), (2, 3)]
    assert [(r["steps"], r["steps_per_epoch"]) for r in ranks] == [(20, [20])] * 3  # equal steps
    ids = [r["ids"]["1"] for r in ranks]
    assert [len(i) // 20 for i in ids] == [43, 43, 42] and [len(i) % 20 for i in ids] == [0, 0, 0]
    assert len(set().union(*map(set, ids))) == 20 * 128  # disjoint
    assert len(one.ranks()[0]["ids"]["1"]) == 20 * 128
    mine = [iter(i) for i in ids]  # the ranks' shares, in rank order, are the one-process run's batches
    assert [
        x for _ in range(20) for r, share in enumerate((43, 43, 42)) for x in itertools.islice(mine[r], share)
    ] == one.ranks()[0]["ids"]["1"]
    a, b = three.step_losses(), one.step_losses()
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, rel=LOSS_TOLERANCE)
