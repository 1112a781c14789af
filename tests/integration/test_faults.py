"""Faults in process: a non-finite step skipped, signal handlers given back (faults.py, step.py)."""

import json

import pytest
from safetensors.torch import load_file
from support.checks import step_losses
from support.launching import DEBUG

from cvae_dist.config import load_config
from cvae_dist.train import train


def test_nonfinite_step_can_be_skipped(tmp_path, monkeypatch):
    import math

    import torch

    from cvae_dist import step
    from cvae_dist.model import LossParts, vae_loss

    calls = []

    def nan_at_step_7(out, x):
        calls.append(1)
        parts = vae_loss(out, x)
        return LossParts(*(t * math.nan for t in parts[:2]), parts.kl) if len(calls) == 7 else parts

    monkeypatch.setattr(step, "vae_loss", nan_at_step_7)
    overrides = [
        "train.epochs=1",
        "data.train_split=test",
        "data.batch_size=32",
        "log.every_steps=5",  # 15 steps
        "log.wandb=disabled",
        "train.on_nonfinite=skip",
        f"output_dir={tmp_path}",
        "run_name=skip",
    ]
    result = train(load_config(DEBUG, overrides))
    epoch = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert epoch[0]["train/skipped_steps"] == 1 and result.steps == 15
    assert all(torch.isfinite(v).all() for v in load_file(result.run_dir / "model/model.safetensors").values())
    # Step lines average the steps that trained: 4 in the interval of steps 6-10, 5 in the others.
    lines = step_losses(result.run_dir)
    trained = {step: 4 if step == 10 else 5 for step in lines}
    assert sorted(lines) == [5, 10, 15]
    total = sum(lines[s] * trained[s] for s in lines)
    assert total == pytest.approx(epoch[0]["train/loss"] * 14, rel=1e-6)


def test_signal_handlers_are_given_back_however_the_run_ends(tmp_path):
    import signal

    from cvae_dist.data import DataError

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(DataError, match="no such directory"):  # fails inside train(), with its handlers installed
        train(load_config(DEBUG, [f"output_dir={tmp_path}", "run_name=x", f"data.source={tmp_path}/no"]))
    assert signal.getsignal(signal.SIGTERM) is before


def test_sighup_is_a_stop_signal_unless_nohup_ignores_it():
    # A closed terminal sends SIGHUP, whose default action ends the trainer with no checkpoint; under nohup it is
    # ignored, and must stay so (the user asked the run to outlive the terminal).
    import signal

    from cvae_dist.faults import StopSignal

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (as in a terminal, whether or not this test runs under nohup)
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with StopSignal():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
