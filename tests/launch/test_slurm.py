"""The sbatch scripts under a real local Slurm cluster (slurm/cluster.sh: one host, emulated node1 and node2).

Kept CPU-light: the debug recipe for one epoch over the 500 held-out digits (3 steps at a global batch of
128; with 2 ranks, 250 digits and 64 per rank: still 3 steps).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from support.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)
from support.wandb_offline import read_run

pytestmark = pytest.mark.slurm

QUICK = ("train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb=offline")


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["WANDB_MODE"] = "offline"
    env["MAIN_ADDR"] = "127.0.0.1"  # the emulated nodes are all this host
    env.pop("RUN_NAME", None)
    for key in ("LAUNCH_CONFIG", "RDZV_BACKEND", "PROCS_PER_NODE", "NUM_PROCESSES", "LOG_GROUP", "MAX_REQUEUES"):
        env.pop(key, None)
    return env


def epoch_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "epoch" in line and "train/loss" in line]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's accelerate checkpoints: its checkpoints/step-* directories."""
    return sorted(p for p in (run_dir / "checkpoints").glob("*") if p.is_dir() and not p.name.startswith("."))


def assert_completed(cluster: SlurmCluster, job, state: str) -> None:
    assert state == "COMPLETED", f"job {job.id} ended {state}; its log:\n{job.log_text()[-6000:]}"
    rows = cluster.accounting(job.id)
    assert rows and rows[-1] == "COMPLETED", f"sacct -c for job {job.id}: {rows}"


def test_single_node_job(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    job = slurm_cluster.submit(
        "slurm/train.sbatch", "configs/debug.yaml", *QUICK, f"output_dir={out}",
        log_dir=tmp_path / "slurm", sbatch=("-n", "1"), env=job_env(),
    )  # fmt: skip
    state = slurm_cluster.wait(job, timeout=240)
    assert_completed(slurm_cluster, job, state)

    run_dir = out / f"cvae-train-{job.id}"  # run_name = $SLURM_JOB_NAME-$SLURM_JOB_ID
    log = job.log_text()
    assert run_dir.is_dir(), f"no run directory {run_dir}; log:\n{log}"
    assert [line["epoch"] for line in epoch_lines(run_dir)] == [1]
    assert checkpoints(run_dir), f"no checkpoint under {run_dir / 'checkpoints'}"
    assert (run_dir / "model").is_dir()
    run = read_run(run_dir)
    assert run.config["world_size"] == 1
    assert run.group == f"cvae-train-{job.id}"
    assert "node node1 machine_rank 0" in log
    assert "training exited with 0" in log


def test_multinode_job(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    job = slurm_cluster.submit(
        "slurm/train_multinode.sbatch", "configs/debug.yaml", *QUICK, "log.sample_ids=true", f"output_dir={out}",
        log_dir=tmp_path / "slurm", sbatch=("-N", "2", "--ntasks-per-node", "1"), env=job_env(),
    )  # fmt: skip
    state = slurm_cluster.wait(job, timeout=240)
    assert_completed(slurm_cluster, job, state)

    run_dir = out / f"cvae-multinode-{job.id}"
    log = job.log_text()
    assert run_dir.is_dir(), f"no run directory {run_dir}; log:\n{log}"
    assert [line["epoch"] for line in epoch_lines(run_dir)] == [1]
    assert checkpoints(run_dir), f"no checkpoint under {run_dir / 'checkpoints'}"
    run = read_run(run_dir)
    assert run.config["world_size"] == 2
    # one launcher per node, on machine ranks 0 and 1 (srun --label prefixes each line with the task number)
    launchers = set(re.findall(r"^\d+: node (node\d) machine_rank (\d+)$", log, flags=re.M))
    assert launchers == {("node1", "0"), ("node2", "1")}, f"launcher lines {launchers}; log:\n{log[-6000:]}"
    # what each rank records of itself, where the trainer writes it
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    # static rendezvous (the script's default): machine rank = SLURM_NODEID
    assert sorted((r["node"], r["machine_rank"]) for r in ranks) == [("node1", 0), ("node2", 1)], ranks
    assert all(r["world_size"] == 2 for r in ranks), ranks
    # the two machines trained on disjoint data: 500 digits, 3 steps x 64 per rank
    ids = [set(r["ids"]["1"]) for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 3 * 64 and not ids[0] & ids[1]


def test_preempted_job_is_requeued_and_resumes(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    # the 4,500 training digits: 35 steps, long enough to be interrupted after a few
    job = slurm_cluster.submit(
        "slurm/train.sbatch", "configs/debug.yaml", "train.epochs=1", "log.every_steps=1", "log.wandb=offline",
        f"output_dir={out}", log_dir=tmp_path / "slurm", sbatch=("-n", "1"), env=job_env(),
    )  # fmt: skip
    run_dir = out / f"cvae-train-{job.id}"

    def training(_job) -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and metrics.read_text().count('"train/step_loss"') >= 2

    state = slurm_cluster.wait(job, timeout=120, until=training)
    assert state == "RUNNING", f"job {job.id} ended {state} before it could be preempted:\n{job.log_text()[-6000:]}"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
    state = slurm_cluster.wait(job, timeout=300)
    assert_completed(slurm_cluster, job, state)

    log = job.log_text()
    assert "got SIGUSR1" in log and "stopped for requeue" in log, log[-6000:]
    assert f"job {job.id} (cvae-train) restart 1 " in log, log[-6000:]
    assert slurm_cluster.show(job.id).get("Restarts") == "1"
    # the completion log has one row per run: the requeued one, then the completed one
    assert len(slurm_cluster.accounting(job.id)) == 2, slurm_cluster.accounting(job.id)
    assert "resumed from" in log, log[-6000:]
    lines = epoch_lines(run_dir)
    assert [line["epoch"] for line in lines] == [1], lines
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert max(steps) == 35, steps
