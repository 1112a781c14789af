"""Checkpoints without training: when the Checkpointer saves, which directories count as checkpoints, the manifest
check, and the resumes refused (checkpoint.py)."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from cvae_dist import checkpoint
from cvae_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainerState,
    check_compatible,
    checkpoint_dirs,
    verify_checkpoint,
)
from cvae_dist.config import CheckpointConfig


class Meter:
    def to_state(self) -> dict:
        return {"epoch_sums": [1.0, 2.0]}


def run_checkpoints(monkeypatch, tmp_path, cfg: CheckpointConfig, epochs: int, steps: int, every: int) -> list:
    """The trainer's calls for a run of `epochs` x `steps` steps with a step line every `every` steps: the
    checkpoints saved, as (step, tag)."""
    saved = []

    def save_checkpoint(_accelerator, run_dir, state, keep, *_):
        saved.append(state.step)
        return run_dir / "checkpoints" / f"step-{state.step:09d}"

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    logged = []
    keeper = Checkpointer(None, tmp_path, cfg, Meter(), logged.append)
    state = state_of()
    for epoch in range(1, epochs + 1):
        state.epoch, state.batches_done = epoch, 0
        for _ in range(steps):
            state.step += 1
            state.batches_done += 1
            if state.step % every == 0 and keeper.due_at_step_line(state, epoch_over=state.batches_done >= steps):
                keeper.save(state, "steps")
        keeper.at_epoch_end(state, last=epoch == epochs)
    assert [e["step"] for e in logged] == saved  # every save is logged
    return [(e["step"], e["event"].removeprefix("checkpoint:")) for e in logged]


def test_by_default_a_run_checkpoints_at_every_epoch_end(monkeypatch, tmp_path):
    saved = run_checkpoints(monkeypatch, tmp_path, CheckpointConfig(), epochs=3, steps=5, every=2)
    assert saved == [(5, "epoch"), (10, "epoch"), (15, "epoch")]


def test_every_steps_checkpoints_at_its_step_lines_and_the_last_step(monkeypatch, tmp_path):
    cfg = CheckpointConfig(every_steps=4, every_epoch=False)
    saved = run_checkpoints(monkeypatch, tmp_path, cfg, epochs=2, steps=5, every=2)
    # steps 4 and 8 at their step lines; none at the end of epoch 1 (step 5); the run's last step (10) always
    assert saved == [(4, "steps"), (8, "steps"), (10, "epoch")]


def test_an_interval_ending_on_an_epoch_end_checkpoints_once_there(monkeypatch, tmp_path):
    cfg = CheckpointConfig(every_steps=6, every_epoch=False)
    saved = run_checkpoints(monkeypatch, tmp_path, cfg, epochs=3, steps=6, every=3)
    assert saved == [(6, "epoch"), (12, "epoch"), (18, "epoch")]


def test_every_steps_and_every_epoch_together(monkeypatch, tmp_path):
    cfg = CheckpointConfig(every_steps=2, every_epoch=True)
    saved = run_checkpoints(monkeypatch, tmp_path, cfg, epochs=2, steps=3, every=2)
    assert saved == [(2, "steps"), (3, "epoch"), (4, "steps"), (6, "epoch")]


def test_a_checkpoint_takes_the_meters_state_and_logs_its_path(monkeypatch, tmp_path):
    got = []
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda a, d, s, keep, *_: got.append((s, keep)) or d / "x")
    logged = []
    state = state_of(step=7, epoch=2)
    path = Checkpointer(None, tmp_path, CheckpointConfig(keep=5), Meter(), logged.append).save(state, "signal")
    ((saved, keep),) = got
    assert path == tmp_path / "x" and keep == 5 and saved.loss == Meter().to_state() and saved.step == 7
    assert state.loss == {}  # the run's own state is the loop's to change
    assert logged == [{"step": 7, "epoch": 2, "event": "checkpoint:signal", "path": str(tmp_path / "x")}]


def test_checkpoint_dirs_are_the_finished_ones_oldest_first(tmp_path):
    assert checkpoint_dirs(tmp_path) == []  # no checkpoints/ yet
    root = tmp_path / "checkpoints"
    for name in (
        "step-000000020",
        "step-000000003",
        ".partial-step-000000030",
        "step-000000010",
        "step-000000004.corrupt",
        "step-000000005.abandoned",
        "step-",
    ):
        (root / name).mkdir(parents=True)
    (root / "step-000000040").write_text("a file, not a checkpoint")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000000003", "step-000000010", "step-000000020"]


def sealed(path: Path, files: dict[str, str]) -> Path:
    """A checkpoint directory holding `files` and a manifest of their sha256 (as save_checkpoint writes one)."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    manifest = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def state_json(**fields) -> str:
    return json.dumps(dataclasses.asdict(state_of(**fields)))


def test_verify_checkpoint_reads_the_state_of_a_complete_checkpoint(tmp_path):
    text = state_json(step=12, epoch=3)
    path = sealed(tmp_path / "step-000000012", {"trainer_state.json": text, "model.bin": "weights"})
    assert verify_checkpoint(path) == state_of(step=12, epoch=3)


def test_verify_checkpoint_refuses_a_directory_without_a_manifest(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"ckpt: no manifest\.json; not a complete cvae-dist checkpoint"):
        verify_checkpoint(tmp_path / "ckpt")


def test_verify_checkpoint_refuses_a_changed_or_missing_file(tmp_path):
    files = {"trainer_state.json": state_json(step=1), "model.bin": "weights"}
    changed = sealed(tmp_path / "changed", files)
    (changed / "model.bin").write_text("weightz")
    with pytest.raises(CheckpointError, match="model.bin does not match its checksum"):
        verify_checkpoint(changed)
    missing = sealed(tmp_path / "missing", files)
    (missing / "model.bin").unlink()
    with pytest.raises(CheckpointError, match="model.bin is missing"):
        verify_checkpoint(missing)
    foreign = sealed(tmp_path / "foreign", {"trainer_state.json": json.dumps({"step": 1, "optimizer": "sgd"})})
    with pytest.raises(CheckpointError, match="not a trainer state .unknown field"):
        verify_checkpoint(foreign)


MODEL = {"latent_dim": 8, "filters": 64, "image_size": 64}


def state_of(**fields) -> TrainerState:
    """A 2-rank run's state (DDP, resident split), with `fields` changed."""
    defaults = {
        "world_size": 2,
        "per_rank_batch_size": 64,
        "global_batch_size": 128,
        "data_path": "resident",
        "engine": "ddp",
        "zero_stage": 0,
        "data_workers": 0,
        "model": MODEL,
        "settings": {},
    }
    return TrainerState(**(defaults | fields))


STREAMED = {"data_path": "streamed"}
ZERO2 = {"zero_stage": 2, "engine": "deepspeed"}


@pytest.mark.parametrize(
    ("saved", "current", "refusal"),
    [
        (state_of(model=MODEL | {"latent_dim": 4}), state_of(), "written for model"),
        (
            state_of(per_rank_batch_size=32, global_batch_size=64),
            state_of(),
            "global batch of 64 images, this run has 128; resume with data.batch_size=64",
        ),
        (state_of(**STREAMED), state_of(), "the streamed data path, this run's split is resident"),
        (
            state_of(world_size=4, per_rank_batch_size=32, **STREAMED),
            state_of(**STREAMED),
            "a streamed split is dealt to the ranks by its shards, so its order depends on the world size: "
            "relaunch with 4",
        ),
        (
            state_of(world_size=4, per_rank_batch_size=32, **ZERO2),
            state_of(**ZERO2),
            "ZeRO keeps each rank's optimizer "
            "partition and this trainer does not convert it (DeepSpeed's universal checkpoint): relaunch with 4",
        ),
        (state_of(**ZERO2), state_of(), "written under DeepSpeed ZeRO-2, this launch runs DDP or one process"),
        (
            state_of(data_workers=2, **STREAMED),
            state_of(**STREAMED),
            "written with 2 data worker(s) per rank, this launch has 0",
        ),
        # DeepSpeed without ZeRO (stage 0) is told from DDP by the engine the checkpoint records
        (state_of(engine="deepspeed"), state_of(engine="ddp"), "written under DeepSpeed ZeRO-0, this launch runs DDP"),
        (
            state_of(settings={"train.seed": 0, "train.lr": 0.001}),
            state_of(settings={"train.seed": 1, "train.lr": 0.002}),
            "train.seed=0 in the run, 1 here; the model, the data, its order and the seed cannot change within a run: "
            "resume with train.seed=0",
        ),
    ],
    ids=[
        "model",
        "global-batch",
        "data-path",
        "streamed-world",
        "deepspeed-world",
        "engine",
        "streamed-workers",
        "deepspeed-zero0",
        "seed",
    ],
)
def test_an_incompatible_resume_is_refused_in_one_line(tmp_path, saved, current, refusal):
    with pytest.raises(CheckpointError) as err:
        check_compatible(saved, tmp_path / "step-000000010", current)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'step-000000010'}: ") and refusal in message and "\n" not in message


def test_a_resident_split_resumes_on_any_world_size(tmp_path):
    for world, share in ((1, 128), (3, 43), (4, 32)):
        check_compatible(state_of(), tmp_path, state_of(world_size=world, per_rank_batch_size=share))
    check_compatible(state_of(data_workers=2), tmp_path, state_of())  # resident: workers only decode


def test_a_compatible_resume_passes(tmp_path):
    assert check_compatible(state_of(), tmp_path, state_of()) == {}


def test_a_resume_returns_the_settings_it_changes(tmp_path):
    saved, now = (
        state_of(settings={"train.lr": 0.001, "train.epochs": 2}),
        state_of(settings={"train.lr": 0.002, "train.epochs": 2}),
    )
    assert check_compatible(saved, tmp_path, now) == {"train.lr": (0.001, 0.002)}


@pytest.mark.parametrize(
    ("manifest", "refusal"),
    [
        ("[1, 2]", "expected an object of file name -> sha256"),
        ('{"a": 3}', "expected an object"),
        ("{}", "expected an object"),
        ('{"model.bin": "x"}', "does not list trainer_state.json"),
        ('{"trainer_state.json": "x", "../../etc/passwd": "y"}', "../../etc/passwd is outside the checkpoint"),
        ("not json", "not JSON"),
    ],
    ids=["list", "number", "empty", "no-state", "outside", "not-json"],
)
def test_a_manifest_of_the_wrong_shape_is_refused_in_one_line(tmp_path, manifest, refusal):
    path = sealed(tmp_path / "step-000000001", {"trainer_state.json": "{}"})
    (path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=None) as err:
        verify_checkpoint(path)
    assert refusal in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("state_json", "refusal"),
    [
        ("[]", "expected an object of fields"),
        ('{"step": "12"}', "field 'step' is str, expected int"),
        ('{"step": true}', "field 'step' is bool"),
        ('{"loss": 3}', "field 'loss' is int, expected dict"),
        ('{"step": 12}', "no field 'world_size'"),
    ],
)
def test_a_trainer_state_of_the_wrong_shape_is_refused(tmp_path, state_json, refusal):
    path = sealed(tmp_path / "step-000000001", {"trainer_state.json": state_json})
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    assert f"trainer_state.json: not a trainer state ({refusal}" in str(err.value)


class Payload:
    """What an attacker hides in a checkpoint: unpickling it calls a function of their choice."""

    def __reduce__(self):
        return (print, ("this ran on unpickling",))


def test_check_pickles_refuses_a_pickle_that_calls_a_function_and_passes_plain_state(tmp_path):
    import numpy as np
    import torch

    ckpt = tmp_path / "step-000000001"
    (ckpt / "pytorch_model").mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}, ckpt / "optimizer.bin")
    torch.save({"numpy": np.random.get_state()}, ckpt / "random_states_0.pkl")
    checkpoint.check_pickles(ckpt)  # tensors, plain data, numpy RNG state
    torch.save({"optimizer_state_dict": Payload()}, ckpt / "pytorch_model" / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_pickles(ckpt)
    assert "zero_pp_rank_0_optim_states.pt: its pickle would call builtins.print on loading" in str(err.value)
    (ckpt / "pytorch_model" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"\x80\x04not a torch archive")
    with pytest.raises(CheckpointError, match="not a torch archive that can be checked"):
        checkpoint.check_pickles(ckpt)


def test_newer_checkpoints_are_set_aside_by_step_number(tmp_path):
    for step in (5, 6, 40):
        sealed(tmp_path / "checkpoints" / f"step-{step:09d}", {"trainer_state.json": state_json(step=step)})
    (tmp_path / "checkpoints" / "step-000000040" / "manifest.json").write_text("{}")  # fails its checks
    moved = checkpoint.set_aside_newer(tmp_path, 5)
    assert [p.name for p in moved] == ["step-000000006.abandoned", "step-000000040.corrupt"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000000005"]
