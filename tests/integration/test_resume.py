"""What a resume may change, what it refuses, and where it writes (checkpoint.py's resolve_resume, check_compatible,
check_config_file; the trainer's record of a resume). In process, on `finished`: steps 1..6, checkpoints 5 and 6."""

import json
import shutil

import pytest
import torch
from support.checks import FINISHED, copy_of, lines, one_line, run_cli, snapshot, status, train_argv

from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint

STEP5 = "checkpoints/step-000000005"


def events(run, kind):
    return [r for r in lines(run) if r.get("event") == kind]


def test_a_relative_resume_path_rewinds_the_run_and_writes_its_own_checkpoints(finished, tmp_path, capsys, monkeypatch):
    # resume=<relative path> with an absolute output_dir: the same run's checkpoint, however it is spelled. The
    # newer checkpoint is set aside (not deleted), and the rewound run writes its own step 6, not skipping it.
    run = copy_of(finished, tmp_path)
    old6 = verify_checkpoint(run / "checkpoints/step-000000006")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, f"resume=run/{STEP5}"))
    assert code == 0, err
    assert (run / "checkpoints/step-000000006.abandoned").is_dir()
    new6 = verify_checkpoint(run / "checkpoints/step-000000006")
    assert new6.step == 6 and events(run, "checkpoint:epoch")[-1]["step"] == 6
    assert (run / "checkpoints/step-000000006/trainer_state.json").stat().st_mtime > (
        run / "checkpoints/step-000000006.abandoned/trainer_state.json"
    ).stat().st_mtime
    assert old6.step == 6


def test_a_latest_symlink_resumes_its_target_and_sets_nothing_aside(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    (run / "checkpoints/latest").symlink_to("step-000000006")
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, f"resume={run}/checkpoints/latest"))
    assert code == 0, err
    assert [p.name for p in (run / "checkpoints").iterdir() if "." in p.name] == []  # no .abandoned, no .corrupt
    assert events(run, "resumed")[-1]["from"] == str((run / "checkpoints/step-000000006").resolve())


def test_a_resume_into_another_run_that_has_files_is_refused(finished, tmp_path, capsys):
    a, b = copy_of(finished, tmp_path, "a"), copy_of(finished, tmp_path, "b")
    before_a, before_b = snapshot(a), snapshot(b)
    code, err = run_cli(capsys, train_argv(tmp_path, "b", *FINISHED, f"resume={a / STEP5}"))
    assert code == 2
    one_line(err, f"run directory {b} already exists and is not empty")
    assert snapshot(a) == before_a and snapshot(b) == before_b


def test_a_resume_into_a_new_run_starts_it_from_the_checkpoint_and_leaves_the_old_run_alone(finished, tmp_path, capsys):
    a = copy_of(finished, tmp_path, "a")
    before = snapshot(a)
    code, err = run_cli(capsys, train_argv(tmp_path, "b", *FINISHED, f"resume={a / STEP5}"))
    assert code == 0, err
    b = tmp_path / "b"
    assert snapshot(a) == before
    assert [r["step"] for r in lines(b) if "train/step_loss" in r] == [6]
    assert status(b)["state"] == "completed" and (b / "model/model.safetensors").is_file()


@pytest.mark.parametrize(
    "override", ["train.seed=1", "data.shuffle_buffer=500", "data.source=shipped-copy", "model.batchnorm=local"]
)
def test_a_resume_that_changes_the_model_data_or_seed_is_refused(finished, tmp_path, capsys, override):
    run = copy_of(finished, tmp_path)
    if override == "data.source=shipped-copy":
        from cvae_dist.data import SHIPPED_DIR

        shutil.copytree(SHIPPED_DIR, tmp_path / "shipped-copy")
        override = f"data.source={tmp_path / 'shipped-copy'}"
    before = snapshot(run)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "train.epochs=3", "resume=auto", override))
    key = override.split("=")[0]
    assert code == 2
    one_line(err, f"{key}=", "cannot change within a run", "resume with")
    assert snapshot(run) == before


def test_a_resume_applies_and_records_a_new_lr_and_weight_decay(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    code, err = run_cli(
        capsys,
        train_argv(
            tmp_path, "run", *FINISHED, "train.epochs=3", "resume=auto", "train.lr=0.0005", "train.weight_decay=0.01"
        ),
    )
    assert code == 0, err
    changed = events(run, "resumed")[-1]["changed"]
    assert changed == {"train.epochs": [2, 3], "train.lr": [0.001, 0.0005], "train.weight_decay": [1e-05, 0.01]}
    optimizer = torch.load(checkpoint_dirs(run)[-1] / "optimizer.bin", weights_only=True)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer["param_groups"]] == [(0.0005, 0.01)]  # what ran
    assert "lr: 0.0005" in (run / "config.yaml").read_text()  # config.yaml says what ran


def test_a_hand_edited_config_yaml_is_not_overwritten(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 3"))
    before = snapshot(run)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 2
    one_line(err, f"{config} was edited by hand", "train.epochs=3 there, 2 here", f"pass --config {config}")
    assert snapshot(run) == before
    # the edit is what runs where it is given: the run goes on to epoch 3
    code, err = run_cli(capsys, ["train", "--config", config, f"output_dir={tmp_path}", "run_name=run", "resume=auto"])
    assert code == 0, err
    assert [r["epoch"] for r in lines(run) if "train/loss" in r] == [1, 2, 3]


def test_resuming_a_completed_run_keeps_its_rank_record(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 0, err
    record = json.loads((run / "ranks/rank0.json").read_text())
    assert record["steps"] == 6 and record["steps_per_epoch"] == [3, 3]


def test_a_restart_before_the_first_checkpoint_continues_the_same_wandb_run(tmp_path, capsys):
    argv = train_argv(
        tmp_path, "run", "train.epochs=1", "log.wandb=offline", "checkpoint.every_epoch=false", "train.max_steps=1"
    )
    assert run_cli(capsys, argv)[0] == 0
    run = tmp_path / "run"
    for checkpoint in checkpoint_dirs(run):  # as if the first attempt died before its first checkpoint
        shutil.rmtree(checkpoint)
    shutil.rmtree(run / "model")
    code, err = run_cli(capsys, [*argv, "resume=auto"])
    assert code == 0, err
    first, second = events(run, "started")
    assert first["wandb_run_id"] and second["wandb_run_id"] == first["wandb_run_id"]


def test_resume_auto_matches_a_run_or_is_refused(finished, tmp_path, capsys):
    code, err = run_cli(capsys, train_argv(tmp_path, "typo", *FINISHED, "resume=auto"))
    assert code == 2 and not (tmp_path / "typo").exists()
    one_line(err, f"resume=auto: there is no run {tmp_path / 'typo'} to continue", "resume=allow")
    # the recipe's default name gets a new time at every launch: it can never name the run to continue
    code, err = run_cli(
        capsys, ["train", "--config", train_argv(tmp_path, "x")[2], f"output_dir={tmp_path}", "resume=auto"]
    )
    assert code == 2
    one_line(err, "resume=auto continues a named run", "run_name=debug-{time} names a new one")
    # allow: starts a run that does not exist yet
    code, err = run_cli(capsys, train_argv(tmp_path, "fresh", "resume=allow"))
    assert code == 0, err and status(tmp_path / "fresh")["state"] == "completed"
