"""`cvae-dist bench`: how fast the framework trains, against a plain hand-written PyTorch loop of the same model.

Sections (`--sections`, default `compare,data,telemetry`; `--scaling` adds `scaling`):

- `compare`: for each precision (fp32, bf16) x layout (NCHW, channels_last), one process that alternates trials of
  (a) a minimal hand-written loop (CVAE, the recipe's AdamW, fused like the trainer's, batches from in-memory,
  already resized 64x64 images, `vae_loss(...).total`, zero_grad / backward / step) and (b) the trainer itself: a
  real run (`trainer.prepare` + `Trainer`, in a temporary directory, W&B off) driven by `Trainer.steps`,
  the loop `train` uses, with its data stream, resize, telemetry and step lines. On CUDA each config also gets a
  `graph` row: (a) captured as one CUDA graph (the ceiling of the step itself, its own column) against the trainer
  with `train.cuda_graph=true`. The order of the sides rotates per trial, so drifting machine load hits all alike;
  img/s, ratios, MFU and data wait per trial, medians over trials (the ratio column: the median of per-trial
  ratios); warm-up excluded.
- `data`: the batching rate of `RankStream` alone (1 rank of 1, and each rank of 2): decoding every digit (a
  streamed shard, or a first epoch), building the resident table, and batches from it (later epochs, their
  orders included), with and without the on-device resize, against the training rate; and the data-wait share of
  the trainer's steps.
- `telemetry`: the trainer with `log.telemetry` on and off, trials interleaved in one process.
- `scaling`: 1 process x 2 threads, 2 processes x 1 thread (DDP over gloo on CPU) with BatchNorm over the global
  batch and again with `model.batchnorm=local`, and 1 process x 1 thread, each a real `accelerate launch` of this
  module's worker; efficiency = 2x1 / 1x2, per-core efficiency = 2x1 / (2 x 1x1), and what global BatchNorm costs:
  2x1 global / 2x1 local.

Each section that trains runs in processes of its own (one precision per process: accelerate keeps one state per
process). On CUDA the trials are timed with a synchronize at their start and end only (the trainer's telemetry adds
its own one per log interval). `--compile [BACKEND]` (default inductor) compiles the hand model with `torch.compile`
and the trainer's as `accelerate launch --dynamo_backend` would (accelerate compiles the model the step calls);
`--batch N` sets the batch of both (the trainer's global `data.batch_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cvae_dist import strict_json
from cvae_dist.strict_json import known, shown
from cvae_dist.telemetry import compute_dtype

PRECISIONS = {"fp32": "fp32", "bf16": "bf16"}
LAYOUTS = ("nchw", "channels_last")
SECTIONS = ("compare", "data", "telemetry", "scaling")
WORKERS = ("compare", "telemetry", "scaling")


def run(args: argparse.Namespace) -> int:
    from cvae_dist.config import ConfigError, load_config

    if args.trials < 1 or args.seconds <= 0 or args.warmup < 0:
        raise ConfigError("--trials must be >= 1, --seconds > 0 and --warmup >= 0")
    if args.worker:
        return _worker(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()] + (["scaling"] if args.scaling else [])
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--sections: unknown {unknown}; accepted: {', '.join(SECTIONS)}")
    precisions = _choices(args.precisions, PRECISIONS, "--precisions")
    layouts = _choices(args.layouts, {k: k for k in LAYOUTS}, "--layouts")

    from cvae_dist import distributed
    from cvae_dist.telemetry import count_flops_per_image, peak_flops

    cfg = load_config(args.config, _overrides(args))
    threads = distributed.set_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flops = count_flops_per_image(cfg.model)
    peaks = {p: peak_flops(device, p, cfg.log.peak_tflops) for p in precisions}
    result: dict = {
        "command": list(sys.argv),
        "environment": environment(device, threads),
        "settings": {
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
        },
        "flops_per_image": flops,
        "peak_flops": {p: peak for p, (peak, _) in peaks.items()},
        "peak_flops_source": {p: source for p, (_, source) in peaks.items()},
    }
    print(f"cvae-dist bench: {_env_line(result['environment'])}")
    print(f"FLOPs per image (fwd+bwd) {flops:,.0f}; peak " + ", ".join(
        f"{p} {shown(peak, '.3f', 1e-12)} TFLOP/s ({source})" for p, (peak, source) in peaks.items()))  # fmt: skip
    if "compare" in sections:
        result["configs"] = [
            row
            for precision, layout in itertools.product(precisions, layouts)
            for row in _run_worker(args, "compare", [f"train.precision={precision}", _layout(layout)])["rows"]
        ]
        for row in result["configs"]:
            peak = result["peak_flops"][row["precision"]]
            for side in ("hand", "hand_graph", "framework"):
                if row.get(side):
                    row[side]["mfu"] = _ratio(row[side]["median_img_per_s"], peak / flops)
        print(compare_table(result["configs"]))
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


def _choices(text: str, accepted: dict[str, str], flag: str) -> list[str]:
    from cvae_dist.config import ConfigError

    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item not in accepted:
            raise ConfigError(f"{flag}: unknown {item!r}; accepted: {', '.join(accepted)}")
        if accepted[item] not in out:
            out.append(accepted[item])
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
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
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "fast_bf16": hardware_bf16(device.type),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "loadavg_start": list(os.getloadavg()),
    }


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def _env_line(env: dict) -> str:
    where = env["gpu"] or f"{env['cpu_model']}, {env['cores']} cores"
    return f"torch {env['torch']}, {where}, {env['torch_threads']} threads, load {env['loadavg_start'][0]:.2f}"


def _timed_run(step: Callable[[], None], seconds: float, device: torch.device, min_steps: int = 1) -> tuple[int, float]:
    """Run `step` for about `seconds` (at least `min_steps`); (steps, seconds). Synchronizes at both ends only."""
    _sync(device)
    start = time.perf_counter()
    steps = 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
    _sync(device)
    return steps, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the loops


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
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                           fused=True, capturable=graph)  # fmt: skip
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
        x = self.batches[0][:2]
        with self._autocast():
            return compute_dtype(self.model, lambda: self.model(x))


def _trainer_run(cfg, name: str, compile_backend: str | None):
    """A real training run of `cfg` named `name` in the worker's temporary output_dir, started and ready for
    `Trainer.steps` (its own set-up: the step mode follows the run's config)."""
    from cvae_dist import checkpoint, trainer

    cfg.run_name = name
    parts = trainer.prepare(cfg, worker_accelerator(cfg, compile_backend))
    checkpoint.write_run_dir(parts.dir, cfg, parts.setup.accelerator)
    return trainer.Trainer(parts)


def _endless(trainer) -> Iterator:
    """A run's batches, epoch after epoch, for trials that outlast an epoch."""
    for epoch in itertools.count(1):
        yield from trainer.stream.epoch(epoch, trainer.parts.steps_per_epoch)


class TrainerLoop:
    """The trainer's steps as `train` takes them: `Trainer.steps` on the run's stream, step lines every
    `log.every_steps` (where the ranks also agree that a trial's time is up)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.batches = _endless(trainer)
        self.device = trainer.accelerator.device
        self.batch = trainer.parts.global_batch

    def autocast_dtype(self) -> str:
        return self.trainer.compute_dtype()

    def trial(self, seconds: float) -> dict:
        """Steps until the trial has had a step line of its own with telemetry (on a GPU a line's timings are the
        interval before it: two lines), then until `seconds` are up. Its telemetry figures are medians over its
        lines' known figures, NaN (JSON: null, tables: n/a) where it has none, as with `log.telemetry=false`."""
        trainer, first, every = self.trainer, self.trainer.state.step, self.trainer.cfg.log.every_steps
        lines_needed = 2 if self.device.type == "cuda" else 1
        trainer.timer.restart()
        _sync(self.device)
        start = time.perf_counter()

        def done() -> bool:  # asked at step lines and stop polls: the step lines, and the time is up
            enough = trainer.state.step // every >= first // every + lines_needed
            return enough and time.perf_counter() - start >= seconds

        lines = trainer.steps(self.batches, done).lines
        _sync(self.device)
        elapsed = time.perf_counter() - start
        steps, rank = trainer.state.step - first, trainer.accelerator.process_index
        names = ("data_wait_frac", "idle_frac", "sync_wait_frac", "mfu", "step_time_s", "fwd_bwd_s", "optimizer_s")
        lines = lines if trainer.cfg.log.telemetry else []
        figures = {name: [v for r in lines if known(v := r[f"rank/{rank}/{name}"])] for name in names}
        return {
            "img_per_s": steps * self.batch / elapsed,
            "steps": steps,
            "seconds": elapsed,
            "telemetry": {name: _median(values) for name, values in figures.items()},
        }


# ---------------------------------------------------------------------------------------------- workers


def _worker(args: argparse.Namespace) -> int:
    """One measuring process (see SECTIONS); the main rank writes its figures to --out."""
    from cvae_dist import distributed
    from cvae_dist.config import load_config

    cfg = load_config(args.config, _overrides(args))
    setup = worker_accelerator(cfg, args.compile)
    accelerator = setup.accelerator
    distributed.set_threads()
    figures = {"compare": compare_worker, "telemetry": telemetry_worker, "scaling": scaling_worker}[args.worker](
        args, cfg, setup
    )
    if accelerator.is_main_process and args.out:
        args.out.write_text(strict_json.dumps(figures, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def worker_accelerator(cfg, compile_backend: str | None):
    """The worker's set-up (`distributed.Setup`); with a backend, accelerate compiles the model at `prepare` as under
    `accelerate launch --dynamo_backend <backend>`, so the trainer's step calls (and the bench times) the compiled
    model."""
    from cvae_dist import distributed

    if compile_backend:
        os.environ["ACCELERATE_DYNAMO_BACKEND"] = compile_backend.upper()
    return distributed.make_accelerator(cfg)


def _run_worker(args, kind: str, extra: list[str], launcher: list[str] | None = None, env: dict | None = None) -> dict:
    """Run one worker process (or an `accelerate launch` of several) and read its figures."""
    with tempfile.TemporaryDirectory(prefix="cvae-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        module = ["-m", "cvae_dist.cli", "bench"]
        cmd = [*(launcher or [sys.executable]), *module, "--worker", kind, "--out", str(out),
               "--trials", str(args.trials), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
               *(["--config", str(args.config)] if args.config else []),
               *(["--compile", args.compile] if args.compile else []),
               *(["--batch", str(args.batch)] if args.batch is not None else []), *args.overrides, *extra,
               f"output_dir={tmp}"]  # fmt: skip
        # (a hang's bound, not a speed bar: a trial also runs until its step lines, 15 s and more in emulated bf16)
        timeout = 300 + (args.trials + 1) * (args.seconds + args.warmup + 60) * 6
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench worker {kind} {extra} exited {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")  # fmt: skip
        print(proc.stdout, end="", flush=True)
        return {"command": cmd, **json.loads(out.read_text())}


def compare_worker(args, cfg, setup) -> dict:
    """One precision and layout: the hand loop against the trainer, eager, and on CUDA both as CUDA graphs."""
    import copy

    from cvae_dist.data import load_split, to_model_input

    accelerator, precision = setup.accelerator, setup.precision
    device, mode_cfgs = accelerator.device, {"eager": copy.deepcopy(cfg)}
    mode_cfgs["eager"].train.cuda_graph = False
    if device.type == "cuda":
        mode_cfgs["graph"] = copy.deepcopy(cfg)
        mode_cfgs["graph"].train.cuda_graph = True
    label = f"{precision}/{'channels_last' if cfg.train.channels_last else 'nchw'}"
    pixels, _ = load_split(cfg.data.source, cfg.data.train_split)  # the hand loop's data, resized once, in memory
    images = to_model_input(pixels.to(device), cfg.model.image_size, channels_last=False)
    trainers = {mode: TrainerLoop(_trainer_run(c, f"compare-{mode}", args.compile))
                for mode, c in mode_cfgs.items()}  # fmt: skip
    batch = trainers["eager"].batch
    hands = {mode: HandLoop(cfg, images, batch, precision, args.compile, graph=mode == "graph") for mode in mode_cfgs}
    want = "bfloat16" if precision == "bf16" else "float32"
    dtypes = {"hand": hands["eager"].autocast_dtype(), "framework": trainers["eager"].autocast_dtype()}
    if set(dtypes.values()) != {want}:
        raise RuntimeError(f"{label}: autocast check failed, the mu head produced {dtypes} (expected {want})")
    sides: dict[str, Callable[[float], dict]] = {}
    for mode in mode_cfgs:
        sides[f"hand/{mode}"] = lambda s, h=hands[mode]: _hand_trial(h, s, device)
        sides[f"framework/{mode}"] = trainers[mode].trial
    for side in sides.values():  # warm-up (allocator, caches, graph capture)
        side(args.warmup)
    trials: dict[str, list[dict]] = {side: [] for side in sides}
    names = list(sides)
    for t in range(args.trials):
        for side in names[t % len(names) :] + names[: t % len(names)]:  # rotate the order every trial
            trials[side].append(sides[side](args.seconds))
        rates = ", ".join(f"{side} {shown(trials[side][-1]['img_per_s'], ',.0f')}" for side in names)
        accelerator.print(f"  {label:<20} trial {t + 1}/{args.trials}: {rates} img/s", flush=True)
    ceiling = trials.get("hand/graph")  # the eager row shows it too, in its own column
    rows = [
        _summarise(label, mode, trials[f"hand/{mode}"], trials[f"framework/{mode}"], dtypes, batch, ceiling)
        for mode in mode_cfgs
    ]
    for loop in trainers.values():  # as `train` does: no captured graph outlives the process group (GraphStep.close)
        loop.trainer.step.close()
    return {"rows": rows}


def _hand_trial(hand: HandLoop, seconds: float, device: torch.device) -> dict:
    steps, elapsed = _timed_run(hand.step, seconds, device)
    return {"img_per_s": steps * hand.batch / elapsed, "steps": steps, "seconds": elapsed}


def _summarise(label: str, mode: str, hand: list[dict], framework: list[dict], dtypes: dict, batch: int,
               hand_graph: list[dict] | None) -> dict:  # fmt: skip
    """One row: the trainer in `mode` against the hand loop in the same mode (a graph row: the graph ceiling)."""
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
        "framework": side(framework, f) | {
            "data_wait_frac": waits,
            "median_data_wait_frac": _median(waits),
            "telemetry": {k: _median([r["telemetry"][k] for r in framework]) for k in framework[0]["telemetry"]},
        },
        "ratio": ratios,  # per trial: framework / hand (a graph row: / the hand loop's graph)
        "median_ratio": _median(ratios),
        "ratio_of_medians": _ratio(_median(f), _median(h)),
    }  # fmt: skip
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
    lines.append("(medians over trials; ratio = the median of per-trial framework / hand ratios, against the hand "
                 "loop in the same mode: a graph row against the hand graph; MFU against the peak above)")  # fmt: skip
    return "\n".join(lines)


def telemetry_worker(args, cfg, setup) -> dict:
    """The trainer with telemetry on and off, trials interleaved in this one process."""
    import copy

    loops = {}
    for side, on in (("on", True), ("off", False)):
        c = copy.deepcopy(cfg)
        c.log.telemetry = on
        loops[side] = TrainerLoop(_trainer_run(c, f"telemetry-{side}", args.compile))
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for loop in loops.values():
        loop.trial(args.warmup)
    for t in range(args.trials):
        for side in ("on", "off") if t % 2 == 0 else ("off", "on"):
            rates[side].append(loops[side].trial(args.seconds)["img_per_s"])
    on, off = _median(rates["on"]), _median(rates["off"])
    layout = "channels_last" if cfg.train.channels_last else "nchw"
    return {"config": f"{setup.precision}/{layout}", "on_img_per_s": on, "off_img_per_s": off,
            "ratio": _ratio(on, off), "trials": rates}  # fmt: skip


def telemetry_line(t: dict) -> str:
    return (f"telemetry ({t['config']}): on {shown(t['on_img_per_s'], ',.0f')} img/s, off "
            f"{shown(t['off_img_per_s'], ',.0f')} img/s, on/off {shown(t['ratio'], '.3f')} "
            f"(medians of {len(t['trials']['on'])} interleaved trials)")  # fmt: skip


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
                streams.append({"world": world, "rank": rank, "batch": batch, "path": path, "img_per_s": rates,
                                "median_img_per_s": _median(rates)})  # fmt: skip
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
        lines.append(f"  rank {s['rank']} of {s['world']} (batch {s['batch']:>4}) {DATA_PATHS[s['path']]:<38} "
                     f"{shown(s['median_img_per_s'], ',.0f'):>12} img/s")  # fmt: skip
    for k, wait in data.get("data_wait_frac", {}).items():
        first, after = data["data_to_train_ratio_first_epoch"][k], data["data_to_train_ratio_after"][k]
        lines.append(f"  {k:<26} data/train {shown(first, '.1f', unit='x'):>7} first epoch, "
                     f"{shown(after, '.1f', unit='x'):>9} after   "
                     f"data wait {shown(wait, '.1f', 100, '%'):>5} of step time")  # fmt: skip
    lines.append("  (resident: the split decoded once into a table on the rank's device; after the first epoch a "
                 "batch needs the epoch's order and a table lookup, so its rate is the slower of the two)")  # fmt: skip
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
                launcher = [_accelerate(), "launch", "--config_file", str(Path(tmp) / "ddp_cpu.yaml"),
                            "--num_processes", str(processes), "--main_process_port", str(_free_port())]  # fmt: skip
            extra, env = [f"model.batchnorm={batchnorm}"], {"OMP_NUM_THREADS": str(threads)}
            runs.append({"batchnorm": batchnorm, **_run_worker(args, "scaling", extra, launcher, env)})
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


def _accelerate() -> str:
    local = Path(sys.executable).parent / "accelerate"
    return str(local) if local.exists() else (shutil.which("accelerate") or "accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling_worker(args, cfg, setup) -> dict:
    """One launched measurement: the trainer for `--trials` x `--seconds`."""
    accelerator = setup.accelerator
    loop = TrainerLoop(_trainer_run(cfg, "scaling", args.compile))
    loop.trial(args.warmup)
    trials = [loop.trial(args.seconds) for _ in range(args.trials)]
    rates = [t["img_per_s"] for t in trials]
    return {
        "processes": accelerator.num_processes,
        "threads": torch.get_num_threads(),
        "per_rank_batch": loop.trainer.parts.batch,
        "precision": setup.precision,
        "backend": accelerator.distributed_type.value,
        "global_batchnorm": setup.global_batchnorm,
        "trials": trials,
        "img_per_s": rates,
        "median_img_per_s": _median(rates),
        "median_sync_wait_frac": _median([t["telemetry"]["sync_wait_frac"] for t in trials]),
        "median_data_wait_frac": _median([t["telemetry"]["data_wait_frac"] for t in trials]),
    }


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
