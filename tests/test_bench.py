"""`cvae-dist bench` in a very short mode: every figure is in its JSON and positive (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

import pytest

SHORT = ["--trials", "1", "--seconds", "0.2", "--warmup", "0.1", "--data-seconds", "0.2", "log.every_steps=2"]


def bench(repo, tmp_path, *args, timeout=600):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "cvae_dist.cli", "bench", *args, "--json", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text()), proc.stdout


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def fraction(value) -> bool:
    return isinstance(value, int | float) and 0 <= value <= 1


def test_compare_and_data_sections(repo, tmp_path):
    result, stdout = bench(repo, tmp_path, *SHORT)
    env = result["environment"]
    for key in ("torch", "accelerate", "python", "platform", "cpu_model", "device", "mkldnn_bf16"):
        assert key in env
    assert env["torch"] and env["cpu_model"] and env["device"] == "cpu"
    assert positive(env["cores"]) and positive(env["torch_threads"]) and len(env["loadavg_end"]) == 3
    assert result["flops_per_image"] == 75_497_472 and positive(result["peak_flops"]) and result["peak_flops_source"]
    assert result["settings"]["trials"] == 1 and result["settings"]["batch"] == 128

    configs = result["configs"]
    assert [(c["precision"], c["layout"]) for c in configs] == [
        ("fp32", "nchw"),
        ("fp32", "channels_last"),
        ("bf16", "nchw"),
        ("bf16", "channels_last"),
    ]
    for c in configs:
        want = "bfloat16" if c["precision"] == "bf16" else "float32"
        assert c["autocast_dtype"] == {"hand": want, "framework": want}  # autocast really on (or off) in both loops
        for side in ("hand", "framework"):
            figures = c[side]
            assert len(figures["img_per_s"]) == 1 and all(map(positive, figures["img_per_s"]))
            assert positive(figures["median_img_per_s"]) and positive(figures["mfu"])
            assert all(positive(t["steps"]) and positive(t["seconds"]) for t in figures["trials"])
        fw = c["framework"]
        assert all(map(fraction, fw["data_wait_frac"])) and fraction(fw["median_data_wait_frac"])
        for key in ("mfu", "step_time_s", "fwd_bwd_s", "optimizer_s"):
            assert positive(fw["telemetry"][key]), key
        assert fraction(fw["telemetry"]["data_wait_frac"]) and fw["telemetry"]["sync_wait_frac"] == 0
        assert all(map(positive, c["ratio"])) and positive(c["median_ratio"]) and positive(c["ratio_of_medians"])
        assert c["batch"] == 128

    data = result["data"]
    assert [(s["world"], s["rank"], s["decode_cache"], s["with_resize"]) for s in data["streams"]] == [
        (1, 0, "cold", False),
        (1, 0, "warm", False),
        (1, 0, "warm", True),
        (2, 0, "cold", False),
        (2, 0, "warm", False),
        (2, 1, "cold", False),
        (2, 1, "warm", False),
    ]
    for s in data["streams"]:
        assert all(map(positive, s["img_per_s"])) and positive(s["median_img_per_s"])
    for cache in ("cold", "warm"):
        ratios = data[f"data_to_train_ratio_{cache}"]
        assert set(ratios) == {f"{c['precision']}/{c['layout']}" for c in configs}
        assert all(map(positive, ratios.values())) and positive(data[f"min_data_to_train_ratio_{cache}"])
    assert all(map(fraction, data["data_wait_frac"].values())) and fraction(data["max_data_wait_frac"])
    assert "framework img/s" in stdout and "data pipeline" in stdout

    overhead = result["telemetry_overhead"]  # the framework path with telemetry on and off, same run
    assert overhead["config"] == "bf16/channels_last"
    assert positive(overhead["on_img_per_s"]) and positive(overhead["off_img_per_s"]) and positive(overhead["ratio"])
    assert len(overhead["trials"]["on"]) == len(overhead["trials"]["off"]) == 1


def test_bad_arguments_are_one_line(repo, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cvae_dist.cli", "bench", "--precisions", "fp8"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cvae-dist bench: error: --precisions: unknown 'fp8'; accepted: fp32, no, bf16"


@pytest.mark.multiprocess
def test_scaling_section(repo, tmp_path):
    result, stdout = bench(repo, tmp_path, *SHORT, "--sections", "scaling")
    assert "configs" not in result and "data" not in result
    scaling = result["scaling"]
    runs = {(r["processes"], r["threads"]): r for r in scaling["runs"]}
    assert set(runs) == {(1, 2), (2, 1), (1, 1)}
    assert runs[(2, 1)]["backend"] == "MULTI_CPU" and runs[(1, 2)]["backend"] == "NO"
    assert runs[(2, 1)]["per_rank_batch"] == 64 and runs[(1, 2)]["per_rank_batch"] == 128
    for r in runs.values():
        assert all(map(positive, r["img_per_s"])) and positive(r["median_img_per_s"])
        assert fraction(r["median_sync_wait_frac"]) and fraction(r["median_data_wait_frac"])
    assert positive(scaling["efficiency"]) and positive(scaling["per_core_efficiency"])
    assert "efficiency" in stdout
