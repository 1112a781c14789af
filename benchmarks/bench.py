"""How fast the framework trains, against a plain hand-written PyTorch loop of the same model.

    python benchmarks/bench.py [--sections compare,data,telemetry] [--scaling] [--trials N] [--seconds S]
                               [--compile [BACKEND]] [--batch N] [--json FILE] [config overrides ...]

The framework is timed from outside, as a user runs it: a framework trial is one `train(cfg)` run (a temporary
directory, W&B off, `train.max_steps` steps) read back from its step lines (`metrics.jsonl`) and facts
(`ranks/rank0.json`). A run's first step line and each later epoch's first are left out (warm-up; the epoch's end:
evaluation, figure), on CUDA the first two (a line's timings there are the interval before it); a trial's img/s is
its lines' images over their time. Sections (`--sections`; `--scaling` adds `scaling`):

- `compare`: per precision (fp32, bf16) x layout (NCHW, channels_last), one process alternating trials of (a) a
  minimal hand-written loop (CVAE, the recipe's fused AdamW, in-memory batches of resized 64x64 images,
  `vae_loss(...).total`, zero_grad / backward / step) for `--seconds`, and (b) a framework run of about `--seconds`
  of step lines at the rate of one short warm-up run. On CUDA a `graph` row too: (a) as one captured CUDA graph (the
  step's ceiling) against `train.cuda_graph=true`. The sides' order rotates per trial, so drifting load hits all
  alike; medians over trials (the ratio column: the median of per-trial ratios), MFU and data wait.
- `data`: the batching rate of `RankStream` alone (1 rank of 1, each rank of 2): every digit decoded (a streamed
  shard, or a first epoch), the resident table's build, batches from it (later epochs, orders included), with and
  without the on-device resize, against the training rate; and the data-wait share of the framework's steps.
- `telemetry`: runs with `log.telemetry` on and off, interleaved in one process.
- `scaling`: 1 process x 2 threads, 2 processes x 1 thread (DDP over gloo) with global and with local BatchNorm, 1 x
  1: each a real `accelerate launch` of `cvae-dist train`, a trial per step line (one run per launch: its process
  group ends with the run); efficiency = 2x1 / 1x2, per core 2x1 / (2 x 1x1), global / local BatchNorm at 2x1.

`compare` and `telemetry` run in processes of their own, one precision each (accelerate keeps one state per
process). `--compile [BACKEND]` (default inductor): the hand model through `torch.compile`, the framework as under
`accelerate launch --dynamo_backend`; `--batch N`: both loops' batch (the framework's global `data.batch_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cvae_dist import strict_json
from cvae_dist.config import ConfigError, load_config
from cvae_dist.strict_json import known, shown
from cvae_dist.train import train  # the framework's one public entry point: every framework trial is a call of it

PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")
SECTIONS = ("compare", "data", "telemetry", "scaling")
WORKERS = ("compare", "telemetry")
# rank 0's figures in a step line (`rank/0/<name>`) that a trial reports (medians over its lines)
TELEMETRY = ("data_wait_frac", "idle_frac", "sync_wait_frac", "mfu", "step_time_s", "fwd_bwd_s", "optimizer_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="YAML recipe (default: the built-in defaults: the Lux.jl / MLX recipe)")
    p.add_argument("--trials", type=int, default=5, help="measured trials per configuration (default 5)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per trial and side (default 3)")
    p.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds of a hand loop, a data stream (default 1)"
    )
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32|bf16 (default both)")
    p.add_argument("--layouts", default="nchw,channels_last", help="comma list of nchw|channels_last (default both)")
    p.add_argument("--batch", type=int, help="batch size of both loops (the framework's global data.batch_size)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile both loops' models with this dynamo backend (default inductor)",
    )
    p.add_argument("--sections", default="compare,data,telemetry", help="comma list of compare|data|telemetry|scaling")
    p.add_argument("--scaling", action="store_true", help="add the scaling section (real accelerate launches)")
    p.add_argument("--data-seconds", type=float, help="seconds per data-stream trial (default: --seconds)")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)  # one measuring process of a section
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # the worker's result file
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_workers=1")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:  # a mistake in what the user gave: one line, exit 2
        p.exit(2, f"{p.prog}: error: {e}\n")


def run(args: argparse.Namespace) -> int:
    if args.trials < 1 or args.seconds <= 0 or args.warmup < 0:
        raise ConfigError("--trials must be >= 1, --seconds > 0 and --warmup >= 0")
    if args.worker:
        return worker(args)
    sections = _choices(args.sections + (",scaling" if args.scaling else ""), SECTIONS, "--sections")
    precisions = _choices(args.precisions, PRECISIONS, "--precisions")
    layouts = _choices(args.layouts, LAYOUTS, "--layouts")

    from cvae_dist import distributed

    cfg = load_config(args.config, _overrides(args))
    threads = distributed.set_threads()
    device = _device()
    settings = {
        "trials": args.trials,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "batch": cfg.data.batch_size,
        "compile": args.compile,
        "device": str(device),
        "overrides": _overrides(args),
        "config": str(args.config) if args.config else None,
        "log_every_steps": cfg.log.every_steps,
        "num_workers": distributed.data_workers(cfg.data.num_workers, device),
        "sections": sections,
    }
    result: dict = {"command": list(sys.argv), "environment": environment(device, threads), "settings": settings}
    print(f"bench: {_env_line(result['environment'])}")
    if "compare" in sections:
        result["configs"] = configs = [
            row
            for precision, layout in itertools.product(precisions, layouts)
            for row in _run_worker(args, "compare", [f"train.precision={precision}", _layout(layout)])["rows"]
        ]
        # MFU's terms as the runs measured them (their facts): FLOPs per image and each precision's peak
        result["flops_per_image"] = flops = configs[0]["flops_per_image"]
        result["peak_flops"] = {c["precision"]: c["peak_flops"] for c in configs}
        result["peak_flops_source"] = {c["precision"]: c["peak_flops_source"] for c in configs}
        for row in configs:
            for side in ("hand", "hand_graph", "framework"):
                if row.get(side):
                    row[side]["mfu"] = _ratio(row[side]["median_img_per_s"] * flops, row["peak_flops"])
        print(
            f"FLOPs per image (fwd+bwd) {flops:,.0f}; peak "
            + ", ".join(
                f"{p} {shown(peak, '.3f', 1e-12)} TFLOP/s ({result['peak_flops_source'][p]})"
                for p, peak in result["peak_flops"].items()
            )
        )
        print(compare_table(configs))
    if "data" in sections:
        result["data"] = data_section(args, cfg, device, result.get("configs"))
        print(data_table(result["data"]))
    if "telemetry" in sections:
        t = _run_worker(args, "telemetry", [f"train.precision={precisions[-1]}", _layout(layouts[-1])])
        result["telemetry_overhead"] = t
        print(telemetry_line(t))
    if "scaling" in sections:
        result["scaling"] = scaling_section(args)
        print(scaling_table(result["scaling"]))
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(strict_json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def _choices(text: str, accepted: tuple[str, ...], flag: str) -> list[str]:
    out = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for item in out:
        if item not in accepted:
            raise ConfigError(f"{flag}: unknown {item!r}; accepted: {', '.join(accepted)}")
    if not out:
        raise ConfigError(f"{flag}: nothing selected")
    return out


def _layout(layout: str) -> str:
    return f"train.channels_last={layout == 'channels_last'}"


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = ["log.wandb=disabled", "checkpoint.every_epoch=false", "checkpoint.every_steps=0"]
    if args.batch is not None:
        extra.append(f"data.batch_size={args.batch}")
    return [*args.overrides, *extra]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _over(reduce: Callable[[list], float], values) -> float:
    """`reduce(values)` (a median, max, min), or NaN where a value is unknown or there are none: never a crash."""
    values = list(values)
    return reduce(values) if values and all(map(known, values)) else float("nan")


def _median(values) -> float:
    return _over(statistics.median, values)


def _ratio(a, b) -> float:
    return a / b if known(a) and known(b) and b else float("nan")


def environment(device: torch.device, threads: int) -> dict:
    import accelerate

    from cvae_dist.distributed import hardware_bf16

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_model": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "threads_set": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "fast_bf16": hardware_bf16(device.type),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "loadavg_start": list(os.getloadavg()),
    }


def _env_line(env: dict) -> str:
    where = env["gpu"] or f"{env['cpu_model']}, {env['cores']} cores"
    return f"torch {env['torch']}, {where}, {env['torch_threads']} threads, load {env['loadavg_start'][0]:.2f}"


def _timed_run(step: Callable[[], None], seconds: float, device: torch.device, min_steps: int = 1) -> tuple[int, float]:
    """Run `step` for about `seconds` (at least `min_steps`); (steps, seconds). Synchronizes at both ends only."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start, steps = time.perf_counter(), 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
    sync()
    return steps, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the two sides


class HandLoop:
    """The plain PyTorch loop: the same model and recipe, batches from memory, nothing else. With `graph` (CUDA), the
    step is captured once as a CUDA graph and replayed, each batch copied into its static input."""

    def __init__(self, cfg, images: torch.Tensor, batch: int, precision: str, compile_, graph: bool = False):
        from cvae_dist.model import CVAE, vae_loss

        self.device = images.device
        torch.manual_seed(0)
        model = CVAE(cfg.model).to(self.device)
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True, capturable=graph
        )
        reps = -(-2 * batch // len(images))  # at least two distinct batches
        images = images.repeat(reps, 1, 1, 1) if reps > 1 else images
        self.batches = [
            images[i : i + batch].contiguous(memory_format=fmt) for i in range(0, len(images) - batch + 1, batch)
        ]
        self.batch = batch
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.vae_loss = vae_loss
        self.forward = torch.compile(model, backend=compile_) if compile_ else model
        self.i = 0
        self.step = self._eager_step
        if graph:
            self.static_x = self.batches[0].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._train(self.static_x)
            torch.cuda.current_stream().wait_stream(side)
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._train(self.static_x, zero_grad=False)
            self.step = self._graph_step

    def _next(self) -> torch.Tensor:
        x = self.batches[self.i]
        self.i = (self.i + 1) % len(self.batches)
        return x

    def _train(self, x: torch.Tensor, zero_grad: bool = True) -> None:
        with self._autocast():
            out = self.forward(x)
        loss = self.vae_loss(out, x).total
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _eager_step(self) -> None:
        self._train(self._next())

    def _graph_step(self) -> None:
        self.static_x.copy_(self._next(), non_blocking=True)
        self.graph.replay()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def autocast_dtype(self) -> str:
        """The dtype the encoder's mu head produces in one forward (eval mode: BatchNorm's statistics stay)."""
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return str(self.model(self.batches[0][:2]).mu.dtype).removeprefix("torch.")
        finally:
            self.model.train()

    def trial(self, seconds: float) -> dict:
        steps, elapsed = _timed_run(self.step, seconds, self.device)
        return {"img_per_s": steps * self.batch / elapsed, "steps": steps, "seconds": elapsed}


def _skipped_lines(device: str) -> int:
    """Step lines left out at a run's start and at each later epoch's (on CUDA a line's timings are the interval
    before it: two)."""
    return 2 if device.startswith("cuda") else 1


def run_figures(run_dir: Path) -> tuple[dict, list[dict]]:
    """A finished run's facts (`ranks/rank0.json`) and its measured step lines, each as the steps of its interval,
    the global img/s and rank 0's TELEMETRY figures (None where unknown: e.g. `log.telemetry=false`)."""
    facts = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    skipped, lines, epoch, seen, last = _skipped_lines(facts["device"]), [], None, 0, 0
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "train/step_loss" not in record:  # not a step line (started, epoch line, checkpoint ...)
            continue
        seen = 1 if record["epoch"] != epoch else seen + 1
        epoch, steps, last = record["epoch"], record["step"] - last, record["step"]
        if seen > skipped:
            figures = {name: record.get(f"rank/0/{name}") for name in TELEMETRY}
            lines.append({"steps": steps, "img_per_s": record["throughput/global_img_per_s"], **figures})
    return facts, lines


def trial_figures(lines: list[dict], batch: int) -> dict:
    """A trial of step lines: img/s = their images / their time (each line's images at its rate); its telemetry
    figures are medians over the lines' known ones (NaN where there are none: JSON null, tables n/a)."""
    timed = [line for line in lines if known(line["img_per_s"]) and line["img_per_s"] > 0]
    steps = sum(line["steps"] for line in timed)
    seconds = sum(line["steps"] * batch / line["img_per_s"] for line in timed)
    return {
        "img_per_s": _ratio(steps * batch, seconds),
        "steps": steps,
        "seconds": seconds if timed else math.nan,
        "telemetry": {name: _median([v for line in lines if known(v := line[name])]) for name in TELEMETRY},
    }


class FrameworkRuns:
    """The framework's trials in this process: each one `train(cfg)` run of `steps` steps, the worker's overrides
    plus a trial's own; `facts`: the last run's. `steps`: the skipped lines, then about `--seconds` of lines at the
    rate of a first short run (the warm-up)."""

    def __init__(self, args: argparse.Namespace, name: str, overrides: list[str]):
        self.args, self.name, self.runs = args, name, 0
        every = load_config(args.config, _overrides(args)).log.every_steps
        skipped = _skipped_lines(_device().type)
        self.steps = every * (skipped + 1)
        rate = self.trial(overrides)["img_per_s"]
        lines = math.ceil(args.seconds * rate / (every * self.facts["global_batch_size"])) if known(rate) else 1
        self.steps = every * (skipped + max(1, lines))

    def trial(self, overrides: list[str]) -> dict:
        self.runs += 1
        name = f"{self.name}-{self.runs}"
        cfg = load_config(
            self.args.config, [*_overrides(self.args), *overrides, f"run_name={name}", f"train.max_steps={self.steps}"]
        )
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.output_dir) / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
            result = train(cfg)  # (its console lines go to the log: the worker prints its trials' lines only)
        self.facts, lines = run_figures(result.run_dir)
        return trial_figures(lines, self.facts["global_batch_size"])


# ---------------------------------------------------------------------------------------------- workers


def worker(args: argparse.Namespace) -> int:
    """One measuring process (see WORKERS): writes its figures to --out."""
    from cvae_dist import distributed

    cfg = load_config(args.config, _overrides(args))
    distributed.set_threads()  # before the hand loop's first step, as `train` does for its own
    figures = {"compare": compare_worker, "telemetry": telemetry_worker}[args.worker](args, cfg)
    if args.out:
        args.out.write_text(strict_json.dumps(figures, indent=2) + "\n")
    return 0


def _run_worker(args, kind: str, extra: list[str]) -> dict:
    """Run one worker process and read its figures."""
    with tempfile.TemporaryDirectory(prefix="cvae-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            kind,
            "--out",
            str(out),
            "--trials",
            str(args.trials),
            "--seconds",
            str(args.seconds),
            "--warmup",
            str(args.warmup),
            *(["--config", str(args.config)] if args.config else []),
            *(["--compile", args.compile] if args.compile else []),
            *(["--batch", str(args.batch)] if args.batch is not None else []),
            *args.overrides,
            *extra,
            f"output_dir={tmp}",
        ]
        proc = subprocess.run(cmd, env=_worker_env(args), capture_output=True, text=True, timeout=_timeout(args))
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"bench worker {kind} {extra} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        print(proc.stdout, end="", flush=True)
        return {"command": cmd, **json.loads(out.read_text())}


def _worker_env(args) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if args.compile:  # the framework's model compiled as under `accelerate launch --dynamo_backend`
        env["ACCELERATE_DYNAMO_BACKEND"] = args.compile.upper()
    return env


def _timeout(args) -> float:  # a hang's bound, not a speed bar (a run in emulated bf16: 15 s and more)
    return 300 + (args.trials + 1) * (args.seconds + args.warmup + 60) * 6


def compare_worker(args, cfg) -> dict:
    """One precision and layout: the hand loop against the framework, eager, and on CUDA both as CUDA graphs."""
    from cvae_dist.data import load_split, to_model_input

    device, precision = _device(), cfg.train.precision.value
    modes = ("eager", "graph") if device.type == "cuda" else ("eager",)
    label = f"{precision}/{'channels_last' if cfg.train.channels_last else 'nchw'}"
    pixels, _ = load_split(cfg.data.source, cfg.data.train_split)  # the hand loop's data, resized once, in memory
    images = to_model_input(pixels.to(device), cfg.model.image_size, channels_last=False)
    graph = {mode: [f"train.cuda_graph={mode == 'graph'}"] for mode in modes}
    framework = FrameworkRuns(args, "compare", graph["eager"])
    batch = framework.facts["global_batch_size"]
    hands = {mode: HandLoop(cfg, images, batch, precision, args.compile, graph=mode == "graph") for mode in modes}
    want = "bfloat16" if precision == "bf16" else "float32"
    dtypes = {"hand": hands["eager"].autocast_dtype(), "framework": framework.facts["compute_dtype"]}
    if set(dtypes.values()) != {want}:
        raise RuntimeError(f"{label}: autocast check failed, the mu head produced {dtypes} (expected {want})")
    sides: dict[str, Callable[[], dict]] = {}
    for mode in modes:
        hands[mode].trial(args.warmup)  # warm-up (allocator, caches, graph capture)
        sides[f"hand/{mode}"] = lambda h=hands[mode]: h.trial(args.seconds)
        sides[f"framework/{mode}"] = lambda o=graph[mode]: framework.trial(o)
    trials: dict[str, list[dict]] = {side: [] for side in sides}
    names = list(sides)
    for t in range(args.trials):
        for side in names[t % len(names) :] + names[: t % len(names)]:  # rotate the order every trial
            trials[side].append(sides[side]())
        rates = ", ".join(f"{side} {shown(trials[side][-1]['img_per_s'], ',.0f')}" for side in names)
        print(f"  {label:<20} trial {t + 1}/{args.trials}: {rates} img/s", flush=True)
    ceiling = trials.get("hand/graph")  # the eager row shows it too, in its own column
    mfu_terms = {k: framework.facts[k] for k in ("flops_per_image", "peak_flops", "peak_flops_source")}
    rows = [
        _summarise(label, mode, trials[f"hand/{mode}"], trials[f"framework/{mode}"], dtypes, batch, ceiling) | mfu_terms
        for mode in modes
    ]
    return {"rows": rows}


def _summarise(
    label: str,
    mode: str,
    hand: list[dict],
    framework: list[dict],
    dtypes: dict,
    batch: int,
    hand_graph: list[dict] | None,
) -> dict:
    """One row: the framework in `mode` against the hand loop in the same mode (a graph row: the graph ceiling)."""
    precision, layout = label.split("/")
    h, f = [r["img_per_s"] for r in hand], [r["img_per_s"] for r in framework]
    ratios = [_ratio(b, a) for a, b in zip(h, f, strict=True)]
    waits = [r["telemetry"]["data_wait_frac"] for r in framework]
    side = lambda trials, rates: {"trials": trials, "img_per_s": rates, "median_img_per_s": _median(rates)}  # noqa: E731
    row = {
        "precision": precision,
        "layout": layout,
        "mode": mode,
        "batch": batch,
        "autocast_dtype": dtypes,
        "hand": side(hand, h),
        "framework": side(framework, f)
        | {
            "data_wait_frac": waits,
            "median_data_wait_frac": _median(waits),
            "telemetry": {k: _median([r["telemetry"][k] for r in framework]) for k in framework[0]["telemetry"]},
        },
        "ratio": ratios,  # per trial: framework / hand (a graph row: / the hand loop's graph)
        "median_ratio": _median(ratios),
        "ratio_of_medians": _ratio(_median(f), _median(h)),
    }
    if mode == "graph":
        row["hand_graph"], row["hand"] = row["hand"], None
    elif hand_graph:
        row["hand_graph"] = side(hand_graph, [r["img_per_s"] for r in hand_graph])
    return row


def compare_table(configs: list[dict]) -> str:
    lines = [
        "",
        f"{'config':<26} {'hand img/s':>11} {'hand graph':>11} {'framework img/s':>16} {'ratio':>6} {'fw MFU':>7} "
        f"{'data wait':>9}  {'autocast':>8}",
    ]
    for c in configs:
        hand, graph = (shown(c[s]["median_img_per_s"], ",.0f") if c.get(s) else "-" for s in ("hand", "hand_graph"))
        fw = c["framework"]
        lines.append(
            f"{_row_label(c):<26} {hand:>11} {graph:>11} {shown(fw['median_img_per_s'], ',.0f'):>16} "
            f"{shown(c['median_ratio'], '.3f'):>6} {shown(fw['mfu'], '.2f', 100, '%'):>7} "
            f"{shown(fw['median_data_wait_frac'], '.1f', 100, '%'):>9}  {c['autocast_dtype']['framework']:>8}"
        )
    lines.append(
        "(medians over trials; ratio = the median of per-trial framework / hand ratios, against the hand "
        "loop in the same mode: a graph row against the hand graph; MFU against the peak above)"
    )
    return "\n".join(lines)


def telemetry_worker(args, cfg) -> dict:
    """Runs with telemetry on and off, trials interleaved in this one process."""
    flags = {"on": ["log.telemetry=true"], "off": ["log.telemetry=false"]}
    framework = FrameworkRuns(args, "telemetry", flags["on"])
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for t in range(args.trials):
        for side in ("on", "off") if t % 2 == 0 else ("off", "on"):
            rates[side].append(framework.trial(flags[side])["img_per_s"])
    on, off = _median(rates["on"]), _median(rates["off"])
    layout = "channels_last" if cfg.train.channels_last else "nchw"
    return {
        "config": f"{framework.facts['precision']}/{layout}",
        "on_img_per_s": on,
        "off_img_per_s": off,
        "ratio": _ratio(on, off),
        "trials": rates,
    }


def telemetry_line(t: dict) -> str:
    return (
        f"telemetry ({t['config']}): on {shown(t['on_img_per_s'], ',.0f')} img/s, off "
        f"{shown(t['off_img_per_s'], ',.0f')} img/s, on/off {shown(t['ratio'], '.3f')} "
        f"(medians of {len(t['trials']['on'])} interleaved trials)"
    )


# ---------------------------------------------------------------------------------------------- data


def _stream_rates(cfg, rank, world, batch, seconds, warmup, trials, resident, device) -> dict[str, list[float]]:
    """img/s of this rank's `RankStream` alone. Streamed (`resident` False): batches with every digit decoded, as
    every epoch of a split too large to keep. Resident: the table's build (the machine's one decode, into an empty
    cache), batches from the table with the epoch's order at hand, with and without the on-device resize, and the
    rate at which epoch orders are drawn (rows/s)."""
    import copy
    from unittest import mock

    from cvae_dist.data import RankStream, to_model_input
    from cvae_dist.distributed import data_workers

    data = copy.deepcopy(cfg.data)
    data.resident_mb = data.resident_mb if resident else 0
    with (
        tempfile.TemporaryDirectory(prefix="cvae-bench-cache-") as cache,
        mock.patch.dict(os.environ, CVAE_DIST_CACHE=cache),
    ):
        start = time.perf_counter()
        stream = RankStream(data, rank, world, cfg.train.seed, data_workers(data.num_workers, device), device)
        built = time.perf_counter() - start
    assert stream.batch_size == batch
    steps = stream.local_steps

    def rates(step: Callable[[], object], per_step: int) -> list[float]:
        _timed_run(step, warmup, device, min_steps=2)
        return [n * per_step / s for n, s in (_timed_run(step, seconds, device) for _ in range(trials))]

    if not resident:
        batches = (b for epoch in itertools.count(1) for b in stream.epoch(epoch, steps))
        return {"stream": rates(lambda: next(batches), batch)}
    rows = len(stream.table.labels)
    batches = (b for _ in itertools.count() for b in stream.epoch(1, steps))  # epoch 1's order, drawn once
    resize = cfg.model.image_size, cfg.train.channels_last
    epochs = itertools.count(2)
    return {
        "resident-build": [rows / built],  # the whole split is decoded into the table
        "resident": rates(lambda: next(batches), batch),
        "resident+resize": rates(lambda: to_model_input(next(batches).pixels, *resize), batch),
        "resident-order": rates(lambda: stream.order(next(epochs)), rows),
    }


def data_section(args, cfg, device, configs: list[dict] | None) -> dict:
    from cvae_dist.distributed import data_workers

    seconds = args.data_seconds or args.seconds
    streams = []
    for world, ranks in ((1, [0]), (2, [0, 1])):
        batch = cfg.data.batch_size // world  # (an even world here: every rank's share)
        for rank, resident in itertools.product(ranks, (False, True)):
            measured = _stream_rates(cfg, rank, world, batch, seconds, args.warmup, args.trials, resident, device)
            for path, rates in measured.items():
                streams.append(
                    {
                        "world": world,
                        "rank": rank,
                        "batch": batch,
                        "path": path,
                        "img_per_s": rates,
                        "median_img_per_s": _median(rates),
                    }
                )
    out: dict = {"num_workers": data_workers(cfg.data.num_workers, device), "streams": streams}
    single = {s["path"]: s["median_img_per_s"] for s in streams if s["world"] == 1}
    # after the first epoch a batch needs its epoch's order and a lookup in the table: the slower of the two
    single["after"] = _over(min, [single["resident"], single["resident-order"]])
    out["rank_img_per_s"] = single
    if configs:
        train = {_row_label(c): c["framework"]["median_img_per_s"] for c in configs}
        out["train_img_per_s"] = train
        for when, path in (("first_epoch", "resident-build"), ("streamed", "stream"), ("after", "after")):
            out[f"data_to_train_ratio_{when}"] = {k: _ratio(single[path], v) for k, v in train.items()}
            out[f"min_data_to_train_ratio_{when}"] = _over(min, out[f"data_to_train_ratio_{when}"].values())
        waits = {_row_label(c): c["framework"]["median_data_wait_frac"] for c in configs}
        out["data_wait_frac"] = waits
        out["max_data_wait_frac"] = _over(max, waits.values())
    return out


def _row_label(c: dict) -> str:
    return f"{c['precision']}/{c['layout']}" + (" graph" if c["mode"] == "graph" else "")


DATA_PATHS = {
    "stream": "stream: decode + batch",
    "resident-build": "resident: decode into the table",
    "resident": "resident: batch from the table",
    "resident+resize": "resident: batch + resize",
    "resident-order": "resident: the epoch's permutation",
}


def data_table(data: dict) -> str:
    lines = ["", f"data pipeline (RankStream, data.num_workers={data['num_workers']}):"]
    for s in data["streams"]:
        lines.append(
            f"  rank {s['rank']} of {s['world']} (batch {s['batch']:>4}) {DATA_PATHS[s['path']]:<38} "
            f"{shown(s['median_img_per_s'], ',.0f'):>12} img/s"
        )
    for k, wait in data.get("data_wait_frac", {}).items():
        first, after = data["data_to_train_ratio_first_epoch"][k], data["data_to_train_ratio_after"][k]
        lines.append(
            f"  {k:<26} data/train {shown(first, '.1f', unit='x'):>7} first epoch, "
            f"{shown(after, '.1f', unit='x'):>9} after   "
            f"data wait {shown(wait, '.1f', 100, '%'):>5} of step time"
        )
    lines.append(
        "  (resident: the split decoded once into a table on the rank's device; after the first epoch a "
        "batch needs the epoch's order and a table lookup, so its rate is the slower of the two)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scaling


# (processes, threads per process, model.batchnorm); 2 x 1 twice: what BatchNorm over the global batch costs
SCALING_RUNS = ((1, 2, "global"), (2, 1, "global"), (2, 1, "local"), (1, 1, "global"))
# launch/cpu_debug.yaml and launch/ddp_cpu.yaml, written out where the bench runs (it needs no source checkout)
CPU_LAUNCH = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0}
LAUNCH_CONFIGS = {
    "one_cpu": CPU_LAUNCH | {"distributed_type": "NO", "num_processes": 1, "use_cpu": True},
    "ddp_cpu": CPU_LAUNCH | {"distributed_type": "MULTI_GPU", "num_processes": 2, "gpu_ids": "-1,-1"},
}


def scaling_section(args) -> dict:
    import yaml

    runs = []
    with tempfile.TemporaryDirectory(prefix="cvae-bench-launch-") as tmp:
        for name, config in LAUNCH_CONFIGS.items():
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(config))
        for processes, threads, batchnorm in SCALING_RUNS:
            launcher = [_accelerate(), "launch", "--config_file", str(Path(tmp) / "one_cpu.yaml")]
            if processes > 1:
                launcher = [
                    _accelerate(),
                    "launch",
                    "--config_file",
                    str(Path(tmp) / "ddp_cpu.yaml"),
                    "--num_processes",
                    str(processes),
                    "--main_process_port",
                    str(_free_port()),
                ]
            extra, env = [f"model.batchnorm={batchnorm}"], {"OMP_NUM_THREADS": str(threads)}
            runs.append({"batchnorm": batchnorm, **scaling_run(args, launcher, extra, env)})
            norm = f", {batchnorm} BatchNorm" if processes > 1 else ""
            rate = shown(runs[-1]["median_img_per_s"], ",.0f")
            print(f"  scaling {processes} process(es) x {threads} thread(s){norm}: {rate} img/s", flush=True)
    rate = {(r["processes"], r["threads"], r["batchnorm"]): r["median_img_per_s"] for r in runs}
    return {
        "runs": runs,
        "efficiency": _ratio(rate[(2, 1, "global")], rate[(1, 2, "global")]),
        "per_core_efficiency": _ratio(rate[(2, 1, "global")], rate[(1, 1, "global")]) / 2,
        "global_to_local_batchnorm": _ratio(rate[(2, 1, "global")], rate[(2, 1, "local")]),
    }


def scaling_run(args, launcher: list[str], extra: list[str], env: dict) -> dict:
    """One launched `cvae-dist train` of `--trials` step lines after the skipped ones; a trial: one line."""
    every = load_config(args.config, _overrides(args)).log.every_steps
    steps = every * (_skipped_lines(_device().type) + args.trials)
    with tempfile.TemporaryDirectory(prefix="cvae-bench-") as tmp:
        cmd = [
            *launcher,
            *(["--dynamo_backend", args.compile] if args.compile else []),
            "-m",
            "cvae_dist.cli",
            "train",
            *(["--config", str(args.config)] if args.config else []),
            *_overrides(args),
            *extra,
            f"output_dir={tmp}",
            "run_name=scaling",
            f"train.max_steps={steps}",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **env}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_timeout(args))
        if proc.returncode != 0:
            raise RuntimeError(
                f"bench: {' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        facts, lines = run_figures(Path(tmp) / "scaling")
    trials = [trial_figures([line], facts["global_batch_size"]) for line in lines]
    rates = [t["img_per_s"] for t in trials]
    waits = {f"median_{k}": _median([t["telemetry"][k] for t in trials]) for k in ("sync_wait_frac", "data_wait_frac")}
    return {
        "command": cmd,
        "processes": facts["world_size"],
        "threads": facts["threads_per_rank"],
        "per_rank_batch": facts["per_rank_batch_size"],
        "precision": facts["precision"],
        "backend": facts["backend"],
        "global_batchnorm": facts["global_batchnorm"],
        "trials": trials,
        "img_per_s": rates,
        "median_img_per_s": _median(rates),
        **waits,
    }


def _accelerate() -> str:
    local = Path(sys.executable).parent / "accelerate"
    return str(local) if local.exists() else (shutil.which("accelerate") or "accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling_table(s: dict) -> str:
    lines = ["", "scaling (framework path, real accelerate launches; global img/s):"]
    for r in s["runs"]:
        norm = f", {r['batchnorm']} BatchNorm" if r["processes"] > 1 else ""
        lines.append(
            f"  {r['processes']} process(es) x {r['threads']} thread(s) ({r['backend']}, batch {r['per_rank_batch']}"
            f"/rank{norm}): {shown(r['median_img_per_s'], ',.0f'):>8} img/s, "
            f"sync wait {shown(r['median_sync_wait_frac'], '.1f', 100, '%')}"
        )
    lines.append(
        f"  efficiency 2x1 / 1x2 = {shown(s['efficiency'], '.3f')}; per-core 2x1 / (2 x 1x1) = "
        f"{shown(s['per_core_efficiency'], '.3f')}; 2x1 global / local BatchNorm = "
        f"{shown(s['global_to_local_batchnorm'], '.3f')}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
