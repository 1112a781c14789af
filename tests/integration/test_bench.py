"""benchmarks/bench.py in process: its argument errors, and `--compile` on the framework side."""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

from support.launching import DEBUG, REPO

spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_bad_arguments_are_one_line(repo, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench.py"), "--precisions", "fp8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bench.py: error: --precisions: unknown 'fp8'; accepted: fp32, bf16"


def test_compile_runs_the_framework_compiled(tmp_path, monkeypatch):
    """`--compile`: the worker's environment asks accelerate to compile (as `accelerate launch --dynamo_backend`
    does), and the framework's runs are compiled, as their own facts say; a trial runs. (The `eager` backend compiles
    with dynamo alone: seconds, not inductor's minutes.)"""
    import torch._dynamo

    env = bench._worker_env(SimpleNamespace(compile="eager"))
    # set through monkeypatch, so that it is undone after the test (the next Accelerator in this process would compile)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", env["ACCELERATE_DYNAMO_BACKEND"])
    overrides = ["data.train_split=test", "log.every_steps=1", "train.precision=fp32", f"output_dir={tmp_path}"]
    args = SimpleNamespace(config=DEBUG, overrides=overrides, batch=None, seconds=0.05)
    torch._dynamo.reset()
    runs = bench.FrameworkRuns(args, "compiled", [])  # its warm-up run
    assert runs.facts["compiled"] is True and runs.facts["dynamo_backend"] == "EAGER"
    trial = runs.trial([])
    assert trial["steps"] >= 1 and trial["img_per_s"] > 0 and runs.facts["compiled"] is True
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["compiled-1", "compiled-2"]  # a run each
    torch._dynamo.reset()
