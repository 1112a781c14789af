"""Where figures go: `metrics.jsonl` (always) and a W&B run (offline unless a key is configured), written by the
main process only; and each rank's record. W&B trouble is logged and never stops training."""

from __future__ import annotations

import contextlib
import functools
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
from cvae_dist.files import disk_error, write_safely
from cvae_dist.model import portable

log = logging.getLogger(__name__)
WANDB_INIT_TIMEOUT_S = 15


def resolve_wandb_mode(mode: WandbMode) -> str:
    """WANDB_MODE wins; `auto` is online where W&B has an API key (WANDB_API_KEY, or a netrc entry for its host)."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if mode is not WandbMode.auto:
        return mode.value
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        key = os.environ.get("WANDB_API_KEY") or netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError):
        key = None
    return "online" if key else "offline"


class RunLogger:
    """One JSON object per event in metrics.jsonl, scalars and images in W&B; on other ranks than 0 it does nothing."""

    def __init__(self, run_dir: Path, cfg: JobConfig, run_config: dict, rank=0, resume_id=None, resume_step=None):
        self.enabled, self.run_name, self.run_id = rank == 0, run_dir.name, resume_id
        self.wandb_run = self.file = None
        if not self.enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            recorded = _truncate_after(self.path, resume_step)  # a restart before the first checkpoint has no saved id
            self.run_id = resume_id = resume_id or recorded
        self.file = self.path.open("ab", buffering=0)  # each line written whole, at once
        mode = resolve_wandb_mode(cfg.log.wandb)
        if mode != "disabled" and (run := _init_wandb(run_dir, cfg, run_config, mode, resume_id)) is not None:
            self.wandb_run, self.run_id = run, run.id

    def log(self, record: dict, images: dict[str, torch.Tensor] | None = None, at: float | None = None) -> None:
        """`record` (scalars, `step` among them) stamped with the time `at` (default: now); images to W&B only."""
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        self.note(record, at)
        if self.wandb_run is None:
            return
        try:
            import wandb

            images = {k: wandb.Image(v.float().cpu().squeeze(0).numpy(), mode="L") for k, v in (images or {}).items()}
            self.wandb_run.log(record | images)
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B log failed (%s); continuing with metrics.jsonl only", e)
            with contextlib.suppress(Exception):  # finished, or a later wandb.init in this process returns it
                self.wandb_run.finish()
            self.wandb_run = None

    def note(self, record: dict[str, Any], at: float | None = None) -> None:
        """An event for metrics.jsonl alone, appended whole or not at all (a full disk: a DiskError)."""
        if self.file is None:
            return
        line = strict_json.dumps({"time": round(time.time() if at is None else at, 3), **record}) + "\n"
        data, fd = line.encode(), self.file.fileno()
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += self.file.write(data[done:])
        except OSError as e:
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
        """A new version of the W&B artifact `<kind>-<run>` holding `files` ({name: path}; those not here left out)."""
        present = {name: path for name, path in files.items() if Path(path).is_file()}
        if self.wandb_run is None or not present:
            return
        try:
            import wandb

            name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{kind}-{self.run_name}")[:128]
            artifact = wandb.Artifact(name, type=kind, metadata=_plain(metadata))
            for entry, path in present.items():
                artifact.add_file(str(path), name=entry)
            self.wandb_run.log_artifact(artifact, aliases=list(aliases))
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B artifact %s failed: %s", kind, e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)


def _init_wandb(run_dir: Path, cfg: JobConfig, run_config: dict, mode: str, resume_id: str | None):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to metrics.jsonl only")
        return None
    kwargs = dict(
        project=cfg.log.project,
        group=cfg.log.group or os.environ.get("SLURM_JOB_ID") or run_dir.name,
        name=run_dir.name,
        dir=str(run_dir),
        config={**to_dict(cfg), **run_config},
        id=resume_id,
        resume="allow" if resume_id else None,
        settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True),
    )
    for attempt in dict.fromkeys([mode, "offline"]):  # an online run that cannot start goes offline
        try:
            run = wandb.init(mode=attempt, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - an unreachable server must not stop training
            then = "falling back to an offline run" if attempt == "online" else "logging to metrics.jsonl only"
            log.warning("W&B %s init failed (%s); %s", attempt, e, then)
    else:
        return None
    run.define_metric("step")
    run.define_metric("images_seen", step_metric="step")
    run.define_metric("*", step_metric="step")  # rank/<r>/*, throughput/*, train/*, eval/* against the global step
    offline = Path(run.dir).parent  # where an offline run waits for `wandb sync`
    sync = f"offline run {offline} (to upload: wandb login, then wandb sync {offline})"
    print(f"W&B: {sync if run.offline else run.url}", flush=True)
    return run


def _plain(v: Any) -> Any:
    """`v` for JSON: tensors as numbers, floats to 8 significant digits (an lr of 1e-7 too), in containers too (keys
    as strings)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return float(f"{v:.8g}") if isinstance(v, float) else v


def code_commit() -> dict[str, Any]:
    """The commit of the checkout this package runs from, and whether tracked files differ (None: no git checkout)."""
    git = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, check=True)
    here = str(Path(__file__).resolve().parent)
    try:
        commit = git(["git", "-C", here, "rev-parse", "HEAD"]).stdout.strip()
        changed = git(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(changed)}


def _truncate_after(path: Path, step: int) -> str | None:
    """Drop the lines after `step` (a resumed run writes them again) and a kill's partial line, atomically; return
    the W&B run id the run's "started" line logged, if any."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    records = [_json_object(line) for line in lines]
    kept = [line for line, r in zip(lines, records, strict=True) if r is not None and 0 <= r.get("step", 0) <= step]
    if len(kept) < len(lines):
        write_safely(lambda tmp: tmp.write_text("".join(kept)), path)
        log.warning("%s: dropped %d line(s) after step %d (to be trained again)", path, len(lines) - len(kept), step)
    ids = [r.get("wandb_run_id") for r in records if r is not None and r.get("event") == "started"]
    return next((str(i) for i in ids if i), None)


def _json_object(text: str) -> dict | None:
    with contextlib.suppress(ValueError):
        record = json.loads(text)
        return record if isinstance(record, dict) else None
    return None


class RankRecord:
    """What this rank did, in `ranks/rank<r>.json`: the run's facts, step counts, and, with `log.sample_ids`, the ids
    it trained on in each epoch (a resumed run's `state` continues an earlier attempt's record)."""

    def __init__(self, run_dir: Path, facts: dict[str, Any], record_ids: bool, state=None):
        self.path = run_dir / "ranks" / f"rank{facts['rank']}.json"
        step, epoch = (state.step, state.epoch) if state is not None else (0, 1)
        earlier = {}
        with contextlib.suppress(OSError):
            earlier = (_json_object(self.path.read_text()) if step else None) or {}
        done = earlier.get("steps_per_epoch", [])[: epoch - 1]
        self.data: dict[str, Any] = {**facts, "steps": step, "steps_per_epoch": done}
        self.record_ids, self.epoch_ids = record_ids, []
        if record_ids:
            self.data["ids"] = {e: v for e, v in earlier.get("ids", {}).items() if e.isdigit() and int(e) < epoch}

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
        self.data.update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_safely(lambda tmp: tmp.write_text(strict_json.dumps(self.data)), self.path)  # whole, or a DiskError


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (parameters and buffers) in a fixed order: equal digests, bit-identical weights."""
    return _digest(model.state_dict())


def buffer_digest(model: torch.nn.Module) -> str:
    """sha256 over the buffers alone (BatchNorm's running statistics): every rank holds them whole, ZeRO-3 too."""
    return _digest(dict(model.named_buffers()))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(portable(tensors).items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
