"""Per-rank telemetry from real 2-process launches, read back from metrics.jsonl and the offline W&B run."""

import json
import re

import pytest
from wandb_offline import read_run, read_runs

from cvae_dist.config import ModelConfig
from cvae_dist.telemetry import RANK_FIELDS, count_flops_per_image
from launch import DEBUG, launch

DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]
ONE_EPOCH = ["train.epochs=1", "log.every_steps=5", "train.precision=fp32"]


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_every_rank_is_visible_in_wandb(tmp_path):
    run = launch(tmp_path, "telemetry", DDP, ONE_EPOCH)
    wb = read_run(run.run_dir)
    rows = [r for r in wb.history if "throughput/global_img_per_s" in r]
    assert len(rows) == 7  # 35 steps / 5
    for row in rows:
        for r in (0, 1):
            for name in RANK_FIELDS:
                assert f"rank/{r}/{name}" in row
            assert row[f"rank/{r}/img_per_s"] > 0 and row[f"rank/{r}/busy_img_per_s"] > 0
            assert row[f"rank/{r}/peak_mem_mb"] > 0 and 0 < row[f"rank/{r}/mfu"] < 1
        total = row["rank/0/img_per_s"] + row["rank/1/img_per_s"]
        assert row["throughput/global_img_per_s"] == pytest.approx(total, rel=1e-5)
        assert row["images_seen"] == row["step"] * 128
    assert wb.config["world_size"] == 2 and wb.config["precision"] == "fp32"
    assert wb.config["train"]["precision"] == "fp32" and wb.config["backend"] == "MULTI_CPU"
    assert len(wb.config["hosts"]) == 2 and wb.config["torch_version"] and wb.config["accelerate_version"]
    assert wb.config["flops_per_image"] == 75_497_472
    # the same figures without W&B, and the end-of-run table
    jsonl = [r for r in lines(run.run_dir) if "rank/1/img_per_s" in r]
    assert [r["rank/1/img_per_s"] for r in jsonl] == pytest.approx([r["rank/1/img_per_s"] for r in rows])
    table = run.output[run.output.index("per-rank throughput") :]
    assert re.search(r"^\s+0\s+\S+\s+[\d,]+\s+[\d,]+\s+[\d.]+%", table, re.M)
    assert re.search(r"^\s+1\s+\S+\s+[\d,]+\s+[\d,]+\s+[\d.]+%", table, re.M)


@pytest.mark.multiprocess
def test_slow_rank_is_flagged_and_only_it(tmp_path):
    run = launch(tmp_path, "slow", DDP, ONE_EPOCH, fault=("slow", 1, 0.6))  # slow even on a loaded machine
    events = [r for r in lines(run.run_dir) if r.get("event") == "straggler"]
    assert events and all(e["ranks"] == [1] for e in events)
    assert "straggler: step" in run.output and "rank 0 (" not in run.output.split("straggler:")[1].split("\n")[0]
    alerts = read_run(run.run_dir).alerts
    assert len(alerts) == 1 and "rank 1" in alerts[0]["text"]  # rate-limited: one alert per 300 s


@pytest.mark.multiprocess
def test_one_wandb_run_per_rank_in_one_group(tmp_path):
    run = launch(
        tmp_path,
        "per-rank",
        DDP,
        ["train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb_per_rank=true"],
    )
    runs = {r.name: r for r in read_runs(run.run_dir)}
    assert set(runs) == {"per-rank-rank0", "per-rank-rank1"}
    assert runs["per-rank-rank0"].group == runs["per-rank-rank1"].group == "per-rank"
    rank1_keys = set().union(*(row.keys() for row in runs["per-rank-rank1"].history))
    assert "rank/1/img_per_s" in rank1_keys and not any(k.startswith(("rank/0/", "train/")) for k in rank1_keys)
    rank0_keys = set().union(*(row.keys() for row in runs["per-rank-rank0"].history))
    assert {"rank/0/img_per_s", "rank/1/img_per_s", "train/loss"} <= rank0_keys
    assert runs["per-rank-rank1"].config["rank"] == 1


def test_unreachable_wandb_never_stops_training(tmp_path, monkeypatch):
    from cvae_dist.config import load_config
    from cvae_dist.trainer import train

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = train(
        load_config(
            DEBUG,
            [
                "train.epochs=1",
                "data.train_split=test",
                "log.every_steps=1",
                f"output_dir={tmp_path}",
                "run_name=offline-net",
                "log.wandb=online",
            ],
        )
    )
    records = lines(result.run_dir)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3]
    assert [r["epoch"] for r in records if "train/loss" in r] == [1]


def test_flops_per_image_is_counted_and_documented(repo):
    flops = count_flops_per_image(ModelConfig())
    assert flops == 75_497_472  # forward + backward of one 64x64 image, torch.utils.flop_counter
    assert "75,497,472" in (repo / "README.md").read_text()
