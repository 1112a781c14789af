"""Where figures go: `metrics.jsonl` (always) and a W&B run (offline unless a key is configured).

Only the main process writes; other ranks get a logger whose methods do nothing, so the training
loop calls it unconditionally. W&B trouble is logged and never stops training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import netrc
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from cvae_dist import strict_json
from cvae_dist.config import JobConfig, WandbMode, to_dict

log = logging.getLogger(__name__)
WANDB_INIT_TIMEOUT_S = 15


def wandb_key_configured() -> bool:
    """True when W&B has an API key: WANDB_API_KEY or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: WandbMode) -> str:
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if mode is WandbMode.auto:
        return "online" if wandb_key_configured() else "offline"
    return mode.value


class RunLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars and images to W&B (main process
    only: on the other ranks every method does nothing)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: JobConfig,
        run_config: dict[str, Any],
        rank: int = 0,
        resume_id: str | None = None,
        resume_step: int | None = None,
    ):
        self.is_main = self.enabled = rank == 0
        self.run_name = run_dir.name
        self.wandb_run, self.file = None, None
        self.run_id = resume_id
        if not self.enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            # a restart before the first checkpoint has no saved id: the run's first attempt logged it
            self.run_id = resume_id = resume_id or _recorded_run_id(self.path)
            _truncate_after(self.path, resume_step)
        self.file = self.path.open("ab", buffering=0)  # each line written whole, at once
        mode = resolve_wandb_mode(cfg.log.wandb)
        if mode != "disabled":
            config = {**to_dict(cfg), **run_config}
            self.wandb_run = _init_wandb(run_dir, cfg, config, mode, resume_id, run_dir.name)
            if self.wandb_run is not None:
                self.run_id = self.wandb_run.id
                print(f"W&B: {_where(self.wandb_run)}", flush=True)

    def log(
        self, record: dict[str, Any], images: dict[str, torch.Tensor] | None = None, at: float | None = None
    ) -> None:
        """Write `record` (scalars; must hold `step`) to metrics.jsonl, stamped with the time `at` (default: now), and
        W&B; images go to W&B only."""
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        if self.file is not None:
            self._append(strict_json.dumps({"time": round(time.time() if at is None else at, 3), **record}) + "\n")
        if self.wandb_run is not None:
            try:
                import wandb

                payload = dict(record)
                for name, image in (images or {}).items():
                    payload[name] = wandb.Image(image.float().cpu().squeeze(0).numpy(), mode="L")
                self.wandb_run.log(payload)
            except Exception as e:  # noqa: BLE001 - W&B must never stop training
                log.warning("W&B log failed (%s); continuing with metrics.jsonl only", e)
                with contextlib.suppress(Exception):  # finished, or a later wandb.init in this process returns it
                    self.wandb_run.finish()
                self.wandb_run = None

    def note(self, record: dict[str, Any]) -> None:
        """An event for metrics.jsonl alone (the run's own bookkeeping: how a launch started, what it changed)."""
        if self.file is not None:
            self._append(strict_json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _append(self, line: str) -> None:
        """Append one whole line, or none: where the write fails (disk full) the part written is cut off again, and
        a DiskError names the file and the free space."""
        data, fd = line.encode(), self.file.fileno()
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += self.file.write(data[done:])
        except OSError as e:
            from cvae_dist.files import disk_error

            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise disk_error(self.path, e) from None

    def reconstruction_table(self, originals, reconstructions, labels, step: int) -> None:
        """A W&B table `eval/reconstructions`: label, held-out digit, its reconstruction."""
        if self.wandb_run is None:
            return
        try:
            import wandb

            table = wandb.Table(columns=["label", "original", "reconstruction"])
            for label, original, rec in zip(labels.tolist(), originals, reconstructions.float().cpu(), strict=True):
                table.add_data(label, wandb.Image(original.squeeze(0).numpy()), wandb.Image(rec.squeeze(0).numpy()))
            self.wandb_run.log({"step": step, "eval/reconstructions": table})
        except Exception as e:  # noqa: BLE001
            log.warning("W&B table failed: %s", e)

    def artifact(self, kind: str, files: dict[str, Path], metadata: dict[str, Any], aliases: list[str] = ()) -> None:
        """A W&B artifact `<kind>-<run>` of type `kind` holding `files` ({name in the artifact: path}; those this
        process cannot see are left out), with `metadata`; a new version each call. Offline runs record it too."""
        if self.wandb_run is None:
            return
        present = {name: path for name, path in files.items() if Path(path).is_file()}
        if not present:
            return
        try:
            import wandb

            name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{kind}-{self.run_name}")[:128]
            artifact = wandb.Artifact(name, type=kind, metadata=_plain_tree(metadata))
            for entry, path in present.items():
                artifact.add_file(str(path), name=entry)
            self.wandb_run.log_artifact(artifact, aliases=list(aliases))
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B artifact %s failed: %s", kind, e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)


def _init_wandb(run_dir: Path, cfg: JobConfig, config: dict, mode: str, resume_id: str | None, name: str):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to metrics.jsonl only")
        return None
    kwargs = dict(
        project=cfg.log.project,
        group=cfg.log.group or os.environ.get("SLURM_JOB_ID") or run_dir.name,
        name=name,
        dir=str(run_dir),
        config=config,
        id=resume_id,
        resume="allow" if resume_id else None,
        settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True),
    )
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # noqa: BLE001 - an unreachable server must not stop training
        if mode != "online":
            log.warning("W&B init failed (%s); logging to metrics.jsonl only", e)
            return None
        log.warning("W&B online init failed (%s); falling back to an offline run", e)
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as e2:  # noqa: BLE001
            log.warning("W&B offline init failed too (%s); logging to metrics.jsonl only", e2)
            return None
    run.define_metric("step")
    run.define_metric("images_seen", step_metric="step")
    run.define_metric("*", step_metric="step")  # rank/<r>/*, throughput/*, train/*, eval/* against the global step
    return run


def _where(run) -> str:
    """The run's page, or where an offline run waits for `wandb sync`."""
    if not run.offline:
        return run.url
    offline = Path(run.dir).parent
    return f"offline run {offline} (to upload: wandb login, then wandb sync {offline})"


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def _plain_tree(v: Any) -> Any:
    """`v` with every tensor a number and every key a string (JSON for W&B metadata)."""
    if isinstance(v, dict):
        return {str(k): _plain_tree(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain_tree(x) for x in v]
    return _plain(v)


def code_commit() -> dict[str, Any]:
    """The commit of the checkout this package runs from (`git rev-parse HEAD`) and whether tracked files differ
    from it; commit None outside a git checkout (an installed package) or without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(changed)}


def _truncate_after(path: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: their lines from the lost attempt go, so no step or epoch
    appears twice (atomically: a crash leaves the old file or the new one)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if 0 <= _step_of(line) <= step]
    if len(kept) < len(lines):
        from cvae_dist.files import write_safely

        write_safely(lambda tmp: tmp.write_text("".join(kept)), path)
        log.warning("%s: dropped %d line(s) after step %d (the resumed run trains those steps again)",
                    path, len(lines) - len(kept), step)  # fmt: skip


def _recorded_run_id(path: Path) -> str | None:
    """The W&B run id an earlier attempt of this run logged in its "started" line, if any."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if record.get("event") == "started" and record.get("wandb_run_id"):
                return str(record["wandb_run_id"])
    return None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return -1  # a partial last line from a kill


class RankRecord:
    """What this rank did, in `ranks/rank<r>.json` (every rank writes its own): identity and the run's facts (step
    mode, precision, compute dtype, ZeRO stage, ...: the W&B config's), step counts, a digest of its final parameters
    and, with `log.sample_ids`, the example ids it trained on in each epoch."""

    def __init__(self, run_dir: Path, facts: dict[str, Any], record_ids: bool, state=None):
        """`state`: a resumed run's (its counts continue from the record an earlier attempt wrote)."""
        self.path = run_dir / "ranks" / f"rank{facts['rank']}.json"
        step, epoch = (state.step, state.epoch) if state is not None else (0, 1)
        earlier = _read_record(self.path) if step else {}
        done = earlier.get("steps_per_epoch", [])[: epoch - 1]
        self.data: dict[str, Any] = {**facts, "steps": step, "steps_per_epoch": done}
        self.record_ids = record_ids
        self.epoch_ids: list[torch.Tensor] = []
        if record_ids:
            ids = earlier.get("ids", {})
            self.data["ids"] = {e: v for e, v in ids.items() if e.isdigit() and int(e) < epoch}

    def batch(self, ids: torch.Tensor) -> None:
        self.data["steps"] += 1
        if self.record_ids:
            self.epoch_ids.append(ids)

    def end_epoch(self, epoch: int, steps: int) -> None:
        self.data["steps_per_epoch"].append(steps)
        if self.record_ids:
            self.data["ids"][str(epoch)] = torch.cat(self.epoch_ids).tolist() if self.epoch_ids else []
            self.epoch_ids = []

    def finish(self, **fields: Any) -> None:
        from cvae_dist.files import write_safely

        self.data.update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_safely(lambda tmp: tmp.write_text(strict_json.dumps(self.data)), self.path)  # whole, or a DiskError


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's bytes (parameters and buffers) in a fixed order: equal digests mean
    bit-identical weights."""
    from cvae_dist.model import portable

    return _digest(portable(model.state_dict()))


def buffer_digest(model: torch.nn.Module) -> str:
    """sha256 over the buffers alone (BatchNorm's running statistics): every rank holds them whole, ZeRO-3 too."""
    from cvae_dist.model import portable

    return _digest(portable(dict(model.named_buffers())))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
