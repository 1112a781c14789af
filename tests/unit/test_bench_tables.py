"""`cvae-dist bench` with figures it does not know (bench.py): NaN in the worker, null in its JSON, None in the parent;
every table prints `n/a` for them, and a trial runs until it has a step line. In process, no training."""

import json
import math
from types import SimpleNamespace

import torch

from cvae_dist import bench, strict_json
from cvae_dist.strict_json import shown

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
        {"precision": "bf16", "layout": "nchw", "mode": "eager",
         "framework": {"median_img_per_s": 90.0, "median_data_wait_frac": None}},
        {"precision": "fp32", "layout": "nchw", "mode": "eager",
         "framework": {"median_img_per_s": None, "median_data_wait_frac": 0.002}},
    ]  # fmt: skip
    data = through_json(bench.data_section(args, cfg, torch.device("cpu"), configs))
    assert data["max_data_wait_frac"] is None and data["data_to_train_ratio_after"]["fp32/nchw"] is None
    assert data["data_to_train_ratio_after"]["bf16/nchw"] == 1e5 / 90.0

    table = bench.data_table(data)
    assert "resident: batch + resize" in table
    bf16, fp32 = (next(line for line in table.splitlines() if line.startswith(f"  {k}")) for k in ("bf16", "fp32"))
    assert bf16.endswith("data wait   n/a of step time") and "n/a first epoch,       n/a after" in fp32
    assert next(line for line in table.splitlines() if "batch + resize" in line).endswith("n/a img/s")


def test_scaling_section_and_table_with_unknown_figures(monkeypatch):
    def launched(args, kind, extra, launcher, env):
        processes = 2 if "--num_processes" in launcher else 1
        local = extra == ["model.batchnorm=local"]
        return {"processes": processes, "threads": int(env["OMP_NUM_THREADS"]), "backend": "MULTI_CPU",
                "per_rank_batch": 128 // processes, "median_img_per_s": None if local else 500.0,
                "median_sync_wait_frac": math.nan if processes > 1 else 0.0}  # fmt: skip

    monkeypatch.setattr(bench, "_run_worker", launched)
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
        }  # fmt: skip
    )
    assert line == "telemetry (bf16/nchw): on 80 img/s, off n/a img/s, on/off n/a (medians of 2 interleaved trials)"


class StubTrainer:
    """What `TrainerLoop` uses of a `Trainer`: `steps` takes one step at a time, a step line every `every` steps, and
    asks `stop` after every step (a step line or a stop poll), as a slow step does."""

    def __init__(self, every: int, step: int, telemetry: bool = True, device: str = "cpu"):
        self.cfg = SimpleNamespace(log=SimpleNamespace(every_steps=every, telemetry=telemetry))
        self.state = SimpleNamespace(step=step)
        self.parts = SimpleNamespace(global_batch=32)
        self.accelerator = SimpleNamespace(device=torch.device(device), process_index=0)
        self.timer = SimpleNamespace(restart=lambda: None)

    def steps(self, batches, stop):
        lines = []
        while True:
            self.state.step += 1
            if self.state.step % self.cfg.log.every_steps == 0:  # on a GPU a trial's first line has no timings
                value = None if self.accelerator.device.type == "cuda" and not lines else 0.25
                lines.append({f"rank/0/{name}": value for name in TELEMETRY})
            if stop():
                return SimpleNamespace(stopped=True, lines=lines)


def test_a_trial_runs_until_it_has_a_step_line_then_until_its_time_is_up():
    loop = bench.TrainerLoop(StubTrainer(every=4, step=5))
    first = loop.trial(0)  # the time is up at once: it stops at its first step line (step 8)
    assert first["steps"] == 3 and first["telemetry"] == dict.fromkeys(TELEMETRY, 0.25)
    assert loop.trial(0)["steps"] == 4  # from a step line to the next
    assert loop.trial(0.05)["seconds"] >= 0.05


def test_a_trial_without_telemetry_has_unknown_telemetry_figures():
    trial = bench.TrainerLoop(StubTrainer(every=4, step=0, telemetry=False)).trial(0)
    assert trial["steps"] == 4 and all(math.isnan(v) for v in trial["telemetry"].values())
    assert shown(trial["telemetry"]["data_wait_frac"], ".1f", 100, "%") == "n/a"


def test_on_a_gpu_a_trial_has_two_step_lines_and_leaves_out_the_first_ones_unknown_timings(monkeypatch):
    monkeypatch.setattr(bench, "_sync", lambda _device: None)
    trial = bench.TrainerLoop(StubTrainer(every=4, step=0, device="cuda")).trial(0)
    assert trial["steps"] == 8 and trial["telemetry"] == dict.fromkeys(TELEMETRY, 0.25)
