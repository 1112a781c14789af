"""Read an offline W&B run file (`run-*.wandb`) back: history rows, config, summary and alerts.

The file is a LevelDB-style log: a 7-byte header (b":W&B", 0xBEE1, version 0), then 32 KiB blocks
of records, each with a crc32c, a length and a type (full / first / middle / last), holding
serialized `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        if len(payload) < length:  # the writer's tail, not on disk yet
            return
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


@dataclass
class OfflineRun:
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)
    group: str = ""
    name: str = ""


def read_run(run_dir: Path) -> OfflineRun:
    """The newest offline W&B run under a run directory's `wandb/offline-run-*`."""
    files = sorted(Path(run_dir).glob("**/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    return read_file(files[-1])


def read_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline W&B run under a run directory (one per rank with log.wandb_per_rank)."""
    return [read_file(f) for f in sorted(Path(run_dir).glob("**/offline-run-*/run-*.wandb"))]


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run, once its `exit` record is on disk. The W&B service buffers the file and may
    still be writing it when `run.finish()` has returned in the training process (seen in CI: a file read at once
    held no `run` record, so no config)."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = list(records(path))
        if recs and recs[-1].WhichOneof("record_type") == "exit":
            return recs
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s:.0f} s (the run did not finish)"
        time.sleep(0.1)


def read_file(path: Path) -> OfflineRun:
    run = OfflineRun()
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
        elif kind == "config":
            for item in rec.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "alert":
            run.alerts.append({"title": rec.alert.title, "text": rec.alert.text})
        elif kind == "run":
            run.group, run.name = rec.run.run_group, rec.run.display_name
            for item in rec.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
    return run
