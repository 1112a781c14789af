"""`cvae-dist bench` in process: its argument errors, and `--compile` on the trainer side (bench.py)."""

import subprocess
import sys


def test_bad_arguments_are_one_line(repo, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cvae_dist.cli", "bench", "--precisions", "fp8"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cvae-dist bench: error: --precisions: unknown 'fp8'; accepted: fp32, bf16"


def test_compile_times_the_compiled_model_on_the_trainer_side(tmp_path, monkeypatch):
    """`--compile`: the model the trainer's step calls (what the framework rows time) is the compiled one, the run's
    only model, and a trial runs. (The `eager` backend compiles with dynamo alone: seconds, not inductor's minutes.)"""
    import torch._dynamo
    from accelerate.utils import is_compiled_module
    from support.launching import DEBUG

    from cvae_dist import bench
    from cvae_dist.config import load_config

    # set through monkeypatch, so that what the bench sets is undone after the test (a delenv of an absent variable
    # records nothing to undo, and the next Accelerator in this process would compile)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    overrides = ["data.train_split=test", "log.every_steps=1", "train.precision=fp32", "log.wandb=disabled"]
    cfg = load_config(DEBUG, [*overrides, f"output_dir={tmp_path}"])
    torch._dynamo.reset()
    loop = bench.TrainerLoop(bench._trainer_run(cfg, "compiled", "eager"))
    assert is_compiled_module(loop.trainer.step.model) and loop.trainer.step.model is loop.trainer.model
    assert loop.trial(0.05)["steps"] >= 1
    torch._dynamo.reset()
