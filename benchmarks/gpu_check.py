"""The GPU check: what a CPU cannot show about the GPU path, asserted on a lent GPU in one call of at most 8 minutes.

    python3 benchmarks/gpu_check.py --out DIR             # on the GPU machine (benchmarks/gpu_check.sh sets it up)
    python3 benchmarks/gpu_check.py --dry-run --out DIR   # on a CPU, tiny sizes: every check's code runs (CI)

Each check runs in a process of its own (a session of its own: a timeout ends it with everything it started) with
its own timeout; its runs and logs go to a fresh folder in /tmp. DIR gets three files, rewritten as each check ends
(a lent machine returns only a few): log.txt, a line per check and at the end a PASS / FAIL table; results.json,
every check's record (status, the figures it asserted on, the error: a crash's first traceback line); logs.tar.gz,
every log the checks wrote (no checkpoints or models). First a preflight imports what the checks need from the
machine's image and the carried wheels. Exit status 0 only when every check passed. No pytest and no W&B: the lent
machine has neither (and every run here is `log.wandb=disabled`); what a run ran as is read from its
`ranks/rank0.json`.

A dry run exercises the same code on the CPU: eager steps where a GPU would capture a graph (each check says so in
its figures), gloo where it would use NCCL, small digits, few steps; the figures' bars (tolerances, the 0.9 ratio)
apply on a GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # (cvae_dist is imported where used: run directly, it is on sys.path then)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]  # the lent machine has no `accelerate` executable
TRAIN = [sys.executable, "-m", "cvae_dist.cli", "train"]


class Sizes:
    """What a check trains on: the debug recipe on a GPU; on a CPU (dry run) 500 digits at 32 x 32 in batches of 64,
    so that a few steps still cross an epoch boundary."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.steps = 12 if dry_run else 60  # graph vs eager, and the resumed trajectory (>= 50 on a GPU)
        self.cut = 4 if dry_run else 20  # the mid-epoch checkpoint
        self.per_epoch = 7 if dry_run else 35  # steps per epoch at these sizes
        small = ["data.train_split=test", "data.batch_size=64", "model.image_size=32"] if dry_run else []
        self.recipe = ["--config", str(REPO / "configs" / "debug.yaml"), "log.wandb=disabled", *small]
        self.gpu = not dry_run
        self.processes = 2 if dry_run else 1  # DeepSpeed on a CPU needs a process group of two (see NOTES)


# Tolerances a correct implementation meets with train.deterministic=true (per step, relative): graph and eager
# run the same kernels on the same data and noise; bf16 rounds the activations, so its trajectories drift more.
def tolerance(precision: str) -> float:
    """The step's own bar (`cvae_dist.step.TOLERANCE`, which a graph's first replay is held to), per step."""
    from cvae_dist.step import TOLERANCE

    return TOLERANCE[precision]


# ---------------------------------------------------------------------------------------------- helpers


def run_in_session(cmd: list[str], log: Path, timeout: float, grace: float = 5) -> int | None:
    """`cmd` from the repo root in a session of its own, its output in `log`; its exit status, None past `timeout`.
    On every way out its whole process group goes (a launcher's ranks, a bench's workers): SIGTERM, up to `grace`
    seconds, SIGKILL."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):  # raised once the group is empty
            os.killpg(proc.pid, signal.SIGTERM)
            for _ in range(int(grace * 10)):
                proc.poll()  # (reaps the leader: a zombie still counts as a member)
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def first_error(log: Path) -> str:
    """The root error in a log: the first traceback's exception line, or an earlier `cvae-dist ...: error:` line (a
    launch prints its ranks' errors before torchrun's own traceback); else the last non-empty line."""
    text = log.read_text(errors="replace").splitlines()
    lines = [x.split("]:", 1)[-1].removeprefix(" ") if x.startswith("[rank") else x for x in text]  # ("[rank0]: ")
    for i, line in enumerate(lines):
        if line.startswith("cvae-dist") and ": error: " in line:
            return line.strip()
        if line.startswith("Traceback (most recent call last):"):
            return next((x.strip() for x in lines[i + 1 :] if x.strip() and not x[0].isspace()), line)
    return next((x.strip() for x in reversed(lines) if x.strip()), "(empty log)")


def train(
    out: Path,
    name: str,
    sizes: Sizes,
    *overrides: str,
    launcher: list[str] | None = None,
    timeout: float = 150,
    log_name: str | None = None,
) -> Path:
    """One real `cvae-dist train` in a fresh process; its full output in out/<log_name or name>.log; the run
    directory."""
    log_name = log_name or name
    timeout *= DRY_RUN_SLOWER if sizes.dry_run else 1
    runs = out / "runs"
    cmd = [
        *(LAUNCH + launcher + ["-m", "cvae_dist.cli", "train"] if launcher else TRAIN),
        *sizes.recipe,
        f"output_dir={runs}",
        f"run_name={name}",
        *overrides,
    ]
    code = run_in_session(cmd, out / f"{log_name}.log", timeout)
    ended = f"no exit within {timeout:.0f} s" if code is None else f"exit {code}"
    assert code == 0, f"{log_name}: {ended}: {first_error(out / f'{log_name}.log')}"
    return runs / name


def step_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "train/step_loss" in r]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/step_loss"] for r in step_lines(run_dir)}


def epoch_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in lines if "train/loss" in r]


def facts(run_dir: Path) -> dict:
    return json.loads((run_dir / "ranks" / "rank0.json").read_text())


def expected_mode(sizes: Sizes, graph: bool = True) -> str:
    return "GraphStep" if graph and sizes.gpu else "EagerStep"


def max_relative_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert list(a) == list(b), f"different steps logged: {list(a)[:5]}... vs {list(b)[:5]}..."
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


# ---------------------------------------------------------------------------------------------- the checks


# The recipe knobs the fp32 comparison turns on: the lr and KL weight change every step (set in place between
# replays), early steps are clipped (gradient norms of the summed loss start near 4e5), the EMA is updated in the graph.
KNOBS = [
    "train.lr_schedule=cosine",
    "train.warmup_images=1280",
    "train.kl_warmup_images=2560",
    "train.clip_grad_norm=100000",
    "train.ema_decay=0.95",
]


def weights_gap(a: Path, b: Path) -> float:
    """The largest relative difference of any tensor of two exports."""
    from safetensors.torch import load_file

    x, y = (load_file(d / "model" / "model.safetensors") for d in (a, b))
    return max(float((x[k].double() - y[k].double()).norm() / max(float(y[k].double().norm()), 1e-12)) for k in y)


def graph_matches_eager(out: Path, sizes: Sizes, precision: str, knobs: list[str] = ()) -> dict:
    """Graph and eager step losses agree within tolerance over >= 50 steps across an epoch boundary; with `knobs`, the
    logged lr and KL weight are the same, the gradient norms and the exported EMAs agree too."""
    common = [
        f"train.max_steps={sizes.steps}",
        "log.every_steps=1",
        f"train.precision={precision}",
        "train.deterministic=true",
        *knobs,
    ]
    graph = train(out, f"graph-{precision}", sizes, *common)
    eager = train(out, f"eager-{precision}", sizes, *common, "train.cuda_graph=false")
    assert facts(graph)["step_mode"] == expected_mode(sizes) and facts(eager)["step_mode"] == "EagerStep"
    assert facts(graph)["deterministic"] is True and facts(graph)["precision"] == precision
    a, b = step_losses(graph), step_losses(eager)
    assert len(a) == sizes.steps and max(a) > sizes.per_epoch, "the steps must cross an epoch boundary"
    worst = max_relative_difference(a, b)
    assert worst <= tolerance(precision), (
        f"graph vs eager: worst step differs by {worst:.2e} (> {tolerance(precision)})"
    )
    figures = {}
    if knobs:
        g, e = (step_lines(d) for d in (graph, eager))
        assert [(r["train/lr"], r["train/kl_weight"]) for r in g] == [(r["train/lr"], r["train/kl_weight"]) for r in e]
        assert len({r["train/lr"] for r in g}) > sizes.steps // 2, "the lr must change along the run"
        norms = {r["step"]: r["train/grad_norm"] for r in g}, {r["step"]: r["train/grad_norm"] for r in e}
        figures = {
            "grad_norm_max_rel_diff": max_relative_difference(*norms),
            "ema_export_rel_diff": weights_gap(graph, eager),
        }
        assert figures["grad_norm_max_rel_diff"] <= 10 * tolerance(precision), f"gradient norms differ: {figures}"
        assert figures["ema_export_rel_diff"] <= 10 * tolerance(precision), f"the exported EMAs differ: {figures}"
    return {
        "steps": len(a),
        "max_rel_diff": worst,
        "tolerance": tolerance(precision),
        "step_mode": facts(graph)["step_mode"],
        "knobs": list(knobs),
        **figures,
    }


def graph_trains_without_host_syncs(out: Path, sizes: Sizes) -> dict:
    """In one process, through the trainer's own parts: the graph really trains (BatchNorm's count, AdamW's device
    step and the meter's step all equal the step count), reads its lr from a tensor (lr 0 set in place: the weights
    stay), draws fresh noise each replay (two replays on one input at lr 0 give different losses), its first replay
    matched the eager step, and between step lines nothing waits for the GPU (`torch.cuda.set_sync_debug_mode
    ("error")`; the stop poll kept out of that window and its own send checked apart: it enqueues, only its read
    waits)."""
    import itertools

    import torch

    from cvae_dist import build, distributed
    from cvae_dist.config import load_config
    from cvae_dist.faults import StopSignal

    cfg = load_config(
        REPO / "configs" / "debug.yaml",
        [
            *sizes.recipe[2:],
            f"output_dir={out / 'runs'}",
            "run_name=in-process",
            "log.every_steps=1000",
            "train.precision=bf16",
        ],
    )
    run = build.build(cfg)
    with contextlib.ExitStack() as finally_:
        finally_.callback(run.accelerator.end_training)
        stop = finally_.enter_context(StopSignal())
        finally_.enter_context(run.opened(stop))
        batches = run.stream.epoch(1, run.steps_per_epoch)

        def steps(n: int) -> None:  # the loop's work of each step, as `train` does it
            for batch in run.monitor.batches(itertools.islice(batches, n), 1, run.steps_per_epoch, 0):
                with run.monitor.step(run.state.step + 1):
                    run.step(batch.pixels.to(run.accelerator.device, non_blocking=True), run.meter)
                run.monitor.stepped(batch.ids)
                run.state.step += 1

        warm = 5 if sizes.gpu else 2  # on a GPU past the graph's warm-up (3 eager steps) and its capture
        steps(warm)
        steady = min(20, run.steps_per_epoch - warm - 1)  # (and one batch left for the two steps below)
        sync_checked = torch.cuda.is_available()
        with sync_errors(sync_checked):  # any call that waits for the GPU raises
            steps(steady)
            read = distributed.send(run.accelerator, {**run.meter.local(), **run.poll.local(False, run.state.step)})
        assert read()["stop"].tolist() == [0.0]  # the exchange's read is where it waits, and only there
        taken = warm + steady
        model = run.accelerator.unwrap_model(run.model)
        counts = {
            name: int(m.num_batches_tracked) for name, m in model.named_modules() if hasattr(m, "num_batches_tracked")
        }
        adam_steps = {int(s["step"]) for s in run.optimizer.state_dict()["state"].values()}
        assert set(counts.values()) == {taken}, f"BatchNorm counted {counts}, not {taken}"
        assert adam_steps == {taken}, f"AdamW's step is {adam_steps}, not {taken}"
        assert int(run.meter.step) == taken, f"the meter counted {int(run.meter.step)}, not {taken}"
        # lr 0, set where the step reads it (in place: a graph reads that very tensor), then the same input twice:
        # the weights must stay as they are (the lr is not baked into the graph) and the losses differ (new noise;
        # BatchNorm normalises with the batch's own statistics, so nothing else can change the loss)
        lrs = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in run.optimizer.param_groups]
        for group in run.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(0.0)
            else:
                group["lr"] = 0.0
        weights = [p.detach().clone() for p in model.parameters()]
        pixels, losses = next(batches).pixels, []
        for _ in range(2):
            before = float(run.meter.interval)
            run.step(pixels, run.meter)
            losses.append(float(run.meter.interval) - before)
        moved = [n for (n, p), w in zip(model.named_parameters(), weights, strict=True) if not torch.equal(p, w)]
        assert not moved, f"with lr 0 set in place the step still moved {moved[:3]}: the lr is baked in"
        assert losses[0] != losses[1], f"two steps on one input gave the same loss {losses[0]}: the noise is frozen"
        for group, lr in zip(run.optimizer.param_groups, lrs, strict=True):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)  # the values, into the tensor the graph reads
            else:
                group["lr"] = lr
        assert run.step.mode == expected_mode(sizes), f"the step ran as {run.step.mode}: {run.step.check}"
        return {
            "steps": taken,
            "step_mode": run.step.mode,
            "graph_check": run.step.check,
            "sync_debug_mode": sync_checked,
            "capturable": [g["capturable"] for g in run.optimizer.param_groups],
            "lr_is_tensor": isinstance(lrs[0], torch.Tensor),
            "two_losses_at_lr0": losses,
        }


@contextlib.contextmanager
def sync_errors(on: bool):
    """`torch.cuda.set_sync_debug_mode("error")` inside the block, where `on`."""
    import torch

    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if on:
            torch.cuda.set_sync_debug_mode("default")


def resume_mid_epoch(out: Path, sizes: Sizes) -> dict:
    """A mid-epoch checkpoint resumed in a fresh process continues the full run's trajectory."""
    common = [
        f"train.max_steps={sizes.steps}",
        "log.every_steps=1",
        f"checkpoint.every_steps={sizes.cut}",
        "checkpoint.keep=100",
        "train.deterministic=true",
        "train.precision=fp32",
    ]
    full = train(out, "full", sizes, *common)
    cut = full.parent / "cut"
    shutil.copytree(full, cut)
    for ckpt in (cut / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > sizes.cut:
            shutil.rmtree(ckpt)
    shutil.rmtree(cut / "model")
    assert sizes.cut % sizes.per_epoch, "the cut must fall inside an epoch"
    resumed = train(out, "cut", sizes, *common, "resume=auto")
    a, b = step_losses(resumed), step_losses(full)
    assert max(a) == max(b) == sizes.steps
    worst = max_relative_difference(a, b)
    assert worst <= tolerance("fp32"), f"resumed trajectory differs by {worst:.2e}"
    return {
        "resumed_at": sizes.cut,
        "steps": sizes.steps,
        "max_rel_diff": worst,
        "step_mode": facts(resumed)["step_mode"],
    }


def eager_checkpoint_into_graph(out: Path, sizes: Sizes) -> dict:
    """A checkpoint written by eager steps (capturable=False in AdamW's saved groups) resumes into graph mode."""
    eager = train(
        out, "eager-first", sizes, f"train.max_steps={sizes.cut}", "train.cuda_graph=false", "log.every_steps=1"
    )
    assert facts(eager)["step_mode"] == "EagerStep"
    train(
        out,
        "eager-first",
        sizes,
        f"train.max_steps={2 * sizes.cut}",
        "train.cuda_graph=true",
        "resume=auto",
        "log.every_steps=1",
        log_name="graph-after",
    )
    after = facts(eager)
    losses = step_losses(eager)
    assert after["step_mode"] == expected_mode(sizes), after["step_mode"]
    assert max(losses) == 2 * sizes.cut and all(v == v and v < 1e7 for v in losses.values())
    return {"step_mode_after": after["step_mode"], "steps": max(losses)}


def ddp_capture_one_rank(out: Path, sizes: Sizes) -> dict:
    """A world of one NCCL rank with the model wrapped in DDP (accelerate does not wrap DDP at one process) and its
    BatchNorm over the world (GlobalBatchNorm2d, as the trainer's at world > 1): the step with DDP's and BatchNorm's
    all-reduces captures; it trains as the unwrapped model does (the same BatchNorm: same gradients and weights after
    14 steps); at lr 0 (the weights stay, so the states stay equal) its gradients and BatchNorm statistics are plain
    nn.BatchNorm2d's. The process tears the group down promptly after (the driver times the exit)."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from cvae_dist.batchnorm import GlobalBatchNorm2d, use_global_batchnorm
    from cvae_dist.config import DataConfig, ModelConfig
    from cvae_dist.data import RankStream
    from cvae_dist.distributed import set_determinism
    from cvae_dist.loss_meter import LossMeter
    from cvae_dist.model import CVAE
    from cvae_dist.step import EagerStep, GraphStep, SampleNoise

    set_determinism(True)
    # fp32 convolutions: TF32's rounding would magnify the last-bit differences of the two BatchNorms compared below
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    accelerator = Accelerator()
    device = accelerator.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    image = 32 if sizes.dry_run else 64
    data = RankStream(
        DataConfig(train_split="test" if sizes.dry_run else "train", batch_size=64), 0, 1, seed=0, device=device
    )
    batches = [b.pixels for b in data.epoch(1, 6)]

    def trajectory(wrap: bool, global_bn: bool, lr: float) -> dict:
        torch.manual_seed(0)
        model = CVAE(ModelConfig(image_size=image)).to(device)
        if global_bn:
            model = use_global_batchnorm(model)
        grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():

            def keep(p: torch.Tensor, into: torch.Tensor = grads[n]) -> None:  # a replay's too: the copy is captured
                into.copy_(p.grad)

            p.register_post_accumulate_grad_hook(keep)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=1e-5, fused=True, capturable=device.type == "cuda"
        )
        side = torch.cuda.Stream() if device.type == "cuda" else None
        with torch.cuda.stream(side) if side else contextlib.nullcontext():
            # (no buffer broadcast, as in the trainer: BatchNorm's statistics are the world's already)
            net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if wrap else model
        if side:
            torch.cuda.current_stream().wait_stream(side)
        noise = SampleNoise(1, 64, 8, slice(0, 64), device)
        eager = EagerStep(accelerator, net, optimizer, noise, image, channels_last=False, skip_nonfinite=False)
        step = GraphStep(eager, 64, warmup=11, side_stream=side, tolerance=tolerance("fp32")) if side else eager
        meter = LossMeter(device, 0, 0)
        torch.manual_seed(1)
        for i in range(14):  # 11 warm-up steps, the capture, replays
            if i == 13:  # the gradients compared are the last step's (on a GPU, a replay's)
                torch._foreach_zero_(list(grads.values()))
            step(batches[i % len(batches)], meter)
        run = {
            "grads": {n: g.clone() for n, g in grads.items()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "stats": {n: b.detach().clone() for n, b in model.named_buffers()},  # running_mean, _var, the counts
            "global": [m._global() for m in model.modules() if isinstance(m, GlobalBatchNorm2d)],
            "captured": isinstance(step, GraphStep) and step.graph is not None,
            "check": step.check,  # the graph's first replay against the eager step (or why it fell back)
            "loss": float(meter.epoch),
        }
        step.close()
        return run

    def worst(a: dict, b: dict, skip: frozenset = frozenset()) -> float:
        assert list(a) == list(b), f"{list(a)} vs {list(b)}"
        return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in a if n not in skip)

    ddp, unwrapped = trajectory(True, True, 1e-3), trajectory(False, True, 1e-3)
    ddp0, plain0 = trajectory(True, True, 0.0), trajectory(False, False, 0.0)
    for run in (ddp, ddp0):
        assert run["captured"] or sizes.dry_run, f"the DDP step was not captured: {run['check']}"
        assert run["global"] and all(run["global"]), f"BatchNorm is not over the world: {run['global']}"
    grads, weights = worst(ddp["grads"], unwrapped["grads"]), worst(ddp["weights"], unwrapped["weights"])
    assert grads <= 1e-3, f"DDP's gradients differ from the unwrapped model's by {grads:.2e} (of the largest)"
    assert weights <= 1e-4, f"DDP's weights after 14 steps differ from the unwrapped model's by {weights:.2e}"
    assert abs(ddp["loss"] - unwrapped["loss"]) <= 1e-3 * abs(unwrapped["loss"])
    # Against nn.BatchNorm2d, at lr 0: with updates, the two BatchNorms' rounding would set the trajectories apart
    # (AdamW turns the rounding noise of a zero gradient into steps of lr). A conv bias before a BatchNorm has no
    # gradient in exact arithmetic (the mean is taken out): its noise is left out.
    noise = frozenset(n for n in ddp0["grads"] if n.endswith(".conv.bias"))
    assert noise, "no conv bias before a BatchNorm found: the model's names changed?"
    for run in (ddp, ddp0):
        silent = [n for n, g in run["grads"].items() if n not in noise and not g.any()]
        assert not silent, f"the last step left no gradient in {silent[:3]}"
    counts = {n: (int(t), int(plain0["stats"][n])) for n, t in ddp0["stats"].items() if t.dtype == torch.long}
    assert counts and all(a == b == 14 for a, b in counts.values()), f"BatchNorm counted (global, plain): {counts}"
    stats = {n: t for n, t in ddp0["stats"].items() if n not in counts}
    bn_grads = worst(ddp0["grads"], plain0["grads"], noise)
    bn_stats = worst(stats, {n: plain0["stats"][n] for n in stats})
    assert bn_grads <= 1e-3, f"with the global BatchNorm, gradients differ from nn.BatchNorm2d's by {bn_grads:.2e}"
    assert bn_stats <= 1e-3, f"the global BatchNorm's running statistics differ from nn.BatchNorm2d's by {bn_stats:.2e}"
    start = time.perf_counter()
    dist.destroy_process_group()
    return {
        "backend": backend,
        "captured": ddp["captured"] and ddp0["captured"],
        "first_replay": ddp["check"],
        "global_batchnorms": len(ddp["global"]),
        "max_rel_grad_diff": grads,
        "max_rel_weight_diff": weights,
        "vs_batchnorm2d_max_rel_grad_diff": bn_grads,
        "vs_batchnorm2d_max_rel_stats_diff": bn_stats,
        "destroy_s": time.perf_counter() - start,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zero_bf16(out: Path, sizes: Sizes, stage: int) -> dict:
    """DeepSpeed ZeRO-`stage` in bf16: the run reports its stage and compute dtype, and the loss falls."""
    launcher = [
        "--config_file",
        str(REPO / "launch" / "deepspeed.yaml"),
        "--zero_stage",
        str(stage),
        "--num_processes",
        str(sizes.processes),
        "--main_process_port",
        str(_free_port()),
    ]
    run = train(out, f"zero{stage}", sizes, "train.epochs=2", "train.precision=bf16", launcher=launcher)
    f = facts(run)
    assert (f["zero_stage"], f["precision"], f["compute_dtype"]) == (stage, "bf16", "bfloat16"), f
    losses = epoch_losses(run)
    assert len(losses) == 2 and losses[1] < losses[0], f"epoch losses {losses}"
    return {"zero_stage": f["zero_stage"], "compute_dtype": f["compute_dtype"], "epoch_losses": losses}


def trainer_vs_hand_graph(out: Path, sizes: Sizes) -> dict:
    """`cvae-dist bench` at batch 128, bf16, channels_last: the trainer's graph mode against the hand-written graph
    in the same process (>= 0.9 of it) with data wait < 5 %, and the share of time the GPU idles between steps (step
    lines included: reported). A dry run has no graph row: its eager row is read."""
    result = out / "bench.json"
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "bench.py"),
        "--sections",
        "compare",
        "--precisions",
        "bf16",
        "--layouts",
        "channels_last",
        "--json",
        str(result),
        *(
            ["--trials", "1", "--seconds", "0.5", "--warmup", "0.2", "model.image_size=32"]
            if sizes.dry_run
            else ["--trials", "3", "--seconds", "2", "--warmup", "1"]
        ),
    ]
    code = run_in_session(cmd, out / "bench.log", timeout=240)
    ended = "no exit within 240 s" if code is None else f"exit {code}"
    assert code == 0, f"bench: {ended}: {first_error(out / 'bench.log')}"
    rows = {row["mode"]: row for row in json.loads(result.read_text())["configs"]}
    row = rows.get("graph") or rows["eager"]
    assert sizes.dry_run or "graph" in rows, "no graph row on a GPU"
    ratio, wait = row["median_ratio"], row["framework"]["median_data_wait_frac"]
    figures = {
        "mode": row["mode"],
        "ratio": ratio,
        "data_wait_frac": wait,
        "idle_frac": row["framework"]["telemetry"].get("idle_frac"),
        "trainer_img_per_s": row["framework"]["median_img_per_s"],
        "hand_img_per_s": (row.get("hand_graph") or row["hand"])["median_img_per_s"],
    }
    if sizes.gpu:
        assert ratio >= 0.9, f"the trainer's graph mode reached {ratio:.3f} of the hand graph (< 0.9)"
        assert wait < 0.05, f"data wait {wait:.1%} (>= 5 %)"
    return figures


# (name, timeout in seconds on a GPU, function): about 6 minutes in all on an H200 by the figures in shared/gpu
CHECKS = [
    ("graph_vs_eager_fp32_knobs", 100, lambda out, s: graph_matches_eager(out, s, "fp32", KNOBS)),
    ("graph_vs_eager_bf16", 100, lambda out, s: graph_matches_eager(out, s, "bf16")),
    ("graph_trains_no_host_sync", 60, graph_trains_without_host_syncs),
    ("resume_mid_epoch", 100, resume_mid_epoch),
    ("eager_checkpoint_into_graph", 90, eager_checkpoint_into_graph),
    ("ddp_capture_one_rank", 90, ddp_capture_one_rank),
    ("zero1_bf16", 80, lambda out, s: zero_bf16(out, s, 1)),
    ("zero2_bf16", 80, lambda out, s: zero_bf16(out, s, 2)),
    ("zero3_bf16", 80, lambda out, s: zero_bf16(out, s, 3)),
    ("trainer_vs_hand_graph", 120, trainer_vs_hand_graph),
]
BUDGET_S = 480  # the whole check on a GPU: one device call of 8 minutes; a check gets at most what is left
# A dry run's timeouts are the GPU's x this: two CPU cores are slower, and the first DeepSpeed launch on a fresh machine
# compiles its CPU op (1-3 minutes seen).
DRY_RUN_SLOWER = 6
EXIT_WITHIN_S = 30  # after a check's result is written, its process must be gone within this (the NCCL teardown)


def run_one(name: str, out: Path, dry_run: bool) -> int:
    """Run one check in this process and write out/<name>.json."""
    from cvae_dist import strict_json

    fn = dict((n, f) for n, _, f in CHECKS)[name]
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        figures, status, error = fn(work, Sizes(dry_run)), "PASS", None
    except Exception as e:  # noqa: BLE001 - a failed assertion or a crash: both are this check's FAIL
        figures, status, error = {}, "FAIL", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    record = {
        "check": name,
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "figures": figures,
        "error": error,
        "written_at": time.time(),
    }
    (out / f"{name}.json").write_text(strict_json.dumps(record, indent=1, default=str) + "\n")
    return 0 if status == "PASS" else 1


# What the checks import beyond torch and accelerate: the GPU machine's image brings the first three (transformers:
# accelerate imports it for every DeepSpeed launch), the carried wheels (.gpu/whl) the rest.
PREFLIGHT = ("pandas", "torchvision", "transformers", "datasets", "omegaconf", "deepspeed")
LOGS = (".log", ".txt", ".json", ".jsonl", ".yaml")  # what logs.tar.gz takes (never from checkpoints/ or model/)


def preflight() -> tuple[bool, str]:
    """Whether everything in PREFLIGHT imports, and one line that names each that does not (or every version)."""
    found, missing = [], []
    for name in PREFLIGHT:
        try:
            found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - absent, or there but broken (built for another torch, say)
            missing.append(f"{name} ({type(e).__name__}: {str(e).strip().partition(chr(10))[0][:120]})")
    if not missing:
        return True, f"gpu_check: preflight: {', '.join(found)}"
    return False, (
        f"gpu_check: preflight: cannot import {'; '.join(missing)} (pandas, torchvision and transformers "
        "come with the machine's image; datasets, omegaconf and deepspeed with the wheels of "
        "benchmarks/gpu_wheels.sh: carry .gpu)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where results go (default: a new temporary directory)")
    p.add_argument("--dry-run", action="store_true", help="on a CPU, tiny sizes (the bars apply on a GPU only)")
    p.add_argument("--only", help="comma list of checks to run (default all): " + ", ".join(n for n, _, _ in CHECKS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # run a single check in this process (the driver's child)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_in_session: the groups it started go too
    if args.one:  # (`out` is the driver's work folder)
        return run_one(args.one, out, args.dry_run)
    names = [n for n, _, _ in CHECKS]
    chosen = names if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"gpu_check: error: unknown check(s) {unknown}; accepted: {', '.join(names)}", file=sys.stderr)
        return 2
    from cvae_dist import strict_json

    log = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the whole check

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run on the CPU)"
    say(f"gpu_check: {card}; torch {torch.__version__}; {'dry run' if args.dry_run else 'full'}; results in {out}")
    complete, line = preflight()
    say(line)
    if not args.dry_run and not complete:
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        say("gpu_check: error: no CUDA GPU here; on a CPU use --dry-run")
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))  # runs, checkpoints, logs: `out` gets 3 files
    results = []

    def save() -> None:
        """results.json and logs.tar.gz as they stand (a lent machine's call may end before the check)."""
        (out / "results.json").write_text(strict_json.dumps(results, indent=1, default=str) + "\n")
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                parts = set(path.relative_to(work).parts)
                if path.suffix in LOGS and path.is_file() and not parts & {"checkpoints", "model"}:
                    tar.add(path, arcname=str(path.relative_to(work)))

    deadline = time.perf_counter() + BUDGET_S * (DRY_RUN_SLOWER if args.dry_run else 1)
    for name, timeout, _ in CHECKS:
        if name not in chosen:
            continue
        start = time.perf_counter()
        timeout = min(timeout * (DRY_RUN_SLOWER if args.dry_run else 1), deadline - start)
        if timeout < 5:
            record = {
                "check": name,
                "status": "FAIL",
                "figures": {},
                "wall_s": 0.0,
                "error": f"not run: the {BUDGET_S} s budget was spent",
            }
            results.append(record)
            say(f"FAIL {name}: {record['error']}")
            continue
        cmd = [sys.executable, __file__, "--one", name, "--out", str(work)] + (["--dry-run"] if args.dry_run else [])
        child_log = work / f"{name}.txt"
        code = run_in_session(cmd, child_log, timeout, grace=10)  # (on SIGTERM the child ends its own groups: 5 s)
        ended = time.time()
        path = work / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"check": name, "figures": {}}
        if code is None:
            record |= {"status": "FAIL", "error": f"no result within {timeout:.0f} s: {first_error(child_log)}"}
        elif code != 0 and record.get("status") == "PASS":
            record |= {"status": "FAIL", "error": f"exit {code} after passing: {first_error(child_log)}"}
        elif "status" not in record:
            record |= {"status": "FAIL", "error": f"exit {code} without a result: {first_error(child_log)}"}
        if record.get("written_at") and ended - record["written_at"] > EXIT_WITHIN_S:
            record |= {"status": "FAIL", "error": f"exited {ended - record['written_at']:.0f} s after its result"}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(record)
        save()
        say(f"{record['status']} {name} ({record['wall_s']} s): {record.get('error') or _brief(record['figures'])}")
    say("\n| check | result | s | figures / error |\n|---|---|---|---|")
    for r in results:
        say(f"| {r['check']} | {r['status']} | {r['wall_s']} | {r.get('error') or _brief(r['figures'])} |")
    passed = sum(r["status"] == "PASS" for r in results)
    say(f"gpu_check: {passed} of {len(results)} checks passed")
    save()
    shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(results) else 1


def _brief(figures: dict) -> str:
    def show(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return str(v)

    return "; ".join(f"{k}={show(v)}" for k, v in figures.items())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from source: the lent machine has no installed cvae-dist
    sys.exit(main())
