"""benchmarks/bench.py in a very short mode: every figure is in its JSON and positive (no timing assertions)."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
from support.launching import REPO

# Two short trials at batch 32 on the 500 held-out digits (bf16 is ~20x slower than fp32 on CPUs without fast bf16);
# a step line every step: a framework trial is a run of two steps (its first line is left out).
# (a CPU has no peak FLOP/s unless one is configured: with one, every MFU figure is checked against it)
SHORT = [
    "--trials",
    "2",
    "--seconds",
    "0.2",
    "--warmup",
    "0.1",
    "--data-seconds",
    "0.2",
    "--batch",
    "32",
    "log.every_steps=1",
    "data.train_split=test",
    "log.peak_tflops=1",
]


def bench(repo, tmp_path, *args, timeout=600, installed=None):
    """The bench script from a directory that is not the source checkout; `installed`: with a plain (not editable)
    install of the package instead of the checkout's, in the launched runs too (PYTHONPATH)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(repo / "benchmarks" / "bench.py"), *args, "--json", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if installed is not None:
        env["PYTHONPATH"] = str(installed)
        where = subprocess.run(
            [sys.executable, "-c", "import cvae_dist; print(cvae_dist.__file__)"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert where.startswith(str(installed)), where
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built and installed as a user's pip would (a wheel, not editable), into a folder of its own. Built
    from a copy of the sources, so the checkout gets no build/ or *.egg-info."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "cvae_dist", source / "cvae_dist", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        target,
        source,
    ]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, timeout=300)
    return target


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def fraction(value) -> bool:
    return isinstance(value, int | float) and 0 <= value <= 1


def test_compare_data_and_telemetry_sections(repo, tmp_path):
    result, stdout = bench(repo, tmp_path, *SHORT, "--layouts", "channels_last")
    env = result["environment"]
    for key in ("torch", "accelerate", "python", "platform", "cpu_model", "device", "fast_bf16"):
        assert key in env
    assert env["torch"] and env["cpu_model"] and env["device"] == "cpu"
    assert positive(env["cores"]) and positive(env["torch_threads"]) and len(env["loadavg_end"]) == 3
    assert result["flops_per_image"] == 75_497_472
    assert set(result["peak_flops"]) == {"fp32", "bf16"} and all(map(positive, result["peak_flops"].values()))
    assert result["settings"]["trials"] == 2 and result["settings"]["batch"] == 32

    configs = result["configs"]
    assert [(c["precision"], c["layout"], c["mode"]) for c in configs] == [
        ("fp32", "channels_last", "eager"),
        ("bf16", "channels_last", "eager"),
    ]  # (no graph rows without CUDA; one layout keeps the test short)
    for c in configs:
        want = "bfloat16" if c["precision"] == "bf16" else "float32"
        assert c["autocast_dtype"] == {"hand": want, "framework": want}  # autocast really on (or off) in both loops
        for side in ("hand", "framework"):
            figures = c[side]
            assert len(figures["img_per_s"]) == 2 and all(map(positive, figures["img_per_s"]))
            assert figures["median_img_per_s"] == statistics.median(figures["img_per_s"])
            assert all(positive(t["steps"]) and positive(t["seconds"]) for t in figures["trials"])
            assert [t["steps"] * 32 / t["seconds"] for t in figures["trials"]] == pytest.approx(figures["img_per_s"])
            peak = result["peak_flops"][c["precision"]]
            assert figures["mfu"] == pytest.approx(figures["median_img_per_s"] * 75_497_472 / peak)
        # the ratio column: per trial, framework / hand, and the median of those is what is reported
        hand, fw = c["hand"]["img_per_s"], c["framework"]["img_per_s"]
        assert c["ratio"] == pytest.approx([f / h for f, h in zip(fw, hand, strict=True)])
        assert c["median_ratio"] == pytest.approx(statistics.median(c["ratio"]))
        assert c["ratio_of_medians"] == pytest.approx(statistics.median(fw) / statistics.median(hand))
        assert f"{c['median_ratio']:.3f}" in stdout
        telemetry = c["framework"]["telemetry"]
        for key in ("mfu", "step_time_s", "fwd_bwd_s", "optimizer_s"):
            assert positive(telemetry[key]), key
        assert fraction(telemetry["data_wait_frac"]) and telemetry["sync_wait_frac"] == 0
        assert c["batch"] == 32 and c.get("hand_graph") is None

    data = result["data"]
    paths = ["stream", "resident-build", "resident", "resident+resize", "resident-order"]
    assert [(s["world"], s["rank"], s["path"]) for s in data["streams"]] == [
        (w, r, p) for w, ranks in ((1, [0]), (2, [0, 1])) for r in ranks for p in paths
    ]
    for s in data["streams"]:
        assert all(map(positive, s["img_per_s"])) and positive(s["median_img_per_s"])
    single = data["rank_img_per_s"]
    assert single["after"] == min(single["resident"], single["resident-order"])
    for when in ("first_epoch", "streamed", "after"):
        ratios = data[f"data_to_train_ratio_{when}"]
        assert set(ratios) == {f"{c['precision']}/{c['layout']}" for c in configs}
        assert all(map(positive, ratios.values())) and positive(data[f"min_data_to_train_ratio_{when}"])
    assert all(map(fraction, data["data_wait_frac"].values())) and fraction(data["max_data_wait_frac"])
    assert "framework img/s" in stdout and "data pipeline" in stdout

    overhead = result["telemetry_overhead"]  # the framework's runs with telemetry on and off, one process
    assert overhead["config"] == "bf16/channels_last"
    assert positive(overhead["on_img_per_s"]) and positive(overhead["off_img_per_s"])
    assert overhead["ratio"] == pytest.approx(overhead["on_img_per_s"] / overhead["off_img_per_s"])
    assert len(overhead["trials"]["on"]) == len(overhead["trials"]["off"]) == 2


def test_scaling_section_from_an_installed_package(repo, tmp_path, installed):
    # the scaling section runs `accelerate launch -m cvae_dist.cli train`: the most a checkout could hide
    result, stdout = bench(repo, tmp_path, *SHORT, "--sections", "scaling", installed=installed)
    assert "configs" not in result and "data" not in result
    scaling = result["scaling"]
    runs = {(r["processes"], r["threads"], r["batchnorm"]): r for r in scaling["runs"]}
    assert set(runs) == {(1, 2, "global"), (2, 1, "global"), (2, 1, "local"), (1, 1, "global")}
    assert runs[(2, 1, "global")]["backend"] == "MULTI_CPU" and runs[(1, 2, "global")]["backend"] == "NO"
    assert runs[(2, 1, "global")]["per_rank_batch"] == 16 and runs[(1, 2, "global")]["per_rank_batch"] == 32
    assert runs[(2, 1, "global")]["global_batchnorm"] and not runs[(2, 1, "local")]["global_batchnorm"]
    for r in runs.values():
        assert all(map(positive, r["img_per_s"])) and positive(r["median_img_per_s"])
        assert fraction(r["median_sync_wait_frac"]) and fraction(r["median_data_wait_frac"])
    rate = {k: r["median_img_per_s"] for k, r in runs.items()}
    two = rate[(2, 1, "global")]
    assert scaling["efficiency"] == pytest.approx(two / rate[(1, 2, "global")])
    assert scaling["per_core_efficiency"] == pytest.approx(two / (2 * rate[(1, 1, "global")]))
    assert scaling["global_to_local_batchnorm"] == pytest.approx(two / rate[(2, 1, "local")])
    assert "efficiency" in stdout and "global / local BatchNorm" in stdout
