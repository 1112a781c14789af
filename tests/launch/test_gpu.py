"""On a CUDA GPU only (marked `gpu`, skipped elsewhere): the whole-step CUDA graph, the resident data on the device,
DeepSpeed in bf16 / fp16 and `auto` precision. Every path these tests cover that also runs on a CPU is tested there as
well. On any machine: the harness of the GPU check (benchmarks/gpu_check.py), which a lent GPU runs once."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.checks import step_losses
from support.launching import DEBUG, launch
from support.wandb_offline import read_run

from cvae_dist.config import DataConfig, load_config
from cvae_dist.data import RankStream
from cvae_dist.train import train

gpu = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

# 20 steps of the debug recipe, a step line every 5, fp32, deterministic kernels (cuDNN may otherwise pick
# non-deterministic backward convolutions, and no two runs would agree bit for bit).
STEPS = [
    "train.max_steps=20",
    "log.every_steps=5",
    "log.wandb=disabled",
    "train.precision=fp32",
    "train.deterministic=true",
]
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}  # graph vs eager, per step line (relative): the same kernels, reordered


@gpu
def test_cuda_graph_is_the_default_and_matches_eager_steps(tmp_path):
    graph = train(load_config(DEBUG, [*STEPS, f"output_dir={tmp_path}", "run_name=graph", "log.wandb=offline"]))
    eager = train(load_config(DEBUG, [*STEPS, f"output_dir={tmp_path}", "run_name=eager", "train.cuda_graph=false"]))
    assert read_run(graph.run_dir).config["step_mode"] == "GraphStep"
    a, b = step_losses(graph.run_dir), step_losses(eager.run_dir)
    assert list(a) == list(b) == [5, 10, 15, 20]
    assert list(a.values()) == pytest.approx(list(b.values()), rel=TOLERANCE["fp32"])
    wa, wb = load_file(graph.run_dir / "model/model.safetensors"), load_file(eager.run_dir / "model/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-4) for k in wa)


@gpu
def test_resume_with_cuda_graphs_continues_the_trajectory(tmp_path):
    """A resumed run warms up with eager steps again before it captures: within graph-vs-eager tolerance."""
    common = [
        "train.max_steps=40",
        "log.every_steps=10",
        "checkpoint.every_steps=20",
        "checkpoint.keep=5",
        "log.wandb=disabled",
        "train.precision=bf16",
        "train.deterministic=true",
        f"output_dir={tmp_path}",
    ]
    full = train(load_config(DEBUG, [*common, "run_name=full"]))
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    for ckpt in (cut / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > 20:
            shutil.rmtree(ckpt)
    shutil.rmtree(cut / "model")
    resumed = train(load_config(DEBUG, [*common, "run_name=cut", "resume=auto"]))
    assert resumed.steps == full.steps == 40
    a, b = step_losses(cut), step_losses(full.run_dir)
    assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()), rel=TOLERANCE["bf16"])


@gpu
@pytest.mark.parametrize("world", [1, 2])
def test_resident_digits_on_the_device_are_the_hosts_global_batches(world):
    on_host = RankStream(DataConfig(), 0, 1, seed=0)
    on_gpu = [RankStream(DataConfig(), r, world, seed=0, device=torch.device("cuda")) for r in range(world)]
    assert all(s.resident and s.table.pixels.is_cuda for s in on_gpu)
    for epoch in (1, 2):
        ranks = [s.epoch(epoch, on_host.local_steps) for s in on_gpu]
        for whole, *shares in zip(on_host.epoch(epoch, on_host.local_steps), *ranks, strict=True):
            assert torch.equal(torch.cat([x.pixels.cpu() for x in shares]), whole.pixels)
            assert torch.equal(torch.cat([x.ids for x in shares]), whole.ids)


@gpu
def test_auto_picks_bf16_on_a_gpu_that_has_it(tmp_path):
    run = train(
        load_config(
            DEBUG,
            ["train.max_steps=5", "log.every_steps=5", "log.wandb=offline", f"output_dir={tmp_path}", "run_name=auto"],
        )
    )
    config = read_run(run.run_dir).config
    want = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert config["precision"] == want and config["step_mode"] == "GraphStep"


@gpu
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_zero_trains_in_half_precision(tmp_path, stage, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    launcher = ["--config_file", "launch/deepspeed.yaml", "--zero_stage", str(stage), "--num_processes", "1"]
    run = launch(tmp_path, f"zero{stage}-{precision}", launcher, ["train.epochs=2", f"train.precision={precision}"])
    config = run.wandb_config()
    assert (config["zero_stage"], config["precision"]) == (stage, precision)
    assert config["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    losses = [e["train/loss"] for e in run.epochs()]
    assert len(losses) == 2 and losses[1] < losses[0]


# ---------------------------------------------------------------------------------------------- the GPU check's harness


def test_gpu_check_shows_the_root_error_of_a_log(tmp_path):
    rank = 'Traceback (most recent call last):\n  File "x.py", line 3, in <module>\n    boom()\n'
    torchrun = (
        "E1207 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0\n"
        'Traceback (most recent call last):\n  File "<frozen runpy>", line 198, in _run_module_as_main\n'
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\ncvae_dist.cli FAILED\n"
        "  rank      : 0 (local_rank: 0)\n=====\n"
    )
    logs = {
        "launch": (
            f"starting\n{rank}RuntimeError: Expected running_mean to have type BFloat16\n{rank}"
            f"RuntimeError: the other rank's\n{torchrun}",
            "RuntimeError: Expected running_mean to have type BFloat16",
        ),
        "user error": (
            "cvae-dist train: error: model.image_size=30: must be a positive multiple of 8\n" * 2 + torchrun,
            "cvae-dist train: error: model.image_size=30: must be a positive multiple of 8",
        ),
        "rank prefix": (
            '[rank0]: Traceback (most recent call last):\n[rank0]:   File "a.py", line 1\n[rank0]:\n'
            "[rank0]: torch.OutOfMemoryError: CUDA out of memory\n",
            "torch.OutOfMemoryError: CUDA out of memory",
        ),
        "no traceback": ("step 10 loss 3.2\nstep 20 loss 3.1\n\n", "step 20 loss 3.1"),
        "empty": ("", "(empty log)"),
    }
    for name, (text, want) in logs.items():
        (tmp_path / "log").write_text(text)
        assert gpu_check.first_error(tmp_path / "log") == want, name


def test_gpu_check_ends_everything_a_timed_out_check_started(tmp_path):
    """The driver times out a check's process; that process had started a command (a launch) whose own child
    ignores SIGTERM: all of them are gone within the graces."""
    pid_file = tmp_path / "pid"
    child = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("gpu_check", {str(REPO / "benchmarks" / "gpu_check.py")!r})
        g = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(g)
        cmd = ["bash", "-c", "trap '' TERM; sleep 300 & echo $! > {pid_file}; wait"]
        g.CHECKS.append(("hang", 60, lambda out, sizes: g.run_in_session(cmd, out / "hang.log", timeout=300)))
        sys.exit(g.main(["--one", "hang", "--out", {str(tmp_path)!r}]))
    """)  # the driver's child, with a check that hangs in a command it started
    start = time.monotonic()
    code = gpu_check.run_in_session([sys.executable, "-c", child], tmp_path / "child.log", timeout=5, grace=10)
    assert code is None and time.monotonic() - start < 5 + 10 + 5
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_gpu_check_preflight_names_what_does_not_import(monkeypatch):
    monkeypatch.setattr(gpu_check, "PREFLIGHT", ("json", "no_such_package_here", "pandas"))
    ok, line = gpu_check.preflight()
    assert not ok and "\n" not in line
    assert "cannot import no_such_package_here (ModuleNotFoundError" in line and "json" not in line.split(" (")[0]


def test_gpu_check_leaves_three_files_in_out(tmp_path):
    """A dry run of one check: $OUT holds the log, one results JSON and one archive of logs (no checkpoint or model
    file), and the runs' folder (under TMPDIR) is gone."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "ddp_capture_one_rank"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*")) == ["log.txt", "logs.tar.gz", "results.json"]
    assert list(tmp.iterdir()) == []
    (record,) = json.loads((out / "results.json").read_text())
    assert record["check"] == "ddp_capture_one_rank" and record["status"] == "PASS", record
    assert record["figures"]["global_batchnorms"] == 5 and record["figures"]["vs_batchnorm2d_max_rel_stats_diff"] < 1e-3
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {"ddp_capture_one_rank.txt", "ddp_capture_one_rank.json"} <= set(names), names
    assert not [n for n in names if "checkpoints" in n or n.endswith((".safetensors", ".bin", ".pt"))], names
    log = (out / "log.txt").read_text()
    assert "gpu_check: preflight: pandas" in log and "| ddp_capture_one_rank | PASS |" in log


def test_gpu_check_stops_before_any_check_when_a_package_is_missing(tmp_path):
    out = tmp_path / "out"
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gpu_check as g; "
        f"g.PREFLIGHT += ('no_such_package_here',); sys.exit(g.main(['--out', {str(out)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("gpu_check: preflight: cannot import no_such_package_here"), lines
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]
