"""The sbatch scripts under a real local Slurm cluster (slurm/cluster.sh: one host, emulated node1 and node2).

Kept CPU-light: the debug recipe for one epoch over the 500 held-out digits (3 steps at a global batch of
128; with 2 ranks, 250 digits and 64 per rank: still 3 steps).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.slurm_cluster import Job, SlurmCluster, cluster_sh, slurm_cluster  # noqa: F401  (the fixture)
from support.wandb_offline import read_run

pytestmark = pytest.mark.slurm

QUICK = ("train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb=offline")
# the 4,500 training digits: 35 steps, long enough to be interrupted after a few
LONG = ("train.epochs=1", "log.every_steps=1", "log.wandb=offline")


def submit_one_node(cluster: SlurmCluster, tmp_path, recipe, *overrides: str, **env: str):
    """slurm/train.sbatch as a one-node job of `recipe` and `overrides` (logs in tmp_path/slurm), `env` added."""
    return cluster.submit(
        "slurm/train.sbatch",
        str(recipe),
        *overrides,
        log_dir=tmp_path / "slurm",
        sbatch=("-n", "1"),
        env={**job_env(), **env},
    )


def job_env() -> dict[str, str]:
    env = dict(os.environ)  # (with the W&B service in-process tests started here: job.sh must not use it)
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


def training(run_dir: Path) -> bool:
    """The run has logged two steps: time to preempt it."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count('"train/step_loss"') >= 2


def preempt(cluster: SlurmCluster, job: Job, run_dir: Path, start_s: float, end_s: float, before=None) -> str:
    """Wait until the job trains, (call `before`,) send its batch script USR1; the job's state once it has ended."""
    state = cluster.wait(job, timeout=start_s, until=lambda _job: training(run_dir))
    assert state == "RUNNING", f"job {job.id} ended {state} before it could be preempted:\n{job.log_text()[-6000:]}"
    if before is not None:
        before()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
    return cluster.wait(job, timeout=end_s)


def max_step(run_dir: Path) -> int:
    return max(json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x)


def trainer_pids(out: Path) -> list[int]:
    """The training processes writing under `out` (not their launcher, `accelerate launch`)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"output_dir={out}".encode() in argv and b"cvae_dist.cli" in argv and b"launch" not in argv[:3]:
            pids.append(int(proc.name))
    return pids


def assert_completed(cluster: SlurmCluster, job, state: str) -> None:
    assert state == "COMPLETED", f"job {job.id} ended {state}; its log:\n{job.log_text()[-6000:]}"
    rows = cluster.accounting(job.id)
    assert rows and rows[-1] == "COMPLETED", f"sacct -c for job {job.id}: {rows}"


def test_single_node_job(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    job = submit_one_node(slurm_cluster, tmp_path, "configs/debug.yaml", *QUICK, f"output_dir={out}")
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
    # the first attempt already has the stable name and resume=allow (a new run where nothing is saved yet)
    assert (run.config["run_name"], run.config["resume"]) == (f"cvae-train-{job.id}", "allow"), run.config
    assert "node node1 machine_rank 0" in log
    assert "training exited with 0" in log


def test_multinode_job(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    job = slurm_cluster.submit(
        "slurm/train_multinode.sbatch",
        "configs/debug.yaml",
        *QUICK,
        "log.sample_ids=true",
        f"output_dir={out}",
        log_dir=tmp_path / "slurm",
        sbatch=("-N", "2", "--ntasks-per-node", "1"),
        env=job_env(),
    )
    state = slurm_cluster.wait(job, timeout=240)
    assert_completed(slurm_cluster, job, state)

    run_dir = out / f"cvae-multinode-{job.id}"
    log = job.log_text()
    assert run_dir.is_dir(), f"no run directory {run_dir}; log:\n{log}"
    assert [line["epoch"] for line in epoch_lines(run_dir)] == [1]
    assert checkpoints(run_dir), f"no checkpoint under {run_dir / 'checkpoints'}"
    run = read_run(run_dir)
    assert run.config["world_size"] == 2
    assert (run.config["run_name"], run.config["resume"]) == (f"cvae-multinode-{job.id}", "allow"), run.config
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
    job = submit_one_node(slurm_cluster, tmp_path, "configs/debug.yaml", *LONG, f"output_dir={out}")
    run_dir = out / f"cvae-train-{job.id}"
    state = preempt(slurm_cluster, job, run_dir, 120, 300)
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
    assert max_step(run_dir) == 35


def test_preempted_array_task_is_requeued_alone(slurm_cluster: SlurmCluster, tmp_path, request):  # noqa: F811
    # Two tasks at once, one per node. Task 1 is the array's own job record (its SLURM_JOB_ID is the array's id):
    # `scontrol requeue <that id>` would requeue the whole array, `<array>_1` requeues task 1 only.
    out, logs = tmp_path / "runs", tmp_path / "slurm"
    array = slurm_cluster.submit(
        "slurm/train.sbatch",
        "configs/debug.yaml",
        *LONG,
        f"output_dir={out}",
        log_dir=logs,
        sbatch=("-n", "1", "--array=0-1", f"--output={logs}/%x-%A_%a.out"),
        env=job_env(),
    ).id
    request.addfinalizer(lambda: subprocess.run(["scancel", array], capture_output=True, timeout=30))
    tasks = [Job(f"{array}_{t}", logs / f"cvae-train-{array}_{t}.out") for t in (0, 1)]
    run_dirs = [out / f"cvae-train-{array}_{t}" for t in (0, 1)]  # named after the task, the same across requeues
    slurm_cluster.wait(tasks[1], timeout=60, until=lambda task: ", run " in task.log_text())
    assert f", run cvae-train-{array}_1, " in tasks[1].log_text(), tasks[1].log_text()[-3000:]
    state = slurm_cluster.wait(tasks[1], timeout=120, until=lambda _task: training(run_dirs[1]))
    assert state == "RUNNING", f"task {tasks[1].id} ended {state} before it could be preempted"
    job_ids = [slurm_cluster.show(task.id)["JobId"] for task in tasks]  # each task's SLURM_JOB_ID
    subprocess.run(["scancel", "--signal=USR1", "--batch", tasks[1].id], check=True, timeout=30)
    for task in tasks:
        state = slurm_cluster.wait(task, timeout=300)
        assert state == "COMPLETED", f"task {task.id} ended {state}; its log:\n{task.log_text()[-6000:]}"

    assert f"scontrol requeue {array}_1 " in tasks[1].log_text(), tasks[1].log_text()[-6000:]
    assert [slurm_cluster.show(task.id).get("Restarts") for task in tasks] == ["0", "1"]
    assert [len(slurm_cluster.accounting(job_id)) for job_id in job_ids] == [1, 2]  # task 1: requeued, completed
    assert "resumed from" in tasks[1].log_text() and "resumed from" not in tasks[0].log_text()
    for run_dir in run_dirs:
        assert [line["epoch"] for line in epoch_lines(run_dir)] == [1] and max_step(run_dir) == 35


def test_dead_process_restarts_in_place_and_usr1_still_requeues(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    job = submit_one_node(
        slurm_cluster,
        tmp_path,
        "configs/debug.yaml",
        *LONG,
        "checkpoint.every_steps=4",
        f"output_dir={out}",
        MAX_RESTARTS="2",
    )
    run_dir = out / f"cvae-train-{job.id}"
    state = slurm_cluster.wait(job, timeout=120, until=lambda _job: checkpoints(run_dir))
    assert state == "RUNNING", f"job {job.id} ended {state}:\n{job.log_text()[-6000:]}"
    killed_at, pids = max_step(run_dir), trainer_pids(out)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)  # torchrun restarts it in the allocation, and it resumes
    state = slurm_cluster.wait(
        job, timeout=120, until=lambda j: "resumed from" in j.log_text() and max_step(run_dir) > killed_at
    )
    assert state == "RUNNING" and slurm_cluster.show(job.id).get("Restarts") == "0", job.log_text()[-6000:]
    # a restart is left, yet USR1 still stops the job for a requeue (not a restart in place)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
    assert_completed(slurm_cluster, job, slurm_cluster.wait(job, timeout=300))

    log = job.log_text()
    assert "max_restarts 2" in log and "stopped for requeue" in log, log[-6000:]
    assert slurm_cluster.show(job.id).get("Restarts") == "1" and log.count("resumed from") == 2, log[-6000:]
    assert [line["epoch"] for line in epoch_lines(run_dir)] == [1] and max_step(run_dir) == 35


def test_preempted_multirank_job_finds_a_renamed_run(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    # The run directory is the trainer's to decide: here a run_name= override (it wins over the script's) under an
    # output_dir that only the recipe sets. Two ranks under torchrun, which reports their exit 75 as 1: only the
    # run's status.json tells the job script that they stopped to be requeued.
    out = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {out}\n")
    job = submit_one_node(slurm_cluster, tmp_path, str(recipe), *LONG, "run_name=renamed", NUM_PROCESSES="2")
    run_dir = out / "renamed"
    state = preempt(slurm_cluster, job, run_dir, 180, 360)
    assert_completed(slurm_cluster, job, state)

    log = job.log_text()
    assert "2 processes" in log and "stopped for requeue (exit 1)" in log, log[-6000:]
    assert f"job {job.id} (cvae-train) restart 1 " in log and "resumed from" in log, log[-6000:]
    assert slurm_cluster.show(job.id).get("Restarts") == "1"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert read_run(run_dir).config["world_size"] == 2
    assert [line["epoch"] for line in epoch_lines(run_dir)] == [1] and max_step(run_dir) == 35
    assert sorted(p.name for p in out.iterdir()) == ["renamed"]


def test_refused_restart_after_preemption_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    # The first attempt is preempted and requeued, leaving "preempted" in status.json. Meanwhile the recipe has
    # changed the global batch, which the trainer refuses on resume (exit 2, before it starts the run): that
    # status.json is the last attempt's, and the job must fail with the refusal, not requeue itself again. (It fails
    # with exit 1: `accelerate launch`, with or without torchrun, reports any failure of its processes as 1.)
    out = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  batch_size: 128\n")
    job = submit_one_node(slurm_cluster, tmp_path, str(recipe), *LONG, f"output_dir={out}", MAX_REQUEUES="2")
    run_dir = out / f"cvae-train-{job.id}"
    changed = lambda: recipe.write_text("data:\n  batch_size: 64\n")  # noqa: E731  (what the requeued attempt reads)
    state = preempt(slurm_cluster, job, run_dir, 120, 300, before=changed)

    log = job.log_text()
    show = slurm_cluster.show(job.id)
    assert (state, show.get("ExitCode")) == ("FAILED", "1:0"), f"job {job.id} ended {state} {show}:\n{log[-6000:]}"
    assert show.get("Restarts") == "1" and log.count("stopped for requeue") == 1, log[-6000:]
    assert "resume with data.batch_size=128" in log and "this attempt started no run" in log, log[-6000:]
    assert "exitcode  : 2 " in log and "training exited with 1" in log, log[-6000:]  # torchrun's summary
    rows = slurm_cluster.accounting(job.id)  # one row per run: the requeued one, then the refused one
    assert len(rows) == 2 and rows[-1] == "FAILED", rows
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"  # the refusal wrote nothing


def test_a_start_after_a_killed_one_frees_the_nodes_its_jobs_held(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    # A test session killed with a job running (a CI runner's session ended) leaves the job RUNNING in the saved
    # state; the next start recovered it and node1 stayed allocated for good, so a 2-node job never started.
    def submit(*sbatch: str) -> str:
        cmd = ["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *sbatch]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    held = submit("-w", "node1", "--wrap", "sleep 617")
    slurm_cluster.wait(
        Job(held, tmp_path / f"{held}.out"), timeout=60, until=lambda j: slurm_cluster.state(j.id) == "RUNNING"
    )
    # the job's processes and the slurmds die at once, as in a killed session; slurmctld saves its state on TERM
    state_dir = Path(os.environ.get("CVAE_SLURM_DIR", "/tmp/cvae-slurm"))
    ctld, *slurmds = (
        int((state_dir / f"{name}.pid").read_text()) for name in ("slurmctld", "slurmd-node1", "slurmd-node2")
    )
    steps = subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{held}\.|^sleep 617$"], capture_output=True, text=True)
    for pid in slurmds + [int(p) for p in steps.stdout.split()]:
        os.kill(pid, signal.SIGKILL)
    os.kill(ctld, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{ctld}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)

    res = cluster_sh("start", 300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"cancelling job {held}" in res.stdout, res.stdout
    both = submit("-N", "2", "--wrap", "true")
    assert slurm_cluster.wait(Job(both, tmp_path / f"{both}.out"), timeout=90) == "COMPLETED"
