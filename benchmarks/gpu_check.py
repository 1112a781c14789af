"""The GPU check: what a CPU cannot show about the GPU path, asserted on a lent GPU in one call of at most 8 minutes.

    python3 benchmarks/gpu_check.py --out DIR             # on the GPU machine (benchmarks/gpu_check.sh sets it up)
    python3 benchmarks/gpu_check.py --dry-run --out DIR   # on a CPU, tiny sizes: every check's code runs (CI)

Each check runs in a process of its own with its own timeout and writes DIR/<check>.json as it ends (status, the
figures it asserted on, the error); DIR/log.txt gets a line per check and the last lines are a PASS / FAIL table.
Exit status 0 only when every check passed. No pytest and no W&B: the lent machine has neither (and every run here
is `log.wandb=disabled`); what a run ran as is read from its `ranks/rank0.json`.

A dry run exercises the same code on the CPU: eager steps where a GPU would capture a graph (each check says so in
its figures), gloo where it would use NCCL, small digits, few steps; the figures' bars (tolerances, the 0.9 ratio)
apply on a GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cvae_dist import strict_json

REPO = Path(__file__).resolve().parents[1]
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
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}


# ---------------------------------------------------------------------------------------------- helpers


def train(out: Path, name: str, sizes: Sizes, *overrides: str, launcher: list[str] | None = None,
          timeout: float = 150, log_name: str | None = None) -> Path:  # fmt: skip
    """One real `cvae-dist train` in a fresh process; its full output in out/<log_name or name>.log; the run
    directory."""
    log_name = log_name or name
    timeout *= DRY_RUN_SLOWER if sizes.dry_run else 1
    runs = out / "runs"
    cmd = [*(LAUNCH + launcher + ["-m", "cvae_dist.cli", "train"] if launcher else TRAIN), *sizes.recipe,
           f"output_dir={runs}", f"run_name={name}", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / f"{log_name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{log_name}: exit {proc.returncode}: {_tail(out / f'{log_name}.log')}"
    return runs / name


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text().strip().splitlines()[-lines:])


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/step_loss"] for r in lines if "train/step_loss" in r}


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


def graph_matches_eager(out: Path, sizes: Sizes, precision: str) -> dict:
    """Graph and eager step losses agree within tolerance over >= 50 steps across an epoch boundary."""
    common = [f"train.max_steps={sizes.steps}", "log.every_steps=1", f"train.precision={precision}",
              "train.deterministic=true"]  # fmt: skip
    graph = train(out, f"graph-{precision}", sizes, *common)
    eager = train(out, f"eager-{precision}", sizes, *common, "train.cuda_graph=false")
    assert facts(graph)["step_mode"] == expected_mode(sizes) and facts(eager)["step_mode"] == "EagerStep"
    assert facts(graph)["deterministic"] is True and facts(graph)["precision"] == precision
    a, b = step_losses(graph), step_losses(eager)
    assert len(a) == sizes.steps and max(a) > sizes.per_epoch, "the steps must cross an epoch boundary"
    worst = max_relative_difference(a, b)
    assert worst <= TOLERANCE[precision], (
        f"graph vs eager: worst step differs by {worst:.2e} (> {TOLERANCE[precision]})"
    )
    return {
        "steps": len(a),
        "max_rel_diff": worst,
        "tolerance": TOLERANCE[precision],
        "step_mode": facts(graph)["step_mode"],
    }


def graph_trains_without_host_syncs(out: Path, sizes: Sizes) -> dict:
    """In one process, through the trainer's own parts: the graph really trains (BatchNorm's count, AdamW's device
    step and the meter's step all equal the step count), reads its lr from a tensor (lr 0 set in place: the weights
    stay), draws fresh noise each replay (two replays on one input at lr 0 give different losses), and between step
    lines nothing waits for the GPU (`torch.cuda.set_sync_debug_mode("error")`)."""
    import itertools

    import torch

    from cvae_dist import checkpoint, trainer
    from cvae_dist.config import load_config

    cfg = load_config(REPO / "configs" / "debug.yaml", [*sizes.recipe[2:], f"output_dir={out / 'runs'}",
                      "run_name=in-process", "log.every_steps=1000", "train.precision=bf16"])  # fmt: skip
    parts = trainer.prepare(cfg)
    checkpoint.write_run_dir(parts.dir, cfg, parts.setup.accelerator)
    run = trainer.Trainer(parts)
    try:
        batches = run.stream.epoch(1, parts.steps_per_epoch)
        warm = 5 if sizes.gpu else 2  # on a GPU past the graph's warm-up (3 eager steps) and its capture
        run.steps(itertools.islice(batches, warm), lambda: False)
        steady = min(20, parts.steps_per_epoch - warm - 1)  # (and one batch left for the two steps below)
        sync_checked = torch.cuda.is_available()
        if sync_checked:
            torch.cuda.set_sync_debug_mode("error")  # any call that waits for the GPU raises
        try:
            run.steps(itertools.islice(batches, steady), lambda: False)  # no step line in here
        finally:
            if sync_checked:
                torch.cuda.set_sync_debug_mode("default")
        steps = warm + steady
        model = run.accelerator.unwrap_model(run.model)
        counts = {
            name: int(m.num_batches_tracked) for name, m in model.named_modules() if hasattr(m, "num_batches_tracked")
        }
        adam_steps = {int(s["step"]) for s in run.optimizer.state_dict()["state"].values()}
        assert set(counts.values()) == {steps}, f"BatchNorm counted {counts}, not {steps}"
        assert adam_steps == {steps}, f"AdamW's step is {adam_steps}, not {steps}"
        assert int(run.meter.step) == steps, f"the meter counted {int(run.meter.step)}, not {steps}"
        # lr 0, set where the step reads it (in place: a graph reads that very tensor), then the same input twice:
        # the weights must stay as they are (the lr is not baked into the graph) and the losses differ (new noise;
        # BatchNorm normalises with the batch's own statistics, so nothing else can change the loss)
        lrs = [g["lr"] for g in run.optimizer.param_groups]
        for group in run.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(0.0)
            else:
                group["lr"] = 0.0
        weights = [p.detach().clone() for p in model.parameters()]
        pixels, losses = next(batches).pixels, []
        for _ in range(2):
            before = float(run.meter.interval)
            run.step(pixels, run.timer, run.meter)
            losses.append(float(run.meter.interval) - before)
        moved = [n for (n, p), w in zip(model.named_parameters(), weights, strict=True) if not torch.equal(p, w)]
        assert not moved, f"with lr 0 set in place the step still moved {moved[:3]}: the lr is baked in"
        assert losses[0] != losses[1], f"two steps on one input gave the same loss {losses[0]}: the noise is frozen"
        for group, lr in zip(run.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        return {"steps": steps, "step_mode": type(run.step).__name__, "sync_debug_mode": sync_checked,
                "capturable": [g["capturable"] for g in run.optimizer.param_groups],
                "lr_is_tensor": isinstance(lrs[0], torch.Tensor), "two_losses_at_lr0": losses}  # fmt: skip
    finally:
        parts.step.close()
        parts.setup.accelerator.end_training()


def resume_mid_epoch(out: Path, sizes: Sizes) -> dict:
    """A mid-epoch checkpoint resumed in a fresh process continues the full run's trajectory."""
    common = [f"train.max_steps={sizes.steps}", "log.every_steps=1", f"checkpoint.every_steps={sizes.cut}",
              "checkpoint.keep=100", "train.deterministic=true", "train.precision=fp32"]  # fmt: skip
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
    assert worst <= TOLERANCE["fp32"], f"resumed trajectory differs by {worst:.2e}"
    return {
        "resumed_at": sizes.cut,
        "steps": sizes.steps,
        "max_rel_diff": worst,
        "step_mode": facts(resumed)["step_mode"],
    }


def eager_checkpoint_into_graph(out: Path, sizes: Sizes) -> dict:
    """A checkpoint written by eager steps (capturable=False in AdamW's saved groups) resumes into graph mode."""
    eager = train(out, "eager-first", sizes, f"train.max_steps={sizes.cut}", "train.cuda_graph=false",
                  "log.every_steps=1")  # fmt: skip
    assert facts(eager)["step_mode"] == "EagerStep"
    train(out, "eager-first", sizes, f"train.max_steps={2 * sizes.cut}", "train.cuda_graph=true", "resume=auto",
          "log.every_steps=1", log_name="graph-after")  # fmt: skip
    after = facts(eager)
    losses = step_losses(eager)
    assert after["step_mode"] == expected_mode(sizes), after["step_mode"]
    assert max(losses) == 2 * sizes.cut and all(v == v and v < 1e7 for v in losses.values())
    return {"step_mode_after": after["step_mode"], "steps": max(losses)}


def ddp_capture_one_rank(out: Path, sizes: Sizes) -> dict:
    """A world of one NCCL rank with the model wrapped in DDP (accelerate does not wrap DDP at one process): the
    step with DDP's all-reduce captures, its gradients match the unwrapped model's, and the process tears the group
    down promptly after (the driver times the exit)."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from cvae_dist.config import DataConfig, ModelConfig
    from cvae_dist.data import RankStream
    from cvae_dist.distributed import set_determinism
    from cvae_dist.loss_meter import LossMeter
    from cvae_dist.model import CVAE
    from cvae_dist.step import EagerStep, GraphStep, SampleNoise
    from cvae_dist.telemetry import NoTimer

    set_determinism(True)
    accelerator = Accelerator()
    device = accelerator.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    image = 32 if sizes.dry_run else 64
    data = RankStream(DataConfig(train_split="test" if sizes.dry_run else "train", batch_size=64), 0, 1, seed=0,
                      device=device)  # fmt: skip
    batches = [b.pixels for b in data.epoch(1, 6)]

    def trajectory(wrap: bool):
        torch.manual_seed(0)
        model = CVAE(ModelConfig(image_size=image)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True,
                                      capturable=device.type == "cuda")  # fmt: skip
        side = torch.cuda.Stream() if device.type == "cuda" else None
        with torch.cuda.stream(side) if side else contextlib.nullcontext():
            net = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
        if side:
            torch.cuda.current_stream().wait_stream(side)
        noise = SampleNoise(1, 64, 8, slice(0, 64), device)
        eager = EagerStep(accelerator, net, optimizer, noise, image, channels_last=False, skip_nonfinite=False)
        step = GraphStep(eager, 64, warmup=11, side_stream=side) if side else eager
        meter = LossMeter(device, 0, 0)
        torch.manual_seed(1)
        for i in range(14):  # 11 warm-up steps, the capture, replays
            step(batches[i % len(batches)], NoTimer(64), meter)
        # the last replay's gradients stay in the graph's tensors (eager steps set them to None)
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        weights = [p.detach().clone() for p in model.parameters()]
        captured = isinstance(step, GraphStep) and step.graph is not None
        step.close()
        return grads, weights, float(meter.epoch), captured

    ddp_grads, ddp_weights, ddp_loss, captured = trajectory(wrap=True)
    plain_grads, plain_weights, plain_loss, _ = trajectory(wrap=False)

    def worst(a: list, b: list) -> float:
        return max((float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True)),
                   default=0.0)  # fmt: skip

    assert captured or sizes.dry_run, "the DDP step was not captured"
    assert len(ddp_grads) == len(plain_grads) == (len(ddp_weights) if captured else 0)
    grads, weights = worst(ddp_grads, plain_grads), worst(ddp_weights, plain_weights)
    assert grads <= 1e-3, f"DDP's gradients differ from the unwrapped model's by {grads:.2e} (of the largest)"
    assert weights <= 1e-4, f"DDP's weights after 14 steps differ from the unwrapped model's by {weights:.2e}"
    assert abs(ddp_loss - plain_loss) <= 1e-3 * abs(plain_loss)
    start = time.perf_counter()
    dist.destroy_process_group()
    return {
        "backend": backend,
        "captured": captured,
        "max_rel_grad_diff": grads,
        "max_rel_weight_diff": weights,
        "destroy_s": time.perf_counter() - start,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zero_bf16(out: Path, sizes: Sizes, stage: int) -> dict:
    """DeepSpeed ZeRO-`stage` in bf16: the run reports its stage and compute dtype, and the loss falls."""
    launcher = ["--config_file", str(REPO / "launch" / "deepspeed.yaml"), "--zero_stage", str(stage),
                "--num_processes", str(sizes.processes), "--main_process_port", str(_free_port())]  # fmt: skip
    run = train(out, f"zero{stage}", sizes, "train.epochs=2", "train.precision=bf16", launcher=launcher)
    f = facts(run)
    assert (f["zero_stage"], f["precision"], f["compute_dtype"]) == (stage, "bf16", "bfloat16"), f
    losses = epoch_losses(run)
    assert len(losses) == 2 and losses[1] < losses[0], f"epoch losses {losses}"
    return {"zero_stage": f["zero_stage"], "compute_dtype": f["compute_dtype"], "epoch_losses": losses}


def trainer_vs_hand_graph(out: Path, sizes: Sizes) -> dict:
    """`cvae-dist bench` at batch 128, bf16, channels_last: the trainer's graph mode against the hand-written graph
    in the same process (>= 0.9 of it) with data wait < 5 %. A dry run has no graph row: its eager row is read."""
    result = out / "bench.json"
    cmd = [sys.executable, "-m", "cvae_dist.cli", "bench", "--sections", "compare", "--precisions", "bf16",
           "--layouts", "channels_last", "--json", str(result),
           *(["--trials", "1", "--seconds", "0.5", "--warmup", "0.2", "model.image_size=32"] if sizes.dry_run
             else ["--trials", "3", "--seconds", "2", "--warmup", "1"])]  # fmt: skip
    with open(out / "bench.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, f"bench: exit {proc.returncode}: {_tail(out / 'bench.log')}"
    rows = {row["mode"]: row for row in json.loads(result.read_text())["configs"]}
    row = rows.get("graph") or rows["eager"]
    assert sizes.dry_run or "graph" in rows, "no graph row on a GPU"
    ratio, wait = row["median_ratio"], row["framework"]["median_data_wait_frac"]
    figures = {"mode": row["mode"], "ratio": ratio, "data_wait_frac": wait,
               "trainer_img_per_s": row["framework"]["median_img_per_s"],
               "hand_img_per_s": (row.get("hand_graph") or row["hand"])["median_img_per_s"]}  # fmt: skip
    if sizes.gpu:
        assert ratio >= 0.9, f"the trainer's graph mode reached {ratio:.3f} of the hand graph (< 0.9)"
        assert wait < 0.05, f"data wait {wait:.1%} (>= 5 %)"
    return figures


# (name, timeout in seconds on a GPU, function): about 6 minutes in all on an H200 by the figures in shared/gpu
CHECKS = [
    ("graph_vs_eager_fp32", 100, lambda out, s: graph_matches_eager(out, s, "fp32")),
    ("graph_vs_eager_bf16", 100, lambda out, s: graph_matches_eager(out, s, "bf16")),
    ("graph_trains_no_host_sync", 60, graph_trains_without_host_syncs),
    ("resume_mid_epoch", 100, resume_mid_epoch),
    ("eager_checkpoint_into_graph", 90, eager_checkpoint_into_graph),
    ("ddp_capture_one_rank", 60, ddp_capture_one_rank),
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
    fn = dict((n, f) for n, _, f in CHECKS)[name]
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        figures, status, error = fn(work, Sizes(dry_run)), "PASS", None
    except Exception as e:  # noqa: BLE001 - a failed assertion or a crash: both are this check's FAIL
        figures, status, error = {}, "FAIL", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    record = {"check": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
              "figures": figures, "error": error, "written_at": time.time()}  # fmt: skip
    (out / f"{name}.json").write_text(strict_json.dumps(record, indent=1, default=str) + "\n")
    return 0 if status == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where results go (default: a new temporary directory)")
    p.add_argument("--dry-run", action="store_true", help="on a CPU, tiny sizes (the bars apply on a GPU only)")
    p.add_argument("--only", help="comma list of checks to run (default all): " + ", ".join(n for n, _, _ in CHECKS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # run a single check in this process (the driver's child)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        return run_one(args.one, out, args.dry_run)
    names = [n for n, _, _ in CHECKS]
    chosen = names if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"gpu_check: error: unknown check(s) {unknown}; accepted: {', '.join(names)}", file=sys.stderr)
        return 2
    log = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the whole check

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run on the CPU)"
    say(f"gpu_check: {card}; torch {torch.__version__}; {'dry run' if args.dry_run else 'full'}; results in {out}")
    if not args.dry_run and not torch.cuda.is_available():
        say("gpu_check: error: no CUDA GPU here; on a CPU use --dry-run")
        return 2
    results = []
    deadline = time.perf_counter() + BUDGET_S * (DRY_RUN_SLOWER if args.dry_run else 1)
    for name, timeout, _ in CHECKS:
        if name not in chosen:
            continue
        start = time.perf_counter()
        timeout = min(timeout * (DRY_RUN_SLOWER if args.dry_run else 1), deadline - start)
        if timeout < 5:
            record = {"check": name, "status": "FAIL", "figures": {}, "wall_s": 0.0,
                      "error": f"not run: the {BUDGET_S} s budget was spent"}  # fmt: skip
            results.append(record)
            say(f"FAIL {name}: {record['error']}")
            continue
        cmd = [sys.executable, __file__, "--one", name, "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
        with open(out / f"{name}.txt", "w") as child_log:
            try:
                proc = subprocess.run(cmd, cwd=REPO, stdout=child_log, stderr=subprocess.STDOUT, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        ended = time.time()
        path = out / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"check": name, "figures": {}}
        if code is None:
            record |= {"status": "FAIL", "error": f"no result within {timeout:.0f} s (a hang?); see {name}.txt"}
        elif code != 0 and record.get("status") == "PASS":
            record |= {"status": "FAIL", "error": f"exit {code} after passing; see {name}.txt"}
        elif "status" not in record:
            record |= {"status": "FAIL", "error": f"exit {code} without a result; see {name}.txt"}
        if record.get("written_at") and ended - record["written_at"] > EXIT_WITHIN_S:
            record |= {"status": "FAIL", "error": f"exited {ended - record['written_at']:.0f} s after its result"}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        path.write_text(strict_json.dumps(record, indent=1, default=str) + "\n")
        results.append(record)
        say(f"{record['status']} {name} ({record['wall_s']} s): {record.get('error') or _brief(record['figures'])}")
    say("\n| check | result | s | figures / error |\n|---|---|---|---|")
    for r in results:
        say(f"| {r['check']} | {r['status']} | {r['wall_s']} | {r.get('error') or _brief(r['figures'])} |")
    passed = sum(r["status"] == "PASS" for r in results)
    say(f"gpu_check: {passed} of {len(results)} checks passed")
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
