"""Checkpoints: atomic, verified, exact to resume (single process here; multi-process in test_faults.py)."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from cvae_dist.checkpoint import CheckpointError, checkpoint_dirs, find_resumable, verify_checkpoint
from cvae_dist.config import ConfigError, load_config
from cvae_dist.trainer import train
from launch import DEBUG

# Two epochs of 15 steps of 32 on the 500 held-out digits, a checkpoint every 5 steps.
COMMON = ["train.epochs=2", "data.train_split=test", "data.batch_size=32", "log.every_steps=5",
          "checkpoint.every_steps=5", "checkpoint.keep=20", "log.wandb=offline"]  # fmt: skip


def step_losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/step_loss"] for r in lines if "train/step_loss" in r}


def epoch_losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["train/loss"] for r in lines if "train/loss" in r}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(load_config(DEBUG, [*COMMON, f"output_dir={out}", "run_name=full"]))


def resume_copy(full, tmp_path, stop_step):
    """A copy of the run as it was right after `stop_step` (later checkpoints and lines removed)."""
    run = tmp_path / "resumed"
    shutil.copytree(full.run_dir, run)
    for ckpt in checkpoint_dirs(run):
        if int(ckpt.name.split("-")[1]) > stop_step:
            shutil.rmtree(ckpt)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= stop_step))
    shutil.rmtree(run / "model")
    return run


@pytest.mark.parametrize("stop_step", [10, 15])  # mid-epoch, and exactly at the epoch's end
def test_resume_is_bit_exact(full, tmp_path, stop_step):
    run = resume_copy(full, tmp_path, stop_step)
    resumed = train(load_config(DEBUG, [*COMMON, f"output_dir={tmp_path}", "run_name=resumed", "resume=auto"]))
    assert resumed.steps == full.steps == 30
    a, b = load_file(full.run_dir / "model/model.safetensors"), load_file(run / "model/model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical parameters
    assert step_losses(run) == step_losses(full.run_dir)  # the same loss sequence, every logged step
    assert epoch_losses(run) == epoch_losses(full.run_dir)


def test_checkpoints_are_complete_and_verified(full):
    dirs = checkpoint_dirs(full.run_dir)
    assert [d.name for d in dirs][:3] == ["step-000000005", "step-000000010", "step-000000015"]
    state = verify_checkpoint(dirs[-1])
    assert state.step == 30 and state.epoch == 3 and state.batches_done == 0
    assert not list((full.run_dir / "checkpoints").glob(".partial-*"))


def test_truncated_newest_checkpoint_falls_back_to_previous(full, tmp_path):
    run = resume_copy(full, tmp_path, 20)
    newest = checkpoint_dirs(run)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    warnings = []
    path, state = find_resumable(run, warnings.append)
    assert path.name == "step-000000015" and state.step == 15
    assert "does not match its checksum" in warnings[0]
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(newest)


def test_foreign_checkpoint_is_refused(full, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(foreign)


def test_resume_that_would_change_the_model_is_refused(full, tmp_path):
    run = resume_copy(full, tmp_path, 10)
    overrides = [*COMMON, f"output_dir={run.parent}", f"run_name={run.name}", "resume=auto", "model.filters=32"]
    with pytest.raises(CheckpointError, match="written for model"):
        train(load_config(DEBUG, overrides))


def test_data_workers_shape_a_streamed_order_only(tmp_path):
    # A streamed shard is dealt out to the worker processes: their number is part of the data order. A resident
    # shard's order is read in one process whatever the worker count, so a resume may change it.
    small = ["train.epochs=1", "data.train_split=test", "log.wandb=disabled", f"output_dir={tmp_path}"]
    train(load_config(DEBUG, [*small, "run_name=streamed", "data.resident_mb=0"]))
    with pytest.raises(CheckpointError, match="written with 0 data worker.*resume with data.num_workers=0$"):
        train(load_config(DEBUG, [*small, "run_name=streamed", "data.resident_mb=0", "resume=auto",
                                  "train.epochs=2", "data.num_workers=1"]))  # fmt: skip
    train(load_config(DEBUG, [*small, "run_name=resident"]))
    resumed = train(load_config(DEBUG, [*small, "run_name=resident", "resume=auto", "train.epochs=2",
                                        "data.num_workers=1"]))  # fmt: skip
    assert resumed.steps == 2 * 3


def test_checkpoint_interval_must_align_with_loss_checks():
    with pytest.raises(ConfigError, match="multiple of log.every_steps=5"):
        load_config(DEBUG, ["log.every_steps=5", "checkpoint.every_steps=12"])


def test_nonfinite_step_can_be_skipped(tmp_path, monkeypatch):
    import math

    import torch

    from cvae_dist import step
    from cvae_dist.model import LossParts, vae_loss

    calls = []

    def nan_at_step_7(out, x):
        calls.append(1)
        parts = vae_loss(out, x)
        return LossParts(parts.total * math.nan, *parts[1:]) if len(calls) == 7 else parts

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
