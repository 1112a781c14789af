"""Per-rank telemetry from real 2-process launches, read back from metrics.jsonl and the offline W&B run."""

import itertools
import re

import pytest
from support.checks import lines
from support.launching import launch
from support.wandb_offline import read_run

from cvae_dist.telemetry import RANK_FIELDS

DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]


ONE_EPOCH = ["train.epochs=1", "log.every_steps=5", "train.precision=fp32"]


def test_ddp_reduces_gradients_the_same_with_telemetry_on_and_off(tmp_path):
    """Telemetry times DDP's all-reduce and changes nothing in it: with it on and off, two DDP ranks take the same
    steps bit for bit (step losses and the weights after three AdamW updates, whose update is lr * g / |g|)."""
    import torch
    from safetensors.torch import load_file

    steps = ["data.train_split=test", "train.max_steps=3", "log.every_steps=1", "train.precision=fp32"]
    runs = {on: launch(tmp_path, f"telemetry-{on}", DDP, [*steps, f"log.telemetry={on}"]) for on in ("true", "false")}
    losses = {
        on: [r["train/step_loss"] for r in lines(run.run_dir) if "train/step_loss" in r] for on, run in runs.items()
    }
    assert len(losses["true"]) == 3 and losses["true"] == losses["false"]
    weights = {on: load_file(str(run.run_dir / "model" / "model.safetensors")) for on, run in runs.items()}
    assert weights["true"].keys() == weights["false"].keys()
    for name, w in weights["true"].items():
        assert torch.equal(w, weights["false"][name]), name
    waits = [r["rank/0/sync_wait_frac"] for r in lines(runs["true"].run_dir) if "rank/0/sync_wait_frac" in r]
    assert len(waits) == 3 and max(waits) > 0  # the wait timers ran


def test_every_rank_is_visible_in_wandb(tmp_path):
    run = launch(tmp_path, "telemetry", DDP, [*ONE_EPOCH, "log.peak_tflops=1"])  # (a CPU's MFU needs a peak given)
    wb = read_run(run.run_dir)
    rows = [r for r in wb.history if "throughput/global_img_per_s" in r]
    assert len(rows) == 7  # 35 steps / 5
    for row in rows:
        for r in (0, 1):
            for name in RANK_FIELDS:
                assert f"rank/{r}/{name}" in row
            assert row[f"rank/{r}/img_per_s"] > 0 and row[f"rank/{r}/busy_img_per_s"] > 0
            assert row[f"rank/{r}/peak_mem_mb"] > 0 and 0 < row[f"rank/{r}/mfu"] < 1
        assert row["images_seen"] == row["step"] * 128
    assert wb.config["world_size"] == 2 and wb.config["precision"] == "fp32"
    assert wb.config["train"]["precision"] == "fp32" and wb.config["backend"] == "MULTI_CPU"
    assert len(wb.config["hosts"]) == 2 and wb.config["torch_version"] and wb.config["accelerate_version"]
    assert wb.config["flops_per_image"] == 75_497_472
    # img/s against the clock: between two consecutive step lines the job trained 5 steps x 128 images (64 per
    # rank) in the wall time between the lines' `time` stamps in metrics.jsonl (the first interval also holds the
    # start, so it is left out). Loose: other work on the machine shifts the lines a little.
    steps = [r for r in lines(run.run_dir) if "train/step_loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30, 35]
    for before, after in itertools.pairwise(steps):
        seconds = after["time"] - before["time"]
        assert after["throughput/global_img_per_s"] == pytest.approx(5 * 128 / seconds, rel=0.2)
        for r in (0, 1):
            assert after[f"rank/{r}/img_per_s"] == pytest.approx(5 * 64 / seconds, rel=0.2)
    # the same figures without W&B, and the end-of-run table
    jsonl = [r for r in lines(run.run_dir) if "rank/1/img_per_s" in r]
    assert [r["rank/1/img_per_s"] for r in jsonl] == pytest.approx([r["rank/1/img_per_s"] for r in rows])
    table = run.output[run.output.index("per-rank throughput") :]
    assert re.search(r"^\s+0\s+\S+\s+[\d,]+\s+[\d,]+\s+[\d.]+%", table, re.M)
    assert re.search(r"^\s+1\s+\S+\s+[\d,]+\s+[\d,]+\s+[\d.]+%", table, re.M)


def test_slow_rank_is_flagged_and_only_it(tmp_path):
    run = launch(tmp_path, "slow", DDP, ONE_EPOCH, fault=("slow", 1, 0.6))  # slow even on a loaded machine
    events = [r for r in lines(run.run_dir) if r.get("event") == "straggler"]
    assert events and all(e["ranks"] == [1] for e in events)
    assert "straggler: step" in run.output and "rank 0 (" not in run.output.split("straggler:")[1].split("\n")[0]
