"""Resumable checkpoints (accelerate's save_state, verified by a manifest), the resume policy and the final export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from cvae_dist import strict_json
from cvae_dist.config import CheckpointConfig, ConfigError, JobConfig, model_shape
from cvae_dist.distributed import is_deepspeed
from cvae_dist.files import DiskError, disk_error, replace_dir, run_started, set_aside, write_failure
from cvae_dist.model import CVAE, WEIGHTS, portable, weights_mismatch

STATE_FILE, MANIFEST_FILE, STEP_PREFIX = "trainer_state.json", "manifest.json", "step-"
RESUME_VALUES = "auto (continue the named run), allow (continue it if it exists, else start it) or a checkpoint path"
# torch.save reports a failed write (a full disk, a quota) as a RuntimeError, safetensors as a SafetensorError.
_WRITER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not this trainer's."""


def export_final(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, cfg: JobConfig, name="model") -> Path:
    """The weights as `model/` (or `name`/), replacing an earlier export whole (every rank takes part: ZeRO-3 gathers
    its partitions). `model`: the prepared model, or the EMA's plain CVAE."""
    engine = is_deepspeed(accelerator) and not isinstance(model, CVAE)
    state_dict = accelerator.get_state_dict(model) if engine else model.state_dict()
    export_dir = run_dir / name
    if accelerator.is_main_process:
        final = CVAE(cfg.model)
        final.load_state_dict(portable(state_dict))
        write_export(final, export_dir)
    accelerator.wait_for_everyone()
    return export_dir


def write_export(model: CVAE, export_dir: Path) -> Path:
    """`save_pretrained` into a hidden directory, checked by loading it back, then put in `export_dir`'s place (an
    earlier export there is replaced whole): a failed write leaves no half export."""
    model, partial = model.cpu().eval(), export_dir.with_name(f".{export_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
    except (OSError, *_WRITER_ERRORS) as e:
        error = write_failure(partial, e)
        shutil.rmtree(partial, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        raise disk_error(export_dir, error) from None
    reloaded = CVAE.from_pretrained(partial)
    back = reloaded.state_dict()
    same = all(torch.equal(v.float(), back[k].float()) for k, v in model.state_dict().items())
    if reloaded.config != model.config or not same:
        raise RuntimeError(f"{export_dir}: the export does not load back to the same weights")
    replace_dir(partial, export_dir)
    return export_dir


@dataclass
class TrainerState:
    """Everything besides model / optimizer / RNG that an exact resume needs (saved as JSON, never pickled)."""

    world_size: int
    per_rank_batch_size: int
    global_batch_size: int
    data_path: str  # resident (resumes on any world size) | streamed
    engine: str  # ddp (one process too) | deepspeed
    zero_stage: int  # DeepSpeed's ZeRO stage; 0: DDP or one process
    data_workers: int  # where datasets deals the shards to the workers, their number shapes the data order
    model: dict  # ModelConfig.shape()
    settings: dict  # `flat_settings` of the config the run trained with
    step: int = 0
    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained on (the data stream's position)
    loss: dict = field(default_factory=dict)  # the LossMeter's state: every rank's partial sums
    epoch_seconds: float = 0.0
    wandb_run_id: str | None = None
    best_loss: float | None = None  # the lowest held-out loss per image so far, and where
    best_epoch: int = 0
    best_step: int = 0

    def continued(self, saved: TrainerState) -> TrainerState:
        """This launch's state (its world size, engine, settings) at the saved one's place in training."""
        progress = ("step", "epoch", "batches_done", "loss", "epoch_seconds", "wandb_run_id")
        progress += ("best_loss", "best_epoch", "best_step")
        return dataclasses.replace(self, **{name: getattr(saved, name) for name in progress})

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        """Read `trainer_state.json`, checking every field's type (a ValueError names the first wrong one)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected an object of fields, got {type(data).__name__}")
        kinds = typing.get_type_hints(cls)
        for name, value in data.items():
            if name not in kinds:
                raise ValueError(f"unknown field {name!r}")
            kind = kinds[name]
            if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
                expected = getattr(kind, "__name__", kind)
                raise ValueError(f"field {name!r} is {type(value).__name__}, expected {expected}")
        no_default = dataclasses.MISSING
        for f in dataclasses.fields(cls):
            if f.name not in data and f.default is no_default and f.default_factory is no_default:
                raise ValueError(f"no field {f.name!r}")
        return cls(**data)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run (`step-N`; not the `step-N.corrupt` set aside), oldest first."""
    found = (run_dir / "checkpoints").glob(f"{STEP_PREFIX}*")  # none where there is no checkpoints/
    return sorted(p for p in found if p.name[len(STEP_PREFIX) :].isdigit() and p.is_dir())


class Checkpointer:
    """When to checkpoint, and the checkpoint itself: every rank asks at the same points and gets the same answer."""

    def __init__(self, accelerator, run_dir: Path, cfg: CheckpointConfig, meter, log, ema=None, saved_step=None):
        self.accelerator, self.run_dir, self.cfg, self.meter, self.log = accelerator, run_dir, cfg, meter, log
        self.ema = ema  # saved beside the weights
        self.saved_step: int | None = saved_step  # the step of this run's checkpoint that holds the state as it is now

    def due_at_step_line(self, state: TrainerState, epoch_over: bool) -> bool:
        """Every `checkpoint.every_steps` steps but an epoch's last (the epoch-end checkpoint takes its place)."""
        every = self.cfg.every_steps
        return every > 0 and state.step % every == 0 and not epoch_over

    def at_epoch_end(self, state: TrainerState, last: bool) -> Path | None:
        """With `checkpoint.every_epoch`, after the run's last step, where `every_steps` falls on an epoch's end, and
        with `keep_best` at a new best held-out loss."""
        best = self.cfg.keep_best and state.best_step == state.step
        due = self.cfg.every_epoch or last or best or self.due_at_step_line(state, epoch_over=False)
        return self.save(state, "epoch") if due else None

    def save(self, state: TrainerState, tag: str) -> Path:
        """A checkpoint now (`tag` says why, in metrics.jsonl), or the newest one where it already holds this step."""
        if state.step == self.saved_step:
            return self.run_dir / "checkpoints" / f"{STEP_PREFIX}{state.step:09d}"
        saved = dataclasses.replace(state, loss=self.meter.to_state())  # (the run's state is the loop's to change)
        best = state.best_step if self.cfg.keep_best else None
        path = save_checkpoint(self.accelerator, self.run_dir, saved, self.cfg.keep, self.ema, best)
        self.saved_step = state.step
        self.log({"step": state.step, "epoch": state.epoch, "event": f"checkpoint:{tag}", "path": str(path)})
        return path


def save_checkpoint(
    accelerator, run_dir: Path, state: TrainerState, keep: int, ema=None, best: int | None = None
) -> Path:
    """`checkpoints/step-NNNNNNNNN`, the newest `keep` kept (and the one at step `best`): saved into a hidden directory
    that gets a sha256 manifest, then renamed into place: a kill leaves no half checkpoint that looks complete, a
    failed write a DiskError. `ema`: the EMA of the weights, saved beside them."""
    final = run_dir / "checkpoints" / f"{STEP_PREFIX}{state.step:09d}"
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        if final.exists():  # another branch's checkpoint at this step (never this one's): kept, under another name
            set_aside(final, ".abandoned")
    accelerator.wait_for_everyone()
    error: Exception | None = None
    try:
        accelerator.save_state(str(partial))
    except (OSError, *_WRITER_ERRORS) as e:
        error = write_failure(partial, e)
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if failed.item() == 0 and accelerator.is_main_process:
        try:
            (partial / STATE_FILE).write_text(strict_json.dumps(asdict(state), indent=1))
            if ema is not None:
                ema.save(partial)
            manifest = {str(p.relative_to(partial)): _sha256(p) for p in sorted(partial.rglob("*")) if p.is_file()}
            (partial / MANIFEST_FILE).write_text(strict_json.dumps(manifest, indent=1))
            os.replace(partial, final)
        except OSError as e:
            error = e
        else:
            kept = None if best is None else f"{STEP_PREFIX}{best:09d}"
            for old in checkpoint_dirs(run_dir)[:-keep]:
                if old.name != kept:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if error is not None or not final.exists():
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if error is not None and not isinstance(error, OSError):
            raise error  # not a failed write: keep its traceback
        raise disk_error(final, error) if error is not None else DiskError(f"could not write checkpoint {final}")
    return final


def verify_checkpoint(path: Path) -> TrainerState:
    """Check the manifest's checksums and read the trainer state; raises CheckpointError."""
    manifest_file, state_file = path / MANIFEST_FILE, path / STATE_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; not a complete cvae-dist checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_file}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()) or not manifest:
        raise CheckpointError(f"{manifest_file}: expected an object of file name -> sha256, as the trainer writes")
    if STATE_FILE not in manifest:
        raise CheckpointError(f"{path}: {MANIFEST_FILE} does not list {STATE_FILE}; not a cvae-dist checkpoint")
    outside = [name for name in manifest if not (path / name).resolve().is_relative_to(path.resolve())]
    if outside:
        raise CheckpointError(f"{manifest_file}: {outside[0]} is outside the checkpoint")
    for name, digest in manifest.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
    try:
        state = TrainerState.from_json(state_file.read_text())
        cfg = model_shape(state.model, f"{state_file}: model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:
        raise CheckpointError(f"{state_file}: not a trainer state ({e})") from None
    # The weights' shapes (the safetensors header) against the model recorded: another model's weights would otherwise
    # fail only in load_state, after the run directory was written. (DeepSpeed's pickled shards are not read.)
    mismatch = weights_mismatch(cfg, path / WEIGHTS) if (path / WEIGHTS).is_file() else None
    if mismatch:
        raise CheckpointError(f"{path}: the weights are not the model it records ({mismatch})")
    return state


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Rename the checkpoints after `step` (the one resumed) `.corrupt` or `.abandoned`: resume=auto skips them."""
    moved = []
    for path in checkpoint_dirs(run_dir):
        if int(path.name[len(STEP_PREFIX) :]) > step:
            try:
                verify_checkpoint(path)
                suffix = ".abandoned"
            except CheckpointError:
                suffix = ".corrupt"
            moved.append(set_aside(path, suffix))
    return moved


@dataclass(frozen=True)
class Resume:
    """The checkpoint a launch continues, verified."""

    path: Path  # resolved: symlinks such as checkpoints/latest followed
    state: TrainerState
    own: bool  # a checkpoint of this run directory's; else the run starts a new directory from another run's


def resolve_resume(run_dir: Path, resume: str | None, warn) -> Resume | None:
    """What `resume` points at (None: a new run, or a run without a checkpoint yet)."""
    if resume is None:
        return None
    if resume not in ("auto", "allow"):
        path = Path(resume).resolve()
        if not path.is_dir():
            raise CheckpointError(f"resume={resume}: no such checkpoint directory (accepted: {RESUME_VALUES})")
        return Resume(path, verify_checkpoint(path), own=path.parent == (run_dir / "checkpoints").resolve())
    if resume == "auto" and not run_started(run_dir):
        others = sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir()) if run_dir.parent.is_dir() else []
        listed = f" (runs there: {', '.join(others[-5:])})" if others else ""
        raise CheckpointError(
            f"resume=auto: there is no run {run_dir} to continue{listed}; start it without resume, or pass "
            "resume=allow to continue it where it exists and start it where it does not"
        )
    for path in reversed(checkpoint_dirs(run_dir)):  # the newest that verifies (`set_aside_newer` moves the others)
        try:
            return Resume(path.resolve(), verify_checkpoint(path), own=True)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}; trying the previous one")
    if checkpoint_dirs(run_dir):
        raise CheckpointError(f"resume={resume}: no valid checkpoint in {run_dir / 'checkpoints'} (all failed checks)")
    return None


# Changed part-way, these would make the run another experiment; a resume applies (and records) any other setting.
FIXED_ON_RESUME = ("model.", "train.seed") + tuple(
    f"data.{key}" for key in ("source", "train_split", "batch_size", "shuffle_buffer", "on_bad_record")
)


def check_compatible(saved: TrainerState, path: Path, current: TrainerState) -> dict[str, tuple[object, object]]:
    """Refuse a resume that changes the model, the data or its order, the seed or the engine; returns the changes."""
    if saved.model != current.model:
        raise CheckpointError(f"{path}: written for model {saved.model}, but this run configures {current.model}")
    if saved.global_batch_size != current.global_batch_size:
        raise CheckpointError(
            f"{path}: written with a global batch of {saved.global_batch_size} images, this run has "
            f"{current.global_batch_size}; resume with data.batch_size={saved.global_batch_size}"
        )
    if saved.data_path != current.data_path:
        raise CheckpointError(
            f"{path}: written with the {saved.data_path} data path, this run's split is {current.data_path} "
            "(data.resident_mb decides), whose epoch order differs; resume with the data.resident_mb it ran with"
        )
    was, now = (
        f"DeepSpeed ZeRO-{s.zero_stage}" if s.engine == "deepspeed" else "DDP or one process" for s in (saved, current)
    )
    if was != now:
        raise CheckpointError(
            f"{path}: written under {was}, this launch runs {now}; their checkpoints differ in layout: "
            f"relaunch with the {was} set-up"
        )
    if saved.world_size != current.world_size and (saved.zero_stage or current.zero_stage):
        raise CheckpointError(
            f"{path}: written by {saved.world_size} DeepSpeed rank(s), this launch has {current.world_size}; "
            "ZeRO keeps each rank's optimizer partition and this trainer does not convert it (DeepSpeed's "
            f"universal checkpoint): relaunch with {saved.world_size} processes"
        )
    if saved.world_size != current.world_size and current.data_path != "resident":  # resident: same order anywhere
        raise CheckpointError(
            f"{path}: written by {saved.world_size} rank(s), this launch has {current.world_size}; a streamed "
            "split is dealt to the ranks by its shards, so its order depends on the world size: relaunch with "
            f"{saved.world_size} processes (a split within data.resident_mb resumes on any world size)"
        )
    if current.data_path == "streamed" and saved.data_workers != current.data_workers:
        raise CheckpointError(
            f"{path}: written with {saved.data_workers} data worker(s) per rank, this launch has "
            f"{current.data_workers}; the data order depends on it: resume with data.num_workers={saved.data_workers}"
        )
    changed = {k: (saved.settings.get(k), v) for k, v in current.settings.items() if saved.settings.get(k) != v}
    fixed = [(k, old, new) for k, (old, new) in changed.items() if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        given = "; ".join(f"{k}={old!r} in the run, {new!r} here" for k, old, new in fixed)
        keys = " ".join(f"{k}={old}" for k, old, _ in fixed)
        raise CheckpointError(
            f"{path}: {given}; the model, the data, its order and the seed cannot change within a run: resume with "
            f"{keys}, or start a new run"
        )
    return changed


# What a checkpoint's pickles may build besides tensors and plain data (accelerate's numpy RNG states, DeepSpeed's
# optimizer state): any other global could run code when unpickled (a `__reduce__` payload). Keep in step with
# `distributed.load_deepspeed_weights_only`, which allows just these.
SAFE_PICKLE_GLOBALS = frozenset(
    {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    | {"numpy.dtypes.UInt32DType", "deepspeed.runtime.fp16.loss_scaler.LossScaler"}
    | {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"}
)


def check_pickles(path: Path) -> None:
    """Refuse pickles naming a global outside SAFE_PICKLE_GLOBALS (read from the opcodes: nothing is unpickled)."""
    for file in sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl") and p.is_file()):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception as e:  # noqa: BLE001 - not torch's zip format: it cannot be checked without unpickling it
            raise CheckpointError(
                f"{file}: not a torch archive that can be checked ({e}); refusing to load it"
            ) from None
        unsafe = ", ".join(sorted(found - SAFE_PICKLE_GLOBALS))
        if unsafe:
            raise CheckpointError(
                f"{file}: its pickle would call {unsafe} on loading, which could run any code; refusing to resume "
                "from it (the trainer's checkpoints hold tensors, plain data and numpy / DeepSpeed state only)"
            )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
