"""Run directories, resumable checkpoints (accelerate's save_state, verified by a manifest) and the final export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from cvae_dist.config import CheckpointConfig, ConfigError, JobConfig, to_yaml
from cvae_dist.distributed import is_deepspeed
from cvae_dist.faults import being_written
from cvae_dist.model import CVAE, portable


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not this trainer's."""


class DiskError(OSError):
    """Writing a run's file failed (disk full, permissions): one line naming the path and the free space."""


# ---- run directories -------------------------------------------------------------------------------------------


def run_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def check_new_run_dir(path: Path) -> None:
    """Refuse to write into a run someone already made."""
    if path.exists() and any(path.iterdir()):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pick another run_name, or continue it with "
            "resume=auto (the trainer never overwrites a run)"
        )


def check_writable(run_dir: Path) -> None:
    """The run directory (its checkpoints/ included, when resuming), or the nearest existing parent, is writable."""
    for path in (run_dir / "checkpoints", run_dir):
        if path.exists():
            if not os.access(path, os.W_OK):
                raise ConfigError(f"{path} is not writable; the run could not save its checkpoints there")
            return
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} is not writable (output_dir={run_dir.parent})")


def write_run_dir(path: Path, cfg: JobConfig, accelerator: Accelerator) -> None:
    """Create the run directory with `config.yaml` (a resumed run's is brought up to date), on the main process."""
    if accelerator.is_main_process:
        new = not path.exists()
        try:
            (path / "images").mkdir(parents=True, exist_ok=True)
            write_safely(lambda p: p.write_text(to_yaml(cfg)), path / "config.yaml")
        except DiskError:
            if new:  # nothing of the user's is in it yet: leave no half-made run behind
                shutil.rmtree(path, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()


def write_safely(write: Callable[[Path], object], path: Path) -> None:
    """`write(tmp)` then rename into `path`: a reader never sees half a file; an OSError becomes a DiskError naming
    the path and the free space, and nothing half-written is left."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # (the suffix kept: PIL picks the format by it)
    try:
        with being_written(tmp):
            write(tmp)
            os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(path, e) from None


# torch.save reports a failed write (a full disk, a quota) as a RuntimeError, safetensors as a SafetensorError;
# neither is an OSError nor carries the errno.
_WRITER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, SafetensorError)


def write_failure(where: Path, e: Exception) -> Exception:
    """`e` as the OSError behind it, where it came from a writer that hides it: a write of our own into `where`
    (which the failed writer left full, or over quota) tells. `e` itself where that write succeeds: not a disk
    problem."""
    if isinstance(e, OSError) or not where.is_dir():
        return e
    probe = where / ".write-probe"
    try:
        with probe.open("wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return e


def disk_error(path: Path, e: OSError) -> DiskError:
    free = ""
    with contextlib.suppress(OSError):
        anchor = next(p for p in [path, *path.parents] if p.exists())
        free = f"; {shutil.disk_usage(anchor).free / 2**20:,.1f} MB free there"
    return DiskError(f"could not write {path}: {e.strerror or e}{free}")


# ---- the final export: `CVAE.save_pretrained`, loaded with `CVAE.from_pretrained` ----------------------------------


def export_final(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, cfg: JobConfig) -> Path:
    """The final weights as `model/` (model.safetensors + config.json; every rank takes part: ZeRO-3 gathers)."""
    # ZeRO-3 needs DeepSpeed to gather the partitions; otherwise the wrapped model's own state dict is all there is
    # (and `portable` drops the wrappers' prefixes) without importing DeepSpeed.
    state_dict = accelerator.get_state_dict(model) if is_deepspeed(accelerator) else model.state_dict()
    export_dir = run_dir / "model"
    if accelerator.is_main_process:
        final = CVAE(cfg.model)
        final.load_state_dict(portable(state_dict))
        write_export(final, export_dir)
    accelerator.wait_for_everyone()
    return export_dir


def write_export(model: CVAE, export_dir: Path) -> Path:
    """The one export: `save_pretrained` (model.safetensors + config.json + a model card), checked by loading it back
    (the format's promise: `CVAE.from_pretrained(DIR)` gives the same model). A failed write leaves no half export
    (the last checkpoint still holds the weights); a directory that was there before stays."""
    existed = export_dir.is_dir()
    model = model.cpu().eval()
    try:
        model.save_pretrained(export_dir)
    except (OSError, *_WRITER_ERRORS) as e:
        error = write_failure(export_dir, e)
        for path in export_dir.iterdir() if existed else ():
            path.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(export_dir, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        raise disk_error(export_dir, error) from None
    reloaded = CVAE.from_pretrained(export_dir)
    same = reloaded.state_dict()
    if reloaded.config != model.config or any(
        not torch.equal(v.float(), same[k].float()) for k, v in model.state_dict().items()
    ):
        raise RuntimeError(f"{export_dir}: the export does not load back to the same weights")
    return export_dir


# ---- resumable checkpoints -------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
STEP_PREFIX = "step-"


@dataclass
class TrainerState:
    """Everything besides model / optimizer / RNG that an exact resume needs (saved as JSON, never pickled)."""

    step: int = 0
    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained on (the data stream's position)
    loss: dict = field(default_factory=dict)  # the LossMeter's state: every rank's partial sums
    epoch_seconds: float = 0.0
    world_size: int = 1
    per_rank_batch_size: int = 0
    global_batch_size: int = 0  # 0: written before it was recorded (then world_size x per_rank_batch_size)
    data_path: str = ""  # resident (resumes on any world size) | streamed; "": written before it was recorded
    zero_stage: int = 0  # DeepSpeed's ZeRO stage; 0: DDP or one process
    data_workers: int = 0  # where datasets deals the shards to the workers, their number shapes the data order
    wandb_run_id: str | None = None
    model: dict = field(default_factory=dict)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run (`step-N`; not the `step-N.corrupt` set aside), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.name[len(STEP_PREFIX) :].isdigit() and p.is_dir())


class Checkpointer:
    """When to checkpoint, and the checkpoint itself: the training loop says where it stands, this decides (as
    torchtitan's checkpoint manager does). Every rank asks at the same points and gets the same answer."""

    def __init__(
        self, accelerator: Accelerator, run_dir: Path, cfg: CheckpointConfig, meter, log: Callable[[dict], None]
    ):
        self.accelerator, self.run_dir, self.cfg, self.meter, self.log = accelerator, run_dir, cfg, meter, log

    def at_step_line(self, state: TrainerState, epoch_over: bool) -> Path | None:
        """Every `checkpoint.every_steps` steps, except at an epoch's last step (the epoch-end checkpoint takes its
        place)."""
        return self.save(state, "steps") if _every(self.cfg.every_steps, state.step) and not epoch_over else None

    def at_epoch_end(self, state: TrainerState, last: bool) -> Path | None:
        """At every epoch's end with `checkpoint.every_epoch`; always after the run's last step; and where
        `checkpoint.every_steps` falls on an epoch's last step."""
        due = self.cfg.every_epoch or last or _every(self.cfg.every_steps, state.step)
        return self.save(state, "epoch") if due else None

    def save(self, state: TrainerState, tag: str) -> Path:
        """A checkpoint now (`tag` says why, in metrics.jsonl: steps, epoch, signal)."""
        state.loss = self.meter.to_state()
        path = save_checkpoint(self.accelerator, self.run_dir, state, self.cfg.keep)
        self.log({"step": state.step, "epoch": state.epoch, "event": f"checkpoint:{tag}", "path": str(path)})
        return path


def _every(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Atomically write `checkpoints/step-NNNNNNNNN` on every rank; keep the newest `keep`.

    All ranks write into a hidden temporary directory (accelerate: model, optimizer, scaler, every
    rank's RNG state; DeepSpeed: per-rank shards); then the main process adds the trainer state and a
    manifest of sha256 checksums and renames the directory into place, so a kill at any point never
    leaves a half-written checkpoint that looks complete. A failed write (disk full) removes its partial directory
    and raises a DiskError; earlier checkpoints are untouched.
    """
    final = run_dir / "checkpoints" / f"{STEP_PREFIX}{state.step:09d}"
    if final.exists():  # e.g. a signal right after the epoch-end checkpoint: nothing new to save
        return final
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    failed = torch.zeros((), device=accelerator.device)
    error: Exception | None = None
    try:
        accelerator.save_state(str(partial))
    except (OSError, *_WRITER_ERRORS) as e:
        error, failed = write_failure(partial, e), failed + 1
    if accelerator.reduce(failed, "sum").item() == 0 and accelerator.is_main_process:
        try:
            (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            files = sorted(p for p in partial.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(partial)): _sha256(p) for p in files}
            (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            os.replace(partial, final)
        except OSError as e:
            error = e
        else:
            for old in checkpoint_dirs(run_dir)[:-keep]:
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
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupt (and `warn` says so).
    Reads only: `set_aside_newer` moves the corrupt ones out of the way once the resume is accepted."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}; trying the previous one")
    return None


def set_aside_newer(run_dir: Path, resumed: Path) -> list[Path]:
    """Rename the checkpoints newer than `resumed` to `step-N.corrupt` (they failed verification: resume=auto passed
    them over) or `step-N.abandoned` (an explicit resume from an older one), so the resumed run writes its own at
    those steps and a later resume=auto cannot pick up the old ones; returns the new names."""
    moved = []
    for path in checkpoint_dirs(run_dir):
        if path.name > resumed.name:
            try:
                verify_checkpoint(path)
                suffix = ".abandoned"
            except CheckpointError:
                suffix = ".corrupt"
            target = path.with_name(path.name + suffix)
            while target.exists():
                target = target.with_name(target.name + "-again")
            path.rename(target)
            moved.append(target)
    return moved


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
    """Refuse resumes that would silently change the model, the global batch or the data order (`current`: this
    launch's state). A resident split resumes on any world size: its order is the same at every one."""
    if saved.model and saved.model != current.model:
        raise CheckpointError(f"{path}: written for model {saved.model}, but this run configures {current.model}")
    saved_batch = saved.global_batch_size or saved.world_size * saved.per_rank_batch_size
    if saved_batch != current.global_batch_size:
        raise CheckpointError(
            f"{path}: written with a global batch of {saved_batch} images, this run has {current.global_batch_size}; "
            f"resume with data.batch_size={saved_batch}"
        )
    if saved.data_path and saved.data_path != current.data_path:
        raise CheckpointError(
            f"{path}: written with the {saved.data_path} data path, this run's split is {current.data_path} "
            "(data.resident_mb decides), whose epoch order differs; resume with the data.resident_mb it ran with"
        )
    if saved.data_path and saved.zero_stage != current.zero_stage:  # (recorded since data_path was)
        engines = [
            "DDP or one process" if z == 0 else f"DeepSpeed ZeRO-{z}" for z in (saved.zero_stage, current.zero_stage)
        ]
        raise CheckpointError(
            f"{path}: written under {engines[0]}, this launch runs {engines[1]}; their checkpoints differ in layout: "
            f"relaunch with the {engines[0]} set-up"
        )
    if saved.world_size != current.world_size:
        if saved.zero_stage or current.zero_stage:
            raise CheckpointError(
                f"{path}: written by {saved.world_size} DeepSpeed rank(s), this launch has {current.world_size}; "
                "ZeRO keeps each rank's optimizer partition and this trainer does not convert it (DeepSpeed's "
                f"universal checkpoint): relaunch with {saved.world_size} processes"
            )
        if current.data_path != "resident" or saved.data_path != "resident":
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
