"""The recipe knobs in a real run, in one process: the lr and KL weight at every step line as the schedule says, the
gradient norm beside them, the EMA checkpointed and exported, the best checkpoint kept and exported, an early stop."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support.checks import DEBUG, SMALL, strict_loads

from cvae_dist import train as trainer
from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint
from cvae_dist.config import load_config
from cvae_dist.schedule import Schedule

KNOBS = [
    "train.lr_schedule=cosine",
    "train.warmup_images=384",  # 3 steps
    "train.min_lr=1e-5",
    "train.kl_warmup_images=768",  # 6 steps
    "train.clip_grad_norm=20000",  # (a summed loss: its gradient norm is 1e4-1e6 here)
    "train.ema_decay=0.9",
]


def run(tmp_path, name: str, *overrides: str):
    cfg = load_config(DEBUG, [*SMALL, "train.precision=fp32", f"output_dir={tmp_path}", f"run_name={name}", *overrides])
    return trainer.train(cfg), cfg


def step_lines(run_dir) -> list[dict]:
    records = [strict_loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/step_loss" in r]


def test_the_knobs_reach_every_step_line_the_checkpoint_and_the_export(tmp_path):
    result, cfg = run(tmp_path, "knobs", "train.epochs=4", "checkpoint.keep=1", *KNOBS)
    lines, schedule = step_lines(result.run_dir), Schedule(cfg.train, 128, 4 * 3)
    assert [r["step"] for r in lines] == list(range(1, 13))
    logged = [(r["train/lr"], r["train/kl_weight"]) for r in lines]  # (metrics.jsonl keeps 6 significant digits)
    assert logged == [pytest.approx(tuple(schedule.at(s))[:2], rel=1e-5) for s in range(1, 13)]
    assert lines[0]["train/kl_weight"] == pytest.approx(1 / 6) and lines[-1]["train/lr"] == pytest.approx(1e-5)
    assert all(r["train/grad_norm"] > 0 for r in lines)
    last = checkpoint_dirs(result.run_dir)[-1]
    ema, live, export = (
        load_file(p)
        for p in (last / "ema.safetensors", last / "model.safetensors", result.run_dir / "model" / "model.safetensors")
    )
    assert all(torch.equal(export[k], v) for k, v in ema.items())  # the export is the average ...
    assert not torch.equal(ema["encoder.mu.weight"], live["encoder.mu.weight"])  # ... not the live weights
    facts = json.loads((result.run_dir / "ranks" / "rank0.json").read_text())
    assert facts["evaluated_weights"] == "ema (decay 0.9)"


def test_the_best_checkpoint_is_kept_and_exported_and_patience_ends_the_run_completed(tmp_path, monkeypatch, capsys):
    held_out = iter([5.0, 3.0, 4.0, 3.5, 2.0, 1.0])  # per epoch: the best at epoch 2, then two epochs without better
    real = trainer.evaluation.evaluate

    def evaluate(*args):
        figures = real(*args)
        return figures | {"eval/loss_per_image": next(held_out)}

    monkeypatch.setattr(trainer.evaluation, "evaluate", evaluate)
    overrides = ["train.epochs=6", "checkpoint.keep=1", "checkpoint.keep_best=true", "train.early_stop_epochs=2"]
    result, _ = run(tmp_path, "patience", *overrides)
    assert result.steps == 12 and len(result.epoch_losses) == 4  # epochs 1-4 of 6
    out = capsys.readouterr().out
    assert (
        "early stop after epoch 4: no better held-out loss for 2 epochs (its best, 3.00 per image, at epoch 2)" in out
    )
    assert json.loads((result.run_dir / "status.json").read_text())["state"] == "completed"
    kept = checkpoint_dirs(result.run_dir)
    assert [c.name for c in kept] == ["step-000000006", "step-000000012"]  # the best beside the newest (keep=1)
    state = verify_checkpoint(kept[-1])
    assert (state.best_loss, state.best_epoch, state.best_step) == (3.0, 2, 6)
    best, exported = (
        load_file(kept[0] / "model.safetensors"),
        load_file(result.run_dir / "model-best" / "model.safetensors"),
    )
    assert all(torch.equal(exported[k], v.float()) for k, v in best.items())
    final = load_file(result.run_dir / "model" / "model.safetensors")
    assert not torch.equal(final["encoder.mu.weight"], exported["encoder.mu.weight"])
