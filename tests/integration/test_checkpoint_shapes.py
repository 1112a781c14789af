"""A checkpoint whose checksums pass but whose weights are another model's is treated as a corrupt one: passed
over by resume=auto, refused in one line when named, before anything in the run is written (issue 32, 8)."""

import hashlib
import json

import pytest
from safetensors.torch import save_file
from support.checks import FINISHED, copy_of, lines, one_line, run_cli, same_weights, snapshot, train_argv

from cvae_dist.checkpoint import CheckpointError, checkpoint_dirs, verify_checkpoint
from cvae_dist.config import ModelConfig
from cvae_dist.model import CVAE, portable


def reseal(checkpoint, model: ModelConfig, prefix: str = "") -> None:
    """Replace the checkpoint's model.safetensors with a fresh `model`'s weights (names under `prefix`, as DDP saves
    them) and its manifest entry with their checksum: a checkpoint that verifies, holding another model."""
    weights = checkpoint / "model.safetensors"
    state = {prefix + k: v for k, v in portable(CVAE(model).state_dict()).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def recorded(checkpoint) -> ModelConfig:
    return ModelConfig(**json.loads((checkpoint / "trainer_state.json").read_text())["model"])


def test_verify_compares_the_weights_shapes_with_the_model_the_checkpoint_records(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    checkpoint = checkpoint_dirs(run)[-1]
    model = recorded(checkpoint)
    reseal(checkpoint, model, prefix="module.")  # the same model, as a DDP run saves it: verifies
    assert verify_checkpoint(checkpoint).step == 6
    reseal(checkpoint, ModelConfig(latent_dim=model.latent_dim + 4, filters=model.filters))
    with pytest.raises(
        CheckpointError,
        match=r"the weights are not the model it records \(.*model.safetensors holds "
        r"decoder.linear.weight with shape \[4096, 12\], where a CVAE of latent_dim=8",
    ):
        verify_checkpoint(checkpoint)


def test_resume_auto_passes_over_a_checkpoint_of_another_models_weights(finished, tmp_path, capsys):
    # As for a checkpoint that fails its checksums: the previous one is resumed, the bad one set aside as
    # step-N.corrupt (kept, not deleted), and the run ends where the uninterrupted one did.
    run = copy_of(finished, tmp_path)
    reseal(run / "checkpoints" / "step-000000006", ModelConfig(latent_dim=12))
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 0, err
    assert (run / "checkpoints" / "step-000000006.corrupt" / "model.safetensors").is_file()
    assert [r["step"] for r in lines(run) if "train/step_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert same_weights(run, finished)


def test_resume_from_a_named_checkpoint_of_another_models_weights_is_refused_and_changes_nothing(
    finished, tmp_path, capsys
):
    run = copy_of(finished, tmp_path)
    checkpoint = run / "checkpoints" / "step-000000006"
    reseal(checkpoint, ModelConfig(latent_dim=12))
    before = snapshot(run)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, f"resume={checkpoint}"))
    assert code == 2
    one_line(err, f"{checkpoint}: the weights are not the model it records", "shape [4096, 12]")
    assert snapshot(run) == before  # status.json, config.yaml and the checkpoints as they were
