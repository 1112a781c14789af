"""End-to-end single-process training on the shipped digits (real Accelerate, real offline W&B)."""

import json

import pytest
import torch
from PIL import Image
from support.checks import ONE_STEP, check_lr, one_line, read_only, run_cli, train_argv
from support.launching import DEBUG
from support.wandb_offline import read_run

from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint
from cvae_dist.config import ConfigError, load_config
from cvae_dist.model import CVAE
from cvae_dist.train import train


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        DEBUG,
        ["train.epochs=2", f"output_dir={out}", "run_name=e2e", "log.every_steps=5"],  # log.wandb=auto, no key
    )
    return train(cfg)


def test_loss_falls(debug_run):
    losses = debug_run.epoch_losses
    assert len(losses) == 2 and losses[0] > losses[1]
    assert debug_run.steps == 2 * 35


def test_grid_png(debug_run):
    grids = sorted((debug_run.run_dir / "images").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_001.png", "epoch_002.png"]
    # 8 rows x 16 digits of 64 px reconstructions, one blank row, 8 x 16 prior samples
    assert Image.open(grids[-1]).size == (16 * 64, 17 * 64)


def test_metrics_jsonl_has_epoch_lines(debug_run):
    lines = [json.loads(line) for line in (debug_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "train/loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    steps = [r for r in lines if "train/step_loss" in r]
    for r in epochs:
        assert r["train/img_per_s"] > 0 and r["eval/loss_per_image"] > 0 and r["train/epoch_steps"] == 35
        # independently: the epoch's 7 step lines each average 5 steps, so their mean is the epoch's mean
        mine = [x["train/step_loss"] for x in steps if (r["epoch"] - 1) * 35 < x["step"] <= r["epoch"] * 35]
        assert len(mine) == 7 and r["train/loss"] == pytest.approx(sum(mine) / 7, rel=1e-6)


def test_offline_wandb_run_holds_logged_keys(debug_run):
    run = read_run(debug_run.run_dir)
    logged = set().union(*(row.keys() for row in run.history))
    assert {"train/loss", "train/img_per_s", "eval/loss", "images/grid/path", "step", "epoch"} <= logged
    assert run.config["world_size"] == 1 and run.config["train"]["precision"] == "auto"
    assert run.config["precision"] in ("fp32", "bf16") and run.config["precision_reason"].startswith("auto")
    assert [r["train/loss"] for r in run.history if "train/loss" in r] == pytest.approx(debug_run.epoch_losses)
    tables = [r for r in run.history if r.get("eval/reconstructions/_type") == "table-file"]
    assert len(tables) == 1 and tables[0]["eval/reconstructions/nrows"] == 128  # label, original, reconstruction


def test_export_and_checkpoint(debug_run):
    model = CVAE.from_pretrained(debug_run.run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) == 149_265
    last = checkpoint_dirs(debug_run.run_dir)[-1]
    assert last.name == "step-000000070" and verify_checkpoint(last).epoch == 3  # epochs 1-2 done
    assert (last / "model.safetensors").is_file() and (last / "optimizer.bin").is_file()
    assert json.loads((debug_run.run_dir / "status.json").read_text())["state"] == "completed"


def test_existing_run_is_not_overwritten(debug_run):
    before = (debug_run.run_dir / "metrics.jsonl").read_bytes()
    cfg = load_config(DEBUG, [f"output_dir={debug_run.run_dir.parent}", "run_name=e2e", "log.wandb=disabled"])
    with pytest.raises(ConfigError, match="already exists"):
        train(cfg)
    assert (debug_run.run_dir / "metrics.jsonl").read_bytes() == before


TWO_STEPS = ["train.max_steps=2", "log.every_steps=1", "data.batch_size=16", "log.wandb=offline"]


@pytest.mark.auto_precision
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_runs_in_different_precisions_in_one_process(tmp_path, precision):
    """accelerate keeps one state per process and refuses a second Accelerator in another precision: each test gets
    a fresh state (conftest), whichever precision the test before it (or `auto`) picked."""
    cfg = load_config(DEBUG, [*TWO_STEPS, f"output_dir={tmp_path}", f"train.precision={precision}"])
    config = read_run(train(cfg).run_dir).config
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    assert (config["precision"], config["compute_dtype"]) == (precision, dtype)


@pytest.mark.auto_precision
def test_deterministic_kernels_are_the_runs_choice_and_recorded(tmp_path):

    for deterministic in (True, False):  # set both ways: the next run in this process is not left deterministic
        cfg = load_config(
            DEBUG,
            [
                *TWO_STEPS,
                f"output_dir={tmp_path}",
                f"run_name=det-{deterministic}",
                f"train.deterministic={deterministic}",
            ],
        )
        config = read_run(train(cfg).run_dir).config
        assert config["deterministic"] is deterministic and config["train"]["deterministic"] is deterministic
        assert torch.are_deterministic_algorithms_enabled() is deterministic


@pytest.mark.auto_precision
def test_the_first_step_takes_train_lr(tmp_path):
    overrides = [*ONE_STEP, "train.lr=2e-3", f"output_dir={tmp_path}", "run_name=lr1", "log.wandb=offline"]
    run_dir = train(load_config(DEBUG, overrides)).run_dir
    check_lr(run_dir, 1, 2e-3)


def test_an_unwritable_output_directory_is_refused_before_training(tmp_path, capsys):
    # output_dir on a read-only share (or one the user may not write to).
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        for output_dir in (out, out / "runs"):
            code, err = run_cli(capsys, train_argv(output_dir, "run"))
            assert code == 2
            one_line(err, f"{out} is not writable")
    assert not list(out.iterdir())
