"""Run directories, accelerate checkpoints and the safetensors export of the final weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from cvae_dist.config import ConfigError, JobConfig, ModelConfig, to_dict, to_yaml
from cvae_dist.model import CVAE, portable


def run_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def check_new_run_dir(path: Path) -> None:
    """Refuse to write into a run someone already made, or into a directory we cannot write."""
    if path.exists() and any(path.iterdir()):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pick another run_name "
            "(the trainer never overwrites a run)"
        )
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} is not writable")


def create_run_dir(path: Path, cfg: JobConfig) -> None:
    (path / "images").mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))


def export_final(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, cfg: JobConfig) -> Path:
    """The final weights as `model/model.safetensors` + `config.json` (every rank takes part: ZeRO-3 gathers)."""
    state_dict = accelerator.get_state_dict(model)
    export_dir = run_dir / "model"
    if accelerator.is_main_process:
        export(state_dict, cfg.model, export_dir)
    accelerator.wait_for_everyone()
    return export_dir


def export(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out: Path) -> None:
    """`model.safetensors` + `config.json`, loadable with `load_exported`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(portable(state_dict), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(to_dict(JobConfig(model=model_cfg))["model"], indent=2) + "\n")


def load_exported(path: Path) -> CVAE:
    """Rebuild the model from an `export` directory (safetensors only: nothing is unpickled)."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(f"{path}: expected config.json and model.safetensors (a `cvae-dist` export)")
    try:
        model = CVAE.from_pretrained(path)
    except RuntimeError as e:
        raise ConfigError(
            f"{weights}: weights do not fit the model in config.json ({str(e).splitlines()[0]})"
        ) from None
    return model.eval()


# ---- resumable checkpoints -------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
STEP_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not this trainer's."""


@dataclass
class TrainerState:
    """Everything besides model / optimizer / RNG that an exact resume needs (saved as JSON, never pickled)."""

    step: int = 0
    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained on (the data stream's position)
    # Each rank's partial loss sums (index = rank), so a resumed epoch logs what an uninterrupted one would.
    epoch_loss_sums: list[float] = field(default_factory=list)
    interval_loss_sums: list[float] = field(default_factory=list)
    epoch_seconds: float = 0.0
    epoch_skipped: int = 0  # steps of this epoch dropped for non-finite gradients (train.on_nonfinite=skip)
    interval_skipped: int = 0  # ... and since the last step line
    world_size: int = 1
    per_rank_batch_size: int = 0
    data_workers: int = 0  # datasets deals the shards to the workers, so their number shapes the data order
    wandb_run_id: str | None = None
    model: dict = field(default_factory=dict)

    def rank_sum(self, name: str, rank: int) -> float:
        sums = getattr(self, name)
        return sums[rank] if sums else 0.0


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()) if root.is_dir() else []


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Atomically write `checkpoints/step-NNNNNNNNN` on every rank; keep the newest `keep`.

    All ranks write into a hidden temporary directory (accelerate: model, optimizer, scaler, every
    rank's RNG state; DeepSpeed: per-rank shards); then the main process adds the trainer state and a
    manifest of sha256 checksums and renames the directory into place, so a kill at any point never
    leaves a half-written checkpoint that looks complete.
    """
    final = run_dir / "checkpoints" / f"{STEP_PREFIX}{state.step:09d}"
    if final.exists():  # e.g. a signal right after the epoch-end checkpoint: nothing new to save
        return final
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(partial)): _sha256(p) for p in files}
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        os.replace(partial, final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> TrainerState:
    """Check the manifest's checksums and read the trainer state; raises CheckpointError."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; not a complete cvae-dist checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text())
        for name, digest in manifest.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            if _sha256(file) != digest:
                raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
        return TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None


def find_resumable(run_dir: Path, warn) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupt (and `warn` says so)."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}; trying the previous one")
    return None


def resolve_resume(run_dir: Path, resume: str | None, warn) -> tuple[Path, TrainerState] | None:
    """What `resume` points at: None (new run), "auto" (newest valid checkpoint, if any) or a checkpoint path."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(
                f"resume={resume}: no such checkpoint directory (accepted: auto, or a checkpoints/step-* directory)"
            )
        return path, verify_checkpoint(path)
    found = find_resumable(run_dir, warn)
    if found is None and checkpoint_dirs(run_dir):
        raise CheckpointError(f"resume=auto: no valid checkpoint in {run_dir / 'checkpoints'} (all failed checks)")
    return found


def check_compatible(saved: TrainerState, path: Path, current: TrainerState) -> None:
    """Refuse resumes that would silently change the model or the data order (`current`: this launch's state)."""
    if saved.model and saved.model != current.model:
        raise CheckpointError(f"{path}: written for model {saved.model}, but this run configures {current.model}")
    if (saved.world_size, saved.per_rank_batch_size) != (current.world_size, current.per_rank_batch_size):
        raise CheckpointError(
            f"{path}: written by {saved.world_size} rank(s) x {saved.per_rank_batch_size} images; resuming with "
            f"{current.world_size} x {current.per_rank_batch_size} would change which examples each step sees. "
            f"Relaunch with {saved.world_size} processes (the data order is exact only for the same world size)"
        )
    if saved.data_workers != current.data_workers:
        raise CheckpointError(
            f"{path}: written with {saved.data_workers} data worker(s) per rank, this launch has "
            f"{current.data_workers}; the data order depends on it: resume with data.num_workers={saved.data_workers}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
