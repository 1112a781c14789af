"""The run directory, its lock and `config.yaml`, and every file write that must not leave half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cvae_dist.config import ConfigError, JobConfig, flat_settings, load_config, to_yaml

CONFIG_FILE, LOCK_FILE = "config.yaml", ".lock"
_CONFIG_HEADER = (
    "# Written by cvae-dist: the settings this run trains with (a resume rewrites it with its own). The trainer\n"
    "# reads --config and key=value overrides, not this file: to resume with edits here, pass --config <this file>.\n"
)
_WRITING: set[Path] = set()  # the temporary files `write_safely` is filling now


class DiskError(OSError):
    """Writing a run's file failed (disk full, permissions): one line naming the path and the free space."""


def run_started(path: Path) -> bool:
    """A run wrote into `path` (a lock file alone is a start that wrote nothing)."""
    return path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir())


def check_new_run_dir(path: Path) -> None:
    if run_started(path):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pick another run_name, or continue it with "
            f"run_name={path.name} resume=auto (the trainer never overwrites a run)"
        )


def check_writable(run_dir: Path) -> None:
    """The run directory (its checkpoints/ first, when resuming), or the nearest existing parent, is writable."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, not a directory: output_dir and run_name must name a directory")
    at = next((p for p in (run_dir / "checkpoints", run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not os.access(at, os.W_OK) and at in (run_dir / "checkpoints", run_dir):
        raise ConfigError(f"{at} is not writable; the run could not save its checkpoints there")
    if not os.access(at, os.W_OK):
        raise ConfigError(f"output directory {at} is not writable (output_dir={run_dir.parent})")


def _stamped(body: str) -> str:
    """`config.yaml`: the settings under a header holding their digest (how a resume tells a hand edit)."""
    return f"{_CONFIG_HEADER}# sha256 {hashlib.sha256(body.encode()).hexdigest()}\n{body}"


def check_config_file(run_dir: Path, cfg: JobConfig) -> None:
    """Refuse to resume past a hand-edited `config.yaml` this launch does not run with (it would be overwritten)."""
    path = run_dir / CONFIG_FILE
    text = path.read_text(errors="replace") if path.is_file() else None
    if text is None or text == _stamped(text.split("\n", 3)[-1]):  # none, or as the trainer wrote it
        return
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


def write_run_dir(path: Path, cfg: JobConfig, accelerator) -> None:
    """Create the run directory with `config.yaml` (a resumed run's is brought up to date), on the main process."""
    if accelerator.is_main_process:
        new = not run_started(path)
        try:
            (path / "images").mkdir(parents=True, exist_ok=True)
            write_safely(lambda p: p.write_text(_stamped(to_yaml(cfg))), path / CONFIG_FILE)
        except DiskError:
            for child in path.iterdir() if new else ():  # nothing of the user's is in it yet: leave no half-made run
                if child.name != LOCK_FILE:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            raise
    accelerator.wait_for_everyone()


class RunLock:
    """One launch at a time trains into a run directory: the main process holds an exclusive fcntl lock on
    `<run>/.lock` (shared file systems honour it; it dies with its holder), whose text says who holds it."""

    def __init__(self, accelerator, run_dir: Path):
        from accelerate.utils import broadcast_object_list  # (accelerate takes seconds to import; faults imports this)

        self.path, self.file, self.made_dir = run_dir / LOCK_FILE, None, not run_dir.exists()
        refusal = [self._take(run_dir) if accelerator.is_main_process else None]
        broadcast_object_list(refusal, from_process=0)  # every rank gets the same answer
        if refusal[0]:
            raise ConfigError(refusal[0])

    def _take(self, run_dir: Path) -> str | None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            file = self.path.open("a+")
        except OSError as e:
            return f"could not create {self.path}: {e.strerror or e}"
        file.seek(0)
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = file.read().strip() or "another process"
            file.close()
            why = "one launch trains a run at a time; wait for it to end, or stop it (its lock goes with its process)"
            return f"run {run_dir} is in use by {holder}: {why}"
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # drops the lock; the file stays (removing it would race a new holder)
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


def write_safely(write: Callable[[Path], object], path: Path) -> None:
    """`write(tmp)`, then rename it to `path`: a reader never sees half a file, and a failed write leaves none (an
    OSError becomes a DiskError naming the path and the free space). Concurrent writers of one path do not mix."""
    tmp = path.with_name(f".{path.stem}.{os.urandom(4).hex()}.partial{path.suffix}")  # (PIL reads the suffix)
    _WRITING.add(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise disk_error(path, e) from None
        raise
    finally:
        _WRITING.discard(tmp)


def replace_dir(new: Path, path: Path) -> None:
    """Put the directory `new` in the place of `path` (ours, if it exists), never leaving a half of either there."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def remove_partial_files() -> None:
    """Delete what `write_safely` is writing now: a process that stops at once leaves no half file."""
    for path in list(_WRITING):
        with contextlib.suppress(OSError):
            path.unlink()


def write_failure(where: Path, e: Exception) -> Exception:
    """The OSError behind `e`, where a writer hid it (torch, safetensors), as a write of our own into `where` tells;
    else `e` itself (not a disk problem)."""
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


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `<name><suffix>` (`-again` added while that is taken); returns the new name."""
    target = path.with_name(path.name + suffix)
    while target.exists():
        target = target.with_name(target.name + "-again")
    path.rename(target)
    return target
