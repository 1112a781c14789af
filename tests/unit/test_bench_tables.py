"""benchmarks/bench.py with figures it does not know: NaN in the worker, null in its JSON, None in the parent; every
table prints `n/a` for them. A framework trial read back from a run's files: which step lines count, and how long a
trial's run is. In process, no training."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.launching import REPO

from cvae_dist import strict_json
from cvae_dist.strict_json import shown

spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TELEMETRY = ("data_wait_frac", "idle_frac", "sync_wait_frac", "mfu", "step_time_s", "fwd_bwd_s", "optimizer_s")


def through_json(value):
    """As the parent reads a worker's figures back: NaN arrives as None."""
    return json.loads(strict_json.dumps(value))


def column_end(table: str, header: str, row_start: str) -> str:
    """The three characters of the row ending where the column `header` ends (its figures are right-aligned)."""
    lines = table.splitlines()
    head = next(line for line in lines if header in line)
    row = next(line for line in lines if line.startswith(row_start))
    end = head.index(header) + len(header)
    return row[end - 3 : end]


def test_reductions_of_unknown_figures_are_unknown_never_a_crash():
    assert math.isnan(bench._median([1.0, None, 3.0])) and math.isnan(bench._median([1.0, math.nan, 3.0]))
    assert math.isnan(bench._median([])) and bench._median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(bench._ratio(None, 2.0)) and math.isnan(bench._ratio(1.0, math.nan))
    assert shown(None, ".3f") == shown(math.nan, ".1f", 100, "%") == "n/a"
    assert shown(0.0123, ".1f", 100, "%") == "1.2%"


def test_compare_table_prints_na_for_an_unknown_figure():
    hand = [{"img_per_s": 90.0, "steps": 2, "seconds": 2.8}] * 2
    framework = [  # the first trial had no step line: its telemetry is unknown
        {"img_per_s": 89.0, "steps": 2, "seconds": 2.9, "telemetry": dict.fromkeys(TELEMETRY, math.nan)},
        {"img_per_s": 91.0, "steps": 2, "seconds": 2.8, "telemetry": dict.fromkeys(TELEMETRY, 0.01)},
    ]
    dtypes = {"hand": "bfloat16", "framework": "bfloat16"}
    row = through_json(bench._summarise("bf16/channels_last", "eager", hand, framework, dtypes, 128, None))
    assert row["framework"]["median_data_wait_frac"] is None and row["framework"]["telemetry"]["mfu"] is None
    row["framework"]["mfu"] = None  # e.g. a GPU that is not in the peak table
    known = through_json(bench._summarise("fp32/nchw", "eager", hand, framework[1:] * 2, dtypes, 128, None))
    known["framework"]["mfu"], known["median_ratio"] = 0.05, math.nan

    table = bench.compare_table([row, known])
    assert column_end(table, "data wait", "bf16/channels_last") == "n/a"
    assert column_end(table, "fw MFU", "bf16/channels_last") == "n/a"
    assert column_end(table, "ratio", "fp32/nchw") == "n/a" and "5.00%" in table and "1.0%" in table


def test_data_section_and_table_with_unknown_figures(monkeypatch):
    def rates(cfg, rank, world, batch, seconds, warmup, trials, resident, device):
        if not resident:
            return {"stream": [9_000.0]}
        return {"resident-build": [7_000.0], "resident": [1e6], "resident+resize": [math.nan], "resident-order": [1e5]}

    monkeypatch.setattr(bench, "_stream_rates", rates)
    args = SimpleNamespace(data_seconds=None, seconds=1.0, warmup=0.0, trials=1)
    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=128, num_workers=None))
    configs = [  # as the parent has them back from the workers' JSON
        {
            "precision": "bf16",
            "layout": "nchw",
            "mode": "eager",
            "framework": {"median_img_per_s": 90.0, "median_data_wait_frac": None},
        },
        {
            "precision": "fp32",
            "layout": "nchw",
            "mode": "eager",
            "framework": {"median_img_per_s": None, "median_data_wait_frac": 0.002},
        },
    ]
    data = through_json(bench.data_section(args, cfg, torch.device("cpu"), configs))
    assert data["max_data_wait_frac"] is None and data["data_to_train_ratio_after"]["fp32/nchw"] is None
    assert data["data_to_train_ratio_after"]["bf16/nchw"] == 1e5 / 90.0

    table = bench.data_table(data)
    assert "resident: batch + resize" in table
    bf16, fp32 = (next(line for line in table.splitlines() if line.startswith(f"  {k}")) for k in ("bf16", "fp32"))
    assert bf16.endswith("data wait   n/a of step time") and "n/a first epoch,       n/a after" in fp32
    assert next(line for line in table.splitlines() if "batch + resize" in line).endswith("n/a img/s")


def test_scaling_section_and_table_with_unknown_figures(monkeypatch):
    def launched(args, launcher, extra, env):
        processes = 2 if "--num_processes" in launcher else 1
        local = extra == ["model.batchnorm=local"]
        return {
            "processes": processes,
            "threads": int(env["OMP_NUM_THREADS"]),
            "backend": "MULTI_CPU",
            "per_rank_batch": 128 // processes,
            "median_img_per_s": None if local else 500.0,
            "median_sync_wait_frac": math.nan if processes > 1 else 0.0,
        }

    monkeypatch.setattr(bench, "scaling_run", launched)
    scaling = through_json(bench.scaling_section(SimpleNamespace()))
    assert scaling["efficiency"] == 1.0 and scaling["global_to_local_batchnorm"] is None

    table = bench.scaling_table(scaling)
    assert "local BatchNorm):      n/a img/s, sync wait n/a" in table
    assert table.endswith("2x1 global / local BatchNorm = n/a")


def test_telemetry_line_with_unknown_figures():
    line = bench.telemetry_line(
        {
            "config": "bf16/nchw",
            "on_img_per_s": 80.0,
            "off_img_per_s": None,
            "ratio": None,
            "trials": {"on": [80.0, 81.0], "off": [None, None]},
        }
    )
    assert line == "telemetry (bf16/nchw): on 80 img/s, off n/a img/s, on/off n/a (medians of 2 interleaved trials)"


def write_run(run_dir: Path, lines: list[tuple], device: str = "cpu", telemetry: bool = True) -> Path:
    """A finished run's files as `train` writes them: `ranks/rank0.json` and `metrics.jsonl`, with step lines
    (step, epoch, global img/s) among other records, and an epoch line after each epoch's last step line."""
    (run_dir / "ranks").mkdir(parents=True)
    (run_dir / "ranks" / "rank0.json").write_text(json.dumps({"device": device, "global_batch_size": 32}))
    records = [{"time": 1.0, "step": 0, "epoch": 1, "event": "started", "world_size": 1}]
    for i, (step, epoch, rate) in enumerate(lines):
        figures = {f"rank/0/{name}": 0.01 * (i + 1) for name in TELEMETRY} if telemetry else {}
        records.append(
            {
                "time": 2.0,
                "step": step,
                "epoch": epoch,
                "train/step_loss": 100.0,
                "images_seen": 32 * step,
                "rank/0/img_per_s": rate,
                **figures,
                "throughput/global_img_per_s": rate,
            }
        )
        if i + 1 == len(lines) or lines[i + 1][1] != epoch:
            records.append({"time": 3.0, "step": step, "epoch": epoch, "train/loss": 99.0, "train/img_per_s": 1.0})
    records.append({"time": 4.0, "step": lines[-1][0], "epoch": lines[-1][1], "event": "checkpoint:max_steps"})
    (run_dir / "metrics.jsonl").write_text("".join(strict_json.dumps(r) + "\n" for r in records))
    return run_dir


# steps 2-6 in epoch 1, 8-10 in epoch 2: a warm-up line (1 img/s), and a line holding epoch 1's end (1 img/s)
LINES = [(2, 1, 1.0), (4, 1, 10.0), (6, 1, 10.0), (8, 2, 1.0), (10, 2, 40.0)]


def test_a_trial_leaves_out_the_first_step_line_of_the_run_and_of_each_epoch(tmp_path):
    facts, lines = bench.run_figures(write_run(tmp_path / "run", LINES))
    assert facts["global_batch_size"] == 32
    assert [(line["steps"], line["img_per_s"]) for line in lines] == [(2, 10.0), (2, 10.0), (2, 40.0)]
    trial = bench.trial_figures(lines, 32)
    # images over time: 6 steps of 32 images in 2 x 64 / 10 + 64 / 40 seconds (not the mean of the rates, 20)
    assert trial["steps"] == 6 and trial["seconds"] == pytest.approx(14.4)
    assert trial["img_per_s"] == pytest.approx(6 * 32 / 14.4)
    assert trial["telemetry"]["mfu"] == pytest.approx(0.03) == trial["telemetry"]["data_wait_frac"]  # lines 2, 3, 5


def test_on_a_gpu_a_trial_leaves_out_the_first_two_lines_of_the_run_and_of_each_epoch(tmp_path):
    _, lines = bench.run_figures(write_run(tmp_path / "run", LINES, device="cuda:0"))
    assert [(line["steps"], line["img_per_s"]) for line in lines] == [(2, 10.0)]  # step 6 only


def test_a_trial_without_telemetry_or_lines_has_unknown_figures_never_a_crash(tmp_path):
    lines = bench.run_figures(write_run(tmp_path / "off", LINES, telemetry=False))[1]
    off = through_json(bench.trial_figures(lines, 32))
    assert off["img_per_s"] == pytest.approx(6 * 32 / 14.4) and set(off["telemetry"].values()) == {None}
    assert shown(off["telemetry"]["data_wait_frac"], ".1f", 100, "%") == "n/a"
    _, lines = bench.run_figures(write_run(tmp_path / "short", [(2, 1, 50.0)]))  # no line after the warm-up one
    none = through_json(bench.trial_figures(lines, 32))
    assert lines == [] and none["steps"] == 0 and none["img_per_s"] is None and none["seconds"] is None
    unknown = bench.trial_figures([{"steps": 2, "img_per_s": None, **dict.fromkeys(TELEMETRY)}], 32)
    assert unknown["steps"] == 0 and math.isnan(unknown["img_per_s"])  # a line without its rate counts no time


def test_a_framework_trial_is_one_train_run_sized_by_a_warmup_run(tmp_path, monkeypatch):
    """Every trial is one `train(cfg)` (W&B off, its overrides, a run of its own); the warm-up run (the skipped line
    and one more) sizes the trials to about `--seconds` of step lines at its rate: here 100 img/s at batch 32,
    lines of 2 steps, 1 s: 2 lines."""
    calls = []

    def train(cfg):
        calls.append((cfg.run_name, cfg.train.max_steps, cfg.log.telemetry, cfg.log.wandb.value))
        every = cfg.log.every_steps
        lines = [(step, 1, 100.0) for step in range(every, cfg.train.max_steps + 1, every)]
        return SimpleNamespace(run_dir=write_run(Path(cfg.output_dir) / cfg.run_name, lines))

    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench, "_device", lambda: torch.device("cpu"))
    args = SimpleNamespace(
        config=None, overrides=[f"output_dir={tmp_path}", "log.every_steps=2"], batch=None, seconds=1.0
    )
    runs = bench.FrameworkRuns(args, "t", ["log.telemetry=true"])
    trial = runs.trial(["log.telemetry=false"])
    assert calls == [("t-1", 4, True, "disabled"), ("t-2", 6, False, "disabled")]
    assert trial["steps"] == 4 and trial["img_per_s"] == pytest.approx(100.0)
