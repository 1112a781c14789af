"""Start real `accelerate launch` jobs of the trainer and read back what every rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from support.wandb_offline import read_run

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"  # the debug recipe by absolute path: tests pass from any directory
# `accelerate launch`, as a module: some machines (the lent GPU ones) have accelerate but no `accelerate` executable
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def strict_loads(text: str, where: Path | str = "JSON"):
    """`json.loads` as strict readers (jq, JSON.parse) read: NaN, Infinity and -Infinity are errors."""

    def refuse(constant: str):
        raise AssertionError(f"{where}: {constant} is not JSON (write null for a figure that is not finite)")

    return json.loads(text, parse_constant=refuse)


def lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [strict_loads(x, path) for x in path.read_text().splitlines()]


@dataclass
class LaunchResult:
    returncode: int
    output: str
    run_dir: Path

    def ranks(self) -> list[dict]:
        files = sorted((self.run_dir / "ranks").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return [strict_loads(p.read_text(), p) for p in files]

    def epochs(self) -> list[dict]:
        return [r for r in lines(self.run_dir) if "train/loss" in r]

    def step_losses(self) -> list[float]:
        return [r["train/step_loss"] for r in lines(self.run_dir) if "train/step_loss" in r]

    def wandb_config(self) -> dict:
        return read_run(self.run_dir).config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAULT_ENTRY = str(Path(__file__).with_name("fault_entry.py"))


def launch_command(
    tmp_path: Path, name: str, launcher_args, overrides=(), config="configs/debug.yaml", fault: tuple = ()
) -> list[str]:
    """`accelerate launch <launcher_args> -m cvae_dist.cli train ...` with a free rendezvous port, so concurrent
    launches (other tests, a benchmark) never collide. `fault`: ("nan", step, rank) or ("slow", rank, seconds)
    runs tests/support/fault_entry.py instead (see there)."""
    port = [] if "--main_process_port" in launcher_args else ["--main_process_port", str(free_port())]
    entry = [FAULT_ENTRY, *map(str, fault)] if fault else ["-m", "cvae_dist.cli"]
    return [
        *ACCELERATE_LAUNCH,
        *launcher_args,
        *port,
        *entry,
        "train",
        "--config",
        str(REPO / config),
        f"output_dir={tmp_path}",
        f"run_name={name}",
        "log.wandb=offline",
        *overrides,
    ]


# (without a W&B service an in-process test may have started: each launch's runs start their own)
ENV = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "PYTHONUNBUFFERED": "1"}


def launch(
    tmp_path: Path,
    name: str,
    launcher_args: list[str],
    overrides: list[str] = (),
    timeout: float = 300,
    config: str = "configs/debug.yaml",
    check: bool = True,
    fault: tuple = (),
) -> LaunchResult:
    """Run a launch to the end and collect what it printed and wrote."""
    cmd = launch_command(tmp_path, name, launcher_args, overrides, config, fault)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{name}: no result within {timeout} s (hang?)\n{e.output}\n{e.stderr}") from None
    result = LaunchResult(proc.returncode, proc.stdout + proc.stderr, tmp_path / name)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}:\n{result.output[-6000:]}")
    return result


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the run's metrics.jsonl has a line at `step` or later (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, f"training ended early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")
