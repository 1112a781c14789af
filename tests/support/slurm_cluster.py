"""A real local Slurm cluster for the tests: `slurm/cluster.sh` (one host, emulated nodes node1 and node2).

`slurm_cluster` (session-scoped) installs Slurm if needed (apt-get, ~30 s, root), starts it, and stops it
afterwards unless it was already running. It skips the tests only when this machine cannot host Slurm
(cluster.sh exit code 3: not root, no apt-get, the install failed); any other start failure is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
CANNOT_HOST = 3  # cluster.sh: "this machine cannot host the cluster"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cluster_sh(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), action], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@dataclass
class Job:
    id: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else f"(no log at {self.log})"


class SlurmCluster:
    """sbatch / scontrol / sacct helpers for tests."""

    def submit(self, script: str, *args: str, log_dir: Path, sbatch: tuple[str, ...] = (), env=None) -> Job:
        """`sbatch [sbatch] script args...` from the repo root, the job's log in log_dir."""
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *sbatch, script, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=30)
        assert res.returncode == 0, f"{' '.join(cmd)} failed: {res.stderr}"
        job_id = res.stdout.strip().split(";")[0]
        show = self.show(job_id)
        log = Path(show.get("StdOut", log_dir / f"job-{job_id}.out"))
        return Job(job_id, log)

    def show(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once Slurm has forgotten the job, MinJobAge after it ended)."""
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in res.stdout.split() if "=" in field)

    def accounting(self, job_id: str) -> list[str]:
        """The job's states from the job-completion log (`sacct -c`): one row per run, requeues included."""
        res = subprocess.run(
            ["sacct", "-c", "-j", job_id, "-P", "-n", "-o", "jobid,state"], capture_output=True, text=True, timeout=30
        )
        return [line.split("|")[1] for line in res.stdout.splitlines() if line.split("|")[0] == job_id]

    def state(self, job_id: str) -> str:
        state = self.show(job_id).get("JobState")
        if state is None:  # forgotten by slurmctld: the completion log still has it
            rows = self.accounting(job_id)
            state = rows[-1] if rows else "UNKNOWN"
        return state

    def wait(self, job: Job, timeout: float = 240, until=None) -> str:
        """Poll until the job ends (or `until(job)` is true); on timeout cancel it and fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job.id)
            if state in TERMINAL or (until is not None and until(job)):
                return state
            time.sleep(1)
        subprocess.run(["scancel", job.id], capture_output=True, timeout=30)
        pytest.fail(
            f"job {job.id} still {self.state(job.id)} after {timeout:.0f}s (cancelled); its log {job.log}:\n"
            + job.log_text()[-6000:]
        )


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("bash") is None:
        pytest.skip("no bash: the local Slurm cluster cannot be set up")
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed and installing it (apt-get) needs root")
    was_running = cluster_sh("status", 60).returncode == 0
    res = cluster_sh("start", 300)
    if res.returncode == CANNOT_HOST:
        pytest.skip(f"this machine cannot host the local Slurm cluster: {(res.stderr or res.stdout).strip()}")
    if res.returncode != 0:
        pytest.fail(f"bash slurm/cluster.sh start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    try:
        yield SlurmCluster()
    finally:
        if not was_running:
            cluster_sh("stop", 120)
