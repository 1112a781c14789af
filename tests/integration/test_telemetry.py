"""MFU a user can trust: on a CPU there is no peak to measure it against unless one is configured (telemetry.py)."""

import json

import pytest
from support.checks import lines
from support.launching import DEBUG

from cvae_dist.config import load_config
from cvae_dist.train import train

QUICK = ["train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb=disabled", "run_name=run"]


def test_mfu_on_a_cpu_is_null_unless_a_peak_is_configured_and_then_is_img_per_s_against_it(tmp_path):
    # A CPU's peak cannot be read off the machine honestly (boost clocks, how busy it is): n/a, never a guess.
    unknown = train(load_config(DEBUG, [*QUICK, f"output_dir={tmp_path / 'a'}"])).run_dir
    mfu = [r[k] for r in lines(unknown) for k in r if k.endswith("/mfu")]
    assert len(mfu) == 2 * 3 and all(m is None for m in mfu), mfu  # rank/0/mfu and throughput/mfu per step line
    facts = json.loads((unknown / "ranks" / "rank0.json").read_text())
    assert facts["peak_flops"] is None and "log.peak_tflops" in facts["peak_flops_source"]

    configured = train(load_config(DEBUG, [*QUICK, f"output_dir={tmp_path / 'b'}", "log.peak_tflops=2"])).run_dir
    facts = json.loads((configured / "ranks" / "rank0.json").read_text())
    assert facts["peak_flops_source"] == "configured" and facts["peak_flops"] == 2e12
    step_lines = [r for r in lines(configured) if "rank/0/mfu" in r]
    assert len(step_lines) == 3
    for r in step_lines:
        mfu = r["rank/0/img_per_s"] * facts["flops_per_image"] / 2e12
        assert r["rank/0/mfu"] == pytest.approx(mfu, rel=1e-4, abs=1e-6)  # (metrics.jsonl keeps 6 decimals)
