"""Checkpoints in process: atomic, verified, exact to resume, kept and replaced (checkpoint.py)."""

import json
import shutil
import time

import pytest
from safetensors.torch import load_file
from support.checks import (
    FINISHED,
    copy_of,
    epoch_losses,
    leftovers,
    lines,
    one_line,
    read_only,
    run_cli,
    same_weights,
    small_disk,
    snapshot,
    status,
    step_losses,
    train_argv,
)
from support.launching import DEBUG

from cvae_dist.checkpoint import CheckpointError, checkpoint_dirs, resolve_resume, verify_checkpoint
from cvae_dist.config import load_config
from cvae_dist.train import train

# Two epochs of 15 steps of 32 on the 500 held-out digits, a checkpoint every 5 steps.
COMMON = [
    "train.epochs=2",
    "data.train_split=test",
    "data.batch_size=32",
    "log.every_steps=5",
    "checkpoint.every_steps=5",
    "checkpoint.keep=20",
    "log.wandb=offline",
]


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
    resume = resolve_resume(run, "allow", warnings.append)
    assert resume.path.name == "step-000000015" and resume.state.step == 15
    assert "does not match its checksum" in warnings[0]
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(newest)


def test_foreign_checkpoint_is_refused(full, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(foreign)


def test_data_workers_shape_a_streamed_order_only(tmp_path):
    # A streamed shard is dealt out to the worker processes: their number is part of the data order. A resident
    # shard's order is read in one process whatever the worker count, so a resume may change it.
    small = ["train.epochs=1", "data.train_split=test", "log.wandb=disabled", f"output_dir={tmp_path}"]
    train(load_config(DEBUG, [*small, "run_name=streamed", "data.resident_mb=0"]))
    with pytest.raises(CheckpointError, match="written with 0 data worker.*resume with data.num_workers=0$"):
        train(
            load_config(
                DEBUG,
                [
                    *small,
                    "run_name=streamed",
                    "data.resident_mb=0",
                    "resume=auto",
                    "train.epochs=2",
                    "data.num_workers=1",
                ],
            )
        )
    train(load_config(DEBUG, [*small, "run_name=resident"]))
    resumed = train(
        load_config(DEBUG, [*small, "run_name=resident", "resume=auto", "train.epochs=2", "data.num_workers=1"])
    )
    assert resumed.steps == 2 * 3


def test_resume_with_read_only_checkpoints_is_refused_before_training(finished, tmp_path, capsys):
    # resume=auto where checkpoints/ became read-only (a quota, a read-only remount): refused at once, rather than
    # after an epoch of training that could not be saved.
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    with read_only(run / "checkpoints"):
        started = time.monotonic()
        code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "train.epochs=3", "resume=auto"))
        assert code == 2 and time.monotonic() - started < 30
        one_line(err, f"{run / 'checkpoints'} is not writable")
    assert snapshot(run) == before


def test_resume_with_another_model_shape_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    # resume=auto with model.latent_dim=16 on a latent-8 run: refused, and the run (its config.yaml included)
    # stays byte for byte as it was.
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto", "model.latent_dim=16"))
    assert code == 2
    one_line(err, "written for model", "'latent_dim': 8", "'latent_dim': 16")
    assert snapshot(run) == before


def test_checkpoint_keep_leaves_only_the_newest(finished):
    # checkpoint.keep=2 on a run that checkpointed at each of its 6 steps: a bounded disk footprint.
    assert [d.name for d in checkpoint_dirs(finished)] == ["step-000000005", "step-000000006"]
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-000000005", "step-000000006"]


def test_resume_after_a_corrupt_newest_checkpoint_replaces_it(finished, tmp_path, capsys):
    # The newest checkpoint fails its checksum (a node died while the file server flushed it): resume=auto falls
    # back to the previous one, moves the bad one aside, writes a good one in its place, and logs every step once.
    run = copy_of(finished, tmp_path)
    weights = run / "checkpoints" / "step-000000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 0, err
    assert (run / "checkpoints" / "step-000000006.corrupt").is_dir()
    assert [d.name for d in checkpoint_dirs(run)] == ["step-000000005", "step-000000006"]
    assert verify_checkpoint(run / "checkpoints" / "step-000000006").step == 6
    records = lines(run)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "train/loss" in r] == [1, 2]
    assert same_weights(run, finished)  # exactly where the uninterrupted run ended


def test_resume_from_an_explicit_checkpoint_continues_from_it(finished, tmp_path, capsys):
    # resume=<checkpoint dir>: continue from the checkpoint the user names (here an older one than the newest).
    run = copy_of(finished, tmp_path)
    started = time.time()
    checkpoint = run / "checkpoints" / "step-000000005"
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, f"resume={checkpoint}"))
    assert code == 0, err
    records = [r for r in lines(run) if "train/step_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["time"] >= started > records[-2]["time"]  # step 6 trained again, from step 5
    assert same_weights(run, finished)


def test_a_restart_before_the_first_checkpoint_starts_the_run_over(finished, tmp_path, capsys):
    # resume=auto (a torchrun or Slurm restart) in a run directory whose first attempt died before its first
    # checkpoint: the run starts at step 0 again, and the lost attempt's lines do not stay beside the new ones.
    run = copy_of(finished, tmp_path)
    for checkpoint in checkpoint_dirs(run):
        shutil.rmtree(checkpoint)
    shutil.rmtree(run / "model")
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 0, err
    records = lines(run)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "train/loss" in r] == [1, 2]
    assert same_weights(run, finished) and status(run)["state"] == "completed"


def test_disk_full_during_a_checkpoint(tmp_path, capsys):
    # The disk fills up while the checkpoint of step 2 (~1.8 MB) is written; step 1's fitted.
    with small_disk(tmp_path / "disk", 2600) as disk:
        run = disk / "run"
        code, err = run_cli(capsys, train_argv(disk, "run", "checkpoint.every_steps=1"))
        assert code == 1
        line = one_line(
            err, f"could not write {run / 'checkpoints' / 'step-000000002'}: No space left on device;", "MB free there"
        )
        assert not leftovers(disk), leftovers(disk)  # no .partial-step-*, no .status.json.tmp
        # The partial checkpoint is gone, so status.json had room to say what happened.
        st = status(run)
        assert st["state"] == "failed" and line.split("error: ", 1)[1] in st["error"]
        assert [d.name for d in checkpoint_dirs(run)] == ["step-000000001"]
        assert verify_checkpoint(checkpoint_dirs(run)[0]).step == 1  # the earlier checkpoint is untouched
