"""Profiling on real 2-process launches: a step range and SIGUSR2 to a live job; the traces read
back (gzip + JSON, the step markers, the model's convolutions), the W&B artifacts read back from the offline run."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from support.checks import lines, status
from support.launching import ENV, REPO, launch, launch_command, wait_for_step
from support.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture, for the Slurm test)
from support.wandb_offline import finished_records, read_run

from cvae_dist.data import decoded_cache, parquet_files

DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]
# the 500 held-out digits in global batches of 32: 15 steps, a step line at each
QUICK = ["data.train_split=test", "data.batch_size=32", "train.epochs=1", "log.every_steps=1", "train.precision=fp32"]
CONVS_PER_STEP = 6  # the encoder's 3 convolutions and the decoder's 3


def trace_events(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def steps_in(events: list[dict]) -> dict[int, tuple[float, float]]:
    """The trace's `step <n>` markers: {n: (start, end)} in the trace's microseconds."""
    return {
        int(e["name"].split()[1]): (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith("step ")
    }


def ops_per_step(events: list[dict], name: str) -> dict[int | None, int]:
    """How many `name` events fall in each step marker (None: outside every marker)."""
    marked = steps_in(events)
    counts: dict[int | None, int] = {}
    for e in events:
        if e.get("name") == name and e.get("ph") == "X":
            step = next((n for n, (a, b) in marked.items() if a <= e["ts"] <= b), None)
            counts[step] = counts.get(step, 0) + 1
    return counts


def assert_trace_of_steps(path: Path, steps: range) -> None:
    """`path` holds the model's forward and backward convolutions of exactly `steps`, each step marked, and none
    outside them."""
    events = trace_events(path)
    assert sorted(steps_in(events)) == list(steps), f"{path.name}: step markers {sorted(steps_in(events))}"
    for op in ("aten::convolution", "aten::convolution_backward"):
        assert ops_per_step(events, op) == dict.fromkeys(steps, CONVS_PER_STEP), (path.name, op)


def artifacts(run_dir: Path) -> dict[str, list]:
    """The artifact records of the run's offline W&B run, by type (in the order logged)."""
    (path,) = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    found: dict[str, list] = {}
    for rec in finished_records(path):
        if rec.WhichOneof("record_type") == "artifact":
            found.setdefault(rec.artifact.type, []).append(rec.artifact)
    return found


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiled")
    return launch(tmp, "profiled", DDP, [*QUICK, "log.profile_steps=3-5"])


def test_a_step_range_is_traced_on_every_rank_for_exactly_those_steps(profiled):
    run_dir = profiled.run_dir
    assert [r["world_size"] for r in profiled.ranks()] == [2, 2]
    names = sorted(p.name for p in (run_dir / "profiles").iterdir())
    assert names == ["rank0-steps3-5.pt.trace.json.gz", "rank1-steps3-5.pt.trace.json.gz"]
    for name in names:
        assert_trace_of_steps(run_dir / "profiles" / name, range(3, 6))
    (event,) = [r for r in lines(run_dir) if r.get("event") == "profile"]
    assert event["step"] == 5 and event["steps"] == [3, 5] and event["ranks"] == [0, 1]
    assert [p["trace"] for p in event["profiles"]] == [f"profiles/{n}" for n in names]
    for p in event["profiles"]:
        ops = [row["op"] for row in p["top_ops"]]
        assert len(ops) == 10 and any("convolution" in op for op in ops), ops
        assert 0 < sum(row["self_ms"] for row in p["top_ops"]) <= p["self_ms_total"]
    out = profiled.output
    assert f"profile of steps 3-5 (log.profile_steps=3-5): {run_dir}/profiles/{names[0]}" in out
    assert "rank 0: top ops by self CPU time, steps 3-5" in out and "rank 1: top ops by self CPU time" in out


def test_a_profiled_run_takes_the_same_steps_as_an_unprofiled_one(profiled, tmp_path):
    import torch
    from safetensors.torch import load_file

    plain = launch(tmp_path, "plain", DDP, QUICK)
    assert not (plain.run_dir / "profiles").exists()
    assert len(profiled.step_losses()) == 15 and profiled.step_losses() == plain.step_losses()
    a, b = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (profiled, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_traces_and_the_final_model_are_artifacts_of_the_offline_wandb_run(profiled):
    run_dir = profiled.run_dir
    found = artifacts(run_dir)
    (trace,) = found["trace"]
    assert trace.name == "trace-profiled" and "steps3-5" in trace.aliases
    assert sorted(c.path for c in trace.manifest.contents) == [f"rank{r}-steps3-5.pt.trace.json.gz" for r in (0, 1)]
    meta = json.loads(trace.metadata)
    assert meta["steps"] == [3, 5] and meta["ranks"] == [0, 1] and set(meta["top_ops"]) == {"0", "1"}

    (model,) = found["model"]
    assert model.name == "model-profiled"
    assert {c.path for c in model.manifest.contents} >= {"model.safetensors", "config.json"}
    meta = json.loads(model.metadata)
    config = read_run(run_dir).config
    assert meta["config"]["log"]["profile_steps"] == "3-5" and meta["config"]["run_name"] == "profiled"
    for section in ("model", "data", "train", "log"):  # the resolved config, as the W&B run's config has it
        assert meta["config"][section] == config[section], section
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert meta["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    digest = decoded_cache(parquet_files("shipped", "test"), "error").stem.removeprefix("decoded-")
    assert meta["data"] == {"source": "shipped", "split": "test", "digest": digest}
    assert meta["step"] == 15


def worker_ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's workers (its child processes)."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError, StopIteration):
                env = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
                found[int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])] = int(pid)
    return found


def test_sigusr2_to_one_rank_of_a_live_job_profiles_the_same_steps_on_both_and_the_run_completes(tmp_path):
    # the 4,500 training digits in batches of 32: 140 steps, a step line every 10
    overrides = [
        "data.batch_size=32",
        "train.epochs=1",
        "log.every_steps=10",
        "train.precision=fp32",
        "log.wandb=disabled",
    ]
    run_dir = tmp_path / "live"
    with (tmp_path / "live.log").open("w") as log:
        proc = subprocess.Popen(
            launch_command(tmp_path, "live", DDP, overrides),
            cwd=REPO,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_step(run_dir, 10, proc)
        ranks = worker_ranks(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR2)  # one rank is enough: the next exchange tells the other
        signalled_at = max(r["step"] for r in lines(run_dir) if "step" in r)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (tmp_path / "live.log").read_text()
    assert proc.returncode == 0, out[-6000:]
    assert status(run_dir)["state"] == "completed"
    traces = sorted((run_dir / "profiles").iterdir())
    assert len(traces) == 2, traces
    steps = {p.name.split("-", 1)[1] for p in traces}
    assert len(steps) == 1, f"the ranks profiled different steps: {traces}"  # the same steps on both
    first, last = map(int, steps.pop().removeprefix("steps").removesuffix(".pt.trace.json.gz").split("-"))
    assert last - first + 1 == 5 and first > signalled_at  # log.profile_len's default, after the signal
    assert [p.name for p in traces] == [f"rank{r}-steps{first}-{last}.pt.trace.json.gz" for r in (0, 1)]
    for path in traces:
        assert_trace_of_steps(path, range(first, last + 1))
    assert f"SIGUSR2 (rank 1) at step {first - 2}: profiling steps {first}-{last} on every rank" in out, out[-4000:]
    assert max(r["step"] for r in lines(run_dir) if "step" in r) == 140  # training went on to the end


def test_usr2_to_a_slurm_job_profiles_its_trainers_and_neither_stops_nor_requeues_it(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "runs"
    env = {**ENV, "WANDB_MODE": "offline", "NUM_PROCESSES": "2"}  # 2 processes in a 1-task allocation (as test_slurm)
    for key in ("RUN_NAME", "LAUNCH_CONFIG", "LOG_GROUP", "MAX_REQUEUES", "MAX_RESTARTS"):
        env.pop(key, None)
    # the 4,500 training digits in batches of 32 on 2 processes: 140 steps
    job = slurm_cluster.submit(
        "slurm/train.sbatch",
        "configs/debug.yaml",
        "data.batch_size=32",
        "train.epochs=1",
        "log.every_steps=10",
        "train.precision=fp32",
        f"output_dir={out}",
        log_dir=tmp_path / "slurm",
        sbatch=("-n", "1"),
        env=env,
    )
    run_dir = out / f"cvae-train-{job.id}"

    def training(_job) -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and '"step": 20' in metrics.read_text()

    state = slurm_cluster.wait(job, timeout=180, until=training)
    assert state == "RUNNING", f"job {job.id} ended {state} before the signal:\n{job.log_text()[-6000:]}"
    subprocess.run(["scancel", "--signal=USR2", "--batch", job.id], check=True, timeout=30)
    state = slurm_cluster.wait(job, timeout=240)
    log = job.log_text()
    assert state == "COMPLETED", f"job {job.id} ended {state}:\n{log[-6000:]}"
    assert "got SIGUSR2: asking the training processes to profile" in log and "requeue" not in log, log[-6000:]
    assert slurm_cluster.accounting(job.id) == ["COMPLETED"]  # one run: no requeue
    traces = sorted(p.name for p in (run_dir / "profiles").iterdir())
    assert len(traces) == 2 and traces[0].startswith("rank0-") and traces[1] == "rank1-" + traces[0][6:], traces
    assert status(run_dir)["state"] == "completed"
    assert max(r["step"] for r in lines(run_dir) if "step" in r) == 140
