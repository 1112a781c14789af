"""Run directories, resumable checkpoints (accelerate's save_state, verified by a manifest) and the final export."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError

from cvae_dist import strict_json
from cvae_dist.config import CheckpointConfig, ConfigError, JobConfig, load_config, model_shape, to_dict, to_yaml
from cvae_dist.distributed import is_deepspeed
from cvae_dist.faults import being_written
from cvae_dist.model import CVAE, WEIGHTS, portable, weights_mismatch


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not this trainer's."""


class DiskError(OSError):
    """Writing a run's file failed (disk full, permissions): one line naming the path and the free space."""


# ---- run directories -------------------------------------------------------------------------------------------


def run_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def check_new_run_dir(path: Path) -> None:
    """Refuse to write into a run someone already made (a lock file alone is a start that wrote nothing)."""
    if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pick another run_name, or continue it with "
            f"run_name={path.name} resume=auto (the trainer never overwrites a run)"
        )


def check_writable(run_dir: Path) -> None:
    """The run directory (its checkpoints/ included, when resuming), or the nearest existing parent, is a writable
    directory."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, not a directory: output_dir and run_name must name a directory")
    for path in (run_dir / "checkpoints", run_dir):
        if path.exists():
            if not os.access(path, os.W_OK):
                raise ConfigError(f"{path} is not writable; the run could not save its checkpoints there")
            return
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} is not writable (output_dir={run_dir.parent})")


def flat_settings(cfg: JobConfig) -> dict[str, object]:
    """The config as {"section.key": value} (enums by name), without the top-level keys: where the run is (its
    name, output_dir, resume), not how it trains."""
    return {f"{section}.{k}": v for section, keys in to_dict(cfg).items() if isinstance(keys, dict)
            for k, v in keys.items()}  # fmt: skip


CONFIG_FILE = "config.yaml"
_CONFIG_HEADER = (
    "# Written by cvae-dist: the settings this run trains with (a resume rewrites it with its own). The trainer\n"
    "# reads --config and key=value overrides, not this file: to resume with edits here, pass --config <this file>.\n"
)


def config_text(cfg: JobConfig) -> str:
    """`config.yaml`: the settings, under a header holding their digest (how a resume tells a hand edit)."""
    body = to_yaml(cfg)
    return f"{_CONFIG_HEADER}# sha256 {hashlib.sha256(body.encode()).hexdigest()}\n{body}"


def check_config_file(run_dir: Path, cfg: JobConfig) -> None:
    """Refuse to resume past a hand-edited `config.yaml` that this launch does not run with (the resume would
    overwrite the edits with settings the user did not write there)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    header, _, body = text.partition(_CONFIG_HEADER)
    digest, _, body = body.partition("\n")
    if not header and digest.startswith("# sha256 ") and digest[9:] == hashlib.sha256(body.encode()).hexdigest():
        return  # as the trainer wrote it
    try:
        edited = flat_settings(load_config(path))
    except ConfigError as e:
        raise ConfigError(
            f"{path} was edited and no longer loads ({e}); restore it, or delete it (it is rewritten)"
        ) from None
    differ = [f"{k}={edited[k]!r} there, {v!r} here" for k, v in flat_settings(cfg).items() if edited.get(k) != v]
    if differ:
        raise ConfigError(
            f"{path} was edited by hand and this launch does not run with it ({'; '.join(differ[:3])}): to resume "
            f"with the edits pass --config {path}; without them, restore the file or delete it (it is rewritten)"
        )


def write_run_dir(path: Path, cfg: JobConfig, accelerator: Accelerator) -> None:
    """Create the run directory with `config.yaml` (a resumed run's is brought up to date), on the main process."""
    if accelerator.is_main_process:
        new = not any(p.name != LOCK_FILE for p in path.iterdir()) if path.is_dir() else True
        try:
            (path / "images").mkdir(parents=True, exist_ok=True)
            write_safely(lambda p: p.write_text(config_text(cfg)), path / CONFIG_FILE)
        except DiskError:
            if new:  # nothing of the user's is in it yet: leave no half-made run behind
                for child in path.iterdir():
                    if child.name != LOCK_FILE:
                        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            raise
    accelerator.wait_for_everyone()


LOCK_FILE = ".lock"


class RunLock:
    """One launch trains into a run directory at a time. The main process holds an exclusive lock on `<run>/.lock`
    for the run's lifetime (fcntl: on a shared file system too, and released by the kernel when the holder dies,
    so a dead run's lock is never in the way); the file says who holds it. Every rank gets the same answer."""

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.path, self.file, self.made_dir = run_dir / LOCK_FILE, None, not run_dir.exists()
        refusal = [self._take(run_dir) if accelerator.is_main_process else None]
        broadcast_object_list(refusal, from_process=0)
        if refusal[0]:
            raise ConfigError(refusal[0])

    def _take(self, run_dir: Path) -> str | None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            file = self.path.open("a+")
        except OSError as e:
            return f"could not create {self.path}: {e.strerror or e}"
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            return (f"run {run_dir} is in use by {holder}: one launch trains a run at a time; wait for it to end, "
                    "or stop it (its lock goes with its process)")  # fmt: skip
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the lock; the file stays (removing it would race a new holder)
            self.file = None

    @contextlib.contextmanager
    def released_on_error(self):
        """A refusal inside releases the lock, and removes the run directory where taking the lock made it."""
        try:
            yield
        except BaseException:
            if self.file is not None and self.made_dir:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                    self.path.parent.rmdir()  # only if empty
            self.release()
            raise

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


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
    engine: str = ""  # ddp (one process too) | deepspeed; "": written before it was recorded
    settings: dict = field(default_factory=dict)  # `flat_settings` of the config the run trained with

    def continued(self, saved: TrainerState) -> TrainerState:
        """This launch's state (its world size, engine, settings) at the saved one's place in training."""
        progress = ("step", "epoch", "batches_done", "loss", "epoch_seconds", "wandb_run_id")
        return dataclasses.replace(self, **{name: getattr(saved, name) for name in progress})

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        """Read `trainer_state.json`, checking every field's type (a ValueError names the first wrong one)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected an object of fields, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in data.items():
            kind = type(getattr(cls(), name)) if name in fields else None
            if kind is None:
                raise ValueError(f"unknown field {name!r}")
            if name == "wandb_run_id" and value is None:
                continue
            accepted = (int, float) if kind is float else str if name == "wandb_run_id" else kind
            if not isinstance(value, accepted) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"field {name!r} is {type(value).__name__}, expected {kind.__name__}")
        return cls(**data)


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
        self,
        accelerator: Accelerator,
        run_dir: Path,
        cfg: CheckpointConfig,
        meter,
        log: Callable[[dict], None],
        saved_step: int | None = None,
    ):
        self.accelerator, self.run_dir, self.cfg, self.meter, self.log = accelerator, run_dir, cfg, meter, log
        self.saved_step = saved_step  # the step of this run's checkpoint that holds the state as it is now

    def due_at_step_line(self, state: TrainerState, epoch_over: bool) -> bool:
        """Every `checkpoint.every_steps` steps, except at an epoch's last step (the epoch-end checkpoint takes its
        place)."""
        return _every(self.cfg.every_steps, state.step) and not epoch_over

    def at_epoch_end(self, state: TrainerState, last: bool) -> Path | None:
        """At every epoch's end with `checkpoint.every_epoch`; always after the run's last step; and where
        `checkpoint.every_steps` falls on an epoch's last step."""
        due = self.cfg.every_epoch or last or _every(self.cfg.every_steps, state.step)
        return self.save(state, "epoch") if due else None

    def save(self, state: TrainerState, tag: str) -> Path:
        """A checkpoint now (`tag` says why, in metrics.jsonl: steps, epoch, signal); where the newest one already
        holds this step (a signal right after the epoch-end checkpoint, or before a resumed run's first step), that
        one."""
        if state.step == self.saved_step:
            return self.run_dir / "checkpoints" / f"{STEP_PREFIX}{state.step:09d}"
        state.loss = self.meter.to_state()
        path = save_checkpoint(self.accelerator, self.run_dir, state, self.cfg.keep)
        self.saved_step = state.step
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
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        if final.exists():  # another branch's checkpoint at this step (never this one's): kept, under another name
            set_aside(final, ".abandoned")
    accelerator.wait_for_everyone()
    failed = torch.zeros((), device=accelerator.device)
    error: Exception | None = None
    try:
        accelerator.save_state(str(partial))
    except (OSError, *_WRITER_ERRORS) as e:
        error, failed = write_failure(partial, e), failed + 1
    if accelerator.reduce(failed, "sum").item() == 0 and accelerator.is_main_process:
        try:
            (partial / STATE_FILE).write_text(strict_json.dumps(asdict(state), indent=1))
            files = sorted(p for p in partial.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(partial)): _sha256(p) for p in files}
            (partial / MANIFEST_FILE).write_text(strict_json.dumps(manifest, indent=1))
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
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
    try:
        state = TrainerState.from_json((path / STATE_FILE).read_text())
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state ({e})") from None
    _check_weights(path, state)
    return state


def _check_weights(path: Path, state: TrainerState) -> None:
    """The weights' shapes (from the safetensors header) are those of the model the checkpoint records: whole files
    of another model would otherwise fail only in load_state, after the run directory was written. (DeepSpeed keeps
    its weights in pickled shards, whose shapes are not read: only the recorded model is checked.)"""
    if not state.model:  # written before the model was recorded
        return
    try:
        cfg = model_shape(state.model, f"{path / STATE_FILE}: model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    mismatch = weights_mismatch(cfg, path / WEIGHTS) if (path / WEIGHTS).is_file() else None
    if mismatch:
        raise CheckpointError(f"{path}: the weights are not the model it records ({mismatch})")


def find_resumable(run_dir: Path, warn) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupt (and `warn` says so).
    Reads only: `set_aside_newer` moves the corrupt ones out of the way once the resume is accepted."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}; trying the previous one")
    return None


def set_aside(path: Path, suffix: str) -> Path:
    """Rename a checkpoint to `<name><suffix>` (`-again` added while that is taken); returns the new name."""
    target = path.with_name(path.name + suffix)
    while target.exists():
        target = target.with_name(target.name + "-again")
    path.rename(target)
    return target


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Rename the run's checkpoints of steps after `step` (the one resumed) to `step-N.corrupt` (they failed
    verification: resume=auto passed them over) or `step-N.abandoned` (an explicit resume from an older one), so the
    resumed run writes its own at those steps and a later resume=auto cannot pick up the old ones; returns the new
    names."""
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


RESUME_VALUES = "auto (continue the named run), allow (continue it if it exists, else start it) or a checkpoint path"


def resolve_resume(run_dir: Path, resume: str | None, warn) -> Resume | None:
    """What `resume` points at: None (a new run), "auto" (the run's newest valid checkpoint; the run must exist),
    "allow" (as auto where the run exists, else a new run) or the path of a checkpoint directory. None where the
    run has no checkpoint yet."""
    if resume is None:
        return None
    if resume not in ("auto", "allow"):
        path = Path(resume).resolve()
        if not path.is_dir():
            raise CheckpointError(f"resume={resume}: no such checkpoint directory (accepted: {RESUME_VALUES})")
        return Resume(path, verify_checkpoint(path), own=path.parent == (run_dir / "checkpoints").resolve())
    exists = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if resume == "auto" and not exists:
        others = sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir()) if run_dir.parent.is_dir() else []
        listed = f" (runs there: {', '.join(others[-5:])})" if others else ""
        raise CheckpointError(
            f"resume=auto: there is no run {run_dir} to continue{listed}; start it without resume, or pass "
            "resume=allow to continue it where it exists and start it where it does not"
        )
    found = find_resumable(run_dir, warn)
    if found is None and checkpoint_dirs(run_dir):
        raise CheckpointError(f"resume={resume}: no valid checkpoint in {run_dir / 'checkpoints'} (all failed checks)")
    return None if found is None else Resume(found[0].resolve(), found[1], own=True)


# What a resume may not change: the model, the data and its order, the seed. Changed part-way, the run would be
# another experiment from that step on (and its place in the data would mean nothing). Anything else a resume
# applies, and records (`changed_settings`).
FIXED_ON_RESUME = ("model.", "data.source", "data.train_split", "data.batch_size", "data.shuffle_buffer",
                   "data.on_bad_record", "train.seed")  # fmt: skip


def _engine(state: TrainerState) -> str:
    deepspeed = state.engine == "deepspeed" or (not state.engine and state.zero_stage > 0)
    return f"DeepSpeed ZeRO-{state.zero_stage}" if deepspeed else "DDP or one process"


def changed_settings(saved: TrainerState, current: TrainerState) -> dict[str, tuple[object, object]]:
    """{key: (as the run trained, as this launch has it)} for every setting that differs (a setting older
    checkpoints did not record is not compared)."""
    return {k: (saved.settings[k], v) for k, v in current.settings.items() if k in saved.settings
            and saved.settings[k] != v}  # fmt: skip


def check_compatible(saved: TrainerState, path: Path, current: TrainerState) -> dict[str, tuple[object, object]]:
    """Refuse resumes that would silently change the model, the data or its order, the seed, or the engine
    (`current`: this launch's state); returns the settings the resume changes (they are applied). A resident split
    resumes on any world size: its order is the same at every one."""
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
    engines = [_engine(saved), _engine(current)]
    if (saved.engine or saved.data_path) and engines[0] != engines[1]:  # (zero_stage recorded since data_path was)
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
    changed = changed_settings(saved, current)
    fixed = [(k, old, new) for k, (old, new) in changed.items() if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        given = "; ".join(f"{k}={old!r} in the run, {new!r} here" for k, old, new in fixed)
        keys = " ".join(f"{k}={old}" for k, old, _ in fixed)
        raise CheckpointError(
            f"{path}: {given}; the model, the data, its order and the seed cannot change within a run: resume with "
            f"{keys}, or start a new run"
        )
    return changed


# What a checkpoint's pickles may build besides tensors and plain data: accelerate's RNG states (numpy arrays) and
# DeepSpeed's optimizer state (its loss scaler, ZeRO stage enum, fragment addresses). Any other global could run code
# when unpickled (a `__reduce__` payload): a checkpoint holding one is refused before anything loads it, and
# `distributed.load_deepspeed_weights_only` makes DeepSpeed load with weights_only=True and just these.
SAFE_PICKLE_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def check_pickles(path: Path) -> None:
    """Refuse a checkpoint whose pickled files name any global outside SAFE_PICKLE_GLOBALS (read from the pickles'
    opcodes: nothing is unpickled here)."""
    for file in sorted(p for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception as e:  # noqa: BLE001 - not torch's zip format: it cannot be checked without unpickling it
            raise CheckpointError(
                f"{file}: not a torch archive that can be checked ({e}); refusing to load it"
            ) from None
        unsafe = sorted(found - SAFE_PICKLE_GLOBALS)
        if unsafe:
            raise CheckpointError(
                f"{file}: its pickle would call {', '.join(unsafe)} on loading, which could run any code; refusing to "
                "resume from it (the trainer's checkpoints hold tensors, plain data and numpy / DeepSpeed state only)"
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
