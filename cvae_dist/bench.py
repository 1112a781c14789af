"""`cvae-dist bench`: how fast the framework trains, against a plain hand-written PyTorch loop of the same model.

Sections (`--sections`, default `compare,data`; `--scaling` adds `scaling`):

- `compare`: for each precision (fp32, bf16) x layout (NCHW, channels_last), trials that alternate (a) a minimal
  hand-written loop (CVAE, AdamW lr 1e-3 wd 1e-5 fused like the trainer's, the batch from in-memory, already
  resized 64x64 images, `vae_loss(...).total`, zero_grad / backward / step) and (b) the framework's real path
  (`trainer.build`: the Accelerator-prepared model and optimizer, this rank's streaming `RankStream` over the
  configured data, decode (cached after a digit's first use) and resize per batch, `trainer.train_step`, telemetry
  on, one telemetry gather every `log.every_steps`). The order of (a) and (b) alternates per trial so drifting
  machine load hits both alike; img/s, (b)/(a), MFU and data wait per trial, medians over trials; warm-up excluded.
- `data`: the batching rate of `RankStream` alone (1 rank of 1, and each rank of 2), decoding every digit (a first
  epoch) and from the decode cache (later epochs), with and without the on-device resize, against the framework's
  training rate, and the data-wait share of framework steps.
- `scaling`: 1 process x 2 threads, 2 processes x 1 thread (DDP over gloo on CPU) and 1 process x 1 thread, each
  a real `accelerate launch` of this module's worker (`python -m cvae_dist.bench --worker`), which runs the
  framework path and writes its img/s; efficiency = 2x1 / 1x2 and per-core efficiency = 2x1 / (2 x 1x1).

On CUDA the trials are timed with a synchronize at their start and end only (the framework's telemetry adds its
own one per log interval). `--compile` wraps the hand model and the framework model in `torch.compile`;
`--batch N` sets the batch of both (the framework's global `data.batch_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": "no", "no": "no", "bf16": "bf16"}
LAYOUTS = ("nchw", "channels_last")
SECTIONS = ("compare", "data", "telemetry", "scaling")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML recipe (default: the built-in defaults, the seed's recipe)")
    p.add_argument("--trials", type=int, default=5, help="measured trials per configuration (default 5)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per trial and side (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per side before the trials (default 1)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32|bf16 (default both)")
    p.add_argument("--layouts", default="nchw,channels_last", help="comma list of nchw|channels_last (default both)")
    p.add_argument("--batch", type=int, help="batch size of both loops (the framework's global data.batch_size)")
    p.add_argument("--compile", action="store_true", help="torch.compile the hand model and the framework model")
    p.add_argument("--sections", default="compare,data,telemetry", help="comma list of compare|data|telemetry|scaling")
    p.add_argument("--scaling", action="store_true", help="add the scaling section (real accelerate launches)")
    p.add_argument("--data-seconds", type=float, help="seconds per data-stream trial (default: --seconds)")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # scaling: one launched measurement
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # the worker's result file
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_workers=1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvae_dist.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from cvae_dist.config import ConfigError

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
    overrides = _overrides(args)

    from cvae_dist import distributed
    from cvae_dist.config import load_config
    from cvae_dist.telemetry import count_flops_per_image, peak_flops

    cfg = load_config(args.config, overrides)
    threads = distributed.set_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flops = count_flops_per_image(cfg.model)
    peak, peak_source = peak_flops(device, cfg.log.peak_tflops)
    result: dict = {
        "command": list(sys.argv),
        "environment": environment(device, threads),
        "settings": {
            "trials": args.trials,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "batch": cfg.data.per_rank_batch_size or cfg.data.batch_size,
            "compile": args.compile,
            "device": str(device),
            "overrides": overrides,
            "config": str(args.config) if args.config else None,
            "log_every_steps": cfg.log.every_steps,
            "num_workers": distributed.data_workers(cfg.data.num_workers, device),
            "sections": sections,
        },
        "flops_per_image": flops,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
    }
    print(f"cvae-dist bench: {_env_line(result['environment'])}")
    print(f"FLOPs per image (fwd+bwd) {flops:,.0f}; peak {peak / 1e12:.3f} TFLOP/s ({peak_source})")
    if "compare" in sections:
        result["configs"] = compare(args, overrides, precisions, layouts, device, flops, peak)
        print(compare_table(result["configs"]))
    if "data" in sections:
        result["data"] = data_section(args, cfg, device, result.get("configs"))
        print(data_table(result["data"]))
    if "telemetry" in sections:
        result["telemetry_overhead"] = telemetry_section(args, overrides, precisions[-1], layouts[-1])
        t = result["telemetry_overhead"]
        print(
            f"telemetry ({t['config']}): on {t['on_img_per_s']:,.0f} img/s, off {t['off_img_per_s']:,.0f} img/s, "
            f"on/off {t['ratio']:.3f} (medians of {args.trials} interleaved trials)"
        )
    if "scaling" in sections:
        result["scaling"] = scaling_section(args, overrides)
        print(scaling_table(result["scaling"]))
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
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


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = ["log.wandb=disabled"]
    if args.batch is not None:
        extra.append(f"data.batch_size={args.batch}")
    return [*args.overrides, *extra]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _label(precision: str, layout: str) -> str:
    return f"{'fp32' if precision == 'no' else precision}/{layout}"


def environment(device: torch.device, threads: int) -> dict:
    import accelerate

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
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
        "mkldnn_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "loadavg_start": list(os.getloadavg()),
    }


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


def _endless(stream) -> Iterator:
    """A `RankStream`'s batches, epoch after epoch (1, 2, ...), for trials that outlast an epoch."""
    for epoch in itertools.count(1):
        yield from stream.epoch(epoch)


def _autocast_dtype(module: torch.nn.Module, run_forward: Callable[[], object]) -> str:
    """The dtype the encoder's mu head (a Linear) produces in one forward of `run_forward`: shows autocast is on."""
    inner = module
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or inner._orig_mod
    seen: list[torch.dtype] = []
    handle = inner.encoder.mu.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        with torch.random.fork_rng(devices=[]):
            run_forward()
    finally:
        handle.remove()
    return str(seen[0]).removeprefix("torch.") if seen else "unknown"


# ---------------------------------------------------------------------------------------------- the two loops


class HandLoop:
    """The plain PyTorch loop: the same model and recipe, batches from memory, nothing else."""

    def __init__(self, model_cfg, images: torch.Tensor, batch: int, precision: str, channels_last: bool, compile_):
        from cvae_dist.model import CVAE, vae_loss

        self.device = images.device
        torch.manual_seed(0)
        model = CVAE(model_cfg).to(self.device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
        reps = -(-2 * batch // len(images))  # at least two distinct batches
        images = images.repeat(reps, 1, 1, 1) if reps > 1 else images
        self.batches = [
            images[i : i + batch].contiguous(memory_format=fmt) for i in range(0, len(images) - batch + 1, batch)
        ]
        self.batch = batch
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.vae_loss = vae_loss
        self.forward = torch.compile(model) if compile_ else model
        self.i = 0

    def step(self) -> None:
        x = self.batches[self.i]
        self.i = (self.i + 1) % len(self.batches)
        with self._autocast():
            out = self.forward(x)
        loss = self.vae_loss(out, x).total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def autocast_dtype(self) -> str:
        x = self.batches[0][:2]
        with torch.no_grad(), self._autocast():
            return _autocast_dtype(self.model, lambda: self.model(x))


class FrameworkLoop:
    """The framework's path: `trainer.build` (prepared model + AdamW + RankStream), `trainer.train_step`, telemetry
    with one gather every `log.every_steps` steps (which also carries the agreed stop flag, as the trainer's does)."""

    def __init__(self, cfg, compile_: bool = False, quiet: bool = True, telemetry: bool = True):
        from cvae_dist import distributed, trainer
        from cvae_dist.telemetry import NoTelemetry, Telemetry

        self.accelerator = distributed.make_accelerator(cfg)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            self.parts = trainer.build(cfg, self.accelerator)
        if telemetry:
            identity = distributed.rank_identity(self.accelerator)
            self.telemetry = Telemetry(self.accelerator, cfg, self.parts.batch, identity)
            self.telemetry.instrument(self.parts.model)
        else:
            self.telemetry = NoTelemetry(self.accelerator)
        self.precision = self.accelerator.mixed_precision
        self.dtype_seen = self._probe_dtype()
        if compile_:
            self.parts.model = torch.compile(self.parts.model)
        self.train_step = trainer.train_step
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.every = cfg.log.every_steps
        self.batches = self.telemetry.timed(_endless(self.parts.stream))
        self.loss_sum = torch.zeros((), device=self.device)
        self.interval_sum = torch.zeros((), device=self.device)
        self.steps = 0

    def _probe_dtype(self) -> str:
        x = self.parts.model_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
        model = self.parts.model
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                return _autocast_dtype(model, lambda: model(x))
        finally:
            model.train()

    def trial(self, seconds: float) -> dict:
        """Steps until `seconds` have passed on some rank, checked (and agreed) at the log intervals."""
        zero = torch.zeros((), device=self.device)
        self.telemetry.interval([zero, zero, zero], self.steps)  # restart the meters (and line the ranks up)
        _sync(self.device)
        start = time.perf_counter()
        steps, wait, records = 0, 0.0, []
        while True:
            t0 = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t0
            loss = self.train_step(self.parts, self.parts.model_input(batch.pixels), self.telemetry)
            self.loss_sum += loss
            self.interval_sum += loss
            steps += 1
            self.steps += 1
            if self.steps % self.every == 0:
                stop = torch.tensor(float(time.perf_counter() - start >= seconds), device=self.device)
                interval = self.telemetry.interval([self.interval_sum, stop, self.loss_sum], self.steps)
                interval.record.pop("stragglers", None)
                records.append(interval.record)
                self.interval_sum.zero_()
                if interval.per_rank[:, 1].any():
                    break
        _sync(self.device)
        elapsed = time.perf_counter() - start
        rank = self.accelerator.process_index
        names = ("data_wait_frac", "sync_wait_frac", "mfu", "step_time_s", "fwd_bwd_s", "optimizer_s")
        measured = records and records[0]  # empty with telemetry off
        tele = {name: _median([r[f"rank/{rank}/{name}"] for r in records]) for name in names} if measured else {}
        return {
            "img_per_s": steps * self.parts.batch * self.world / elapsed,
            "steps": steps,
            "seconds": elapsed,
            "data_wait_frac": wait / elapsed,
            "telemetry": tele,
        }


# ---------------------------------------------------------------------------------------------- sections


def _reset_accelerate() -> None:
    """accelerate keeps one AcceleratorState per process; a new precision needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def compare(args, overrides, precisions, layouts, device, flops, peak) -> list[dict]:
    from cvae_dist.config import Precision, load_config
    from cvae_dist.data import load_split, to_model_input

    configs = []
    base = load_config(args.config, overrides)
    pixels, _ = load_split(base.data.source, base.data.train_split)  # the hand loop's data, resized once, in memory
    images = to_model_input(pixels.to(device), base.model.image_size, channels_last=False)
    for precision in precisions:
        _reset_accelerate()
        for layout in layouts:
            label = _label(precision, layout)
            channels_last = layout == "channels_last"
            cfg = load_config(args.config, overrides)
            cfg.train.precision, cfg.train.channels_last = Precision(precision), channels_last
            fw = FrameworkLoop(cfg, args.compile)
            hand = HandLoop(cfg.model, images, fw.parts.batch, precision, channels_last, args.compile)
            dtypes = {"hand": hand.autocast_dtype(), "framework": fw.dtype_seen}
            want = "bfloat16" if precision == "bf16" else "float32"
            if set(dtypes.values()) != {want}:
                raise RuntimeError(f"{label}: autocast check failed, mu head produced {dtypes} (expected {want})")
            _timed_run(hand.step, args.warmup, device, min_steps=3)  # warm-up (compilation, allocator, caches)
            fw.trial(args.warmup)
            rows = {"hand": [], "framework": []}
            for t in range(args.trials):
                order = ("hand", "framework") if t % 2 == 0 else ("framework", "hand")
                for side in order:
                    if side == "hand":
                        steps, seconds = _timed_run(hand.step, args.seconds, device)
                        rows["hand"].append(
                            {"img_per_s": steps * hand.batch / seconds, "steps": steps, "seconds": seconds}
                        )
                    else:
                        rows["framework"].append(fw.trial(args.seconds))
                h, f = rows["hand"][-1]["img_per_s"], rows["framework"][-1]["img_per_s"]
                print(
                    f"  {label:<20} trial {t + 1}/{args.trials}: hand {h:8,.0f} img/s, framework {f:8,.0f} "
                    f"img/s, ratio {f / h:.3f}",
                    flush=True,
                )
            configs.append(_summarise(precision, layout, rows, dtypes, flops, peak, fw.parts.batch))
            del fw, hand
    _reset_accelerate()
    return configs


def telemetry_section(args, overrides, precision: str, layout: str) -> dict:
    """The framework path with telemetry on and off, trials interleaved in this one process."""
    from cvae_dist.config import Precision, load_config

    _reset_accelerate()
    cfg = load_config(args.config, overrides)
    cfg.train.precision, cfg.train.channels_last = Precision(precision), layout == "channels_last"
    loops = {"on": FrameworkLoop(cfg, args.compile), "off": FrameworkLoop(cfg, args.compile, telemetry=False)}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for loop in loops.values():
        loop.trial(args.warmup)
    for t in range(args.trials):
        for side in ("on", "off") if t % 2 == 0 else ("off", "on"):
            rates[side].append(loops[side].trial(args.seconds)["img_per_s"])
    _reset_accelerate()
    on, off = _median(rates["on"]), _median(rates["off"])
    return {
        "config": _label(precision, layout),
        "on_img_per_s": on,
        "off_img_per_s": off,
        "ratio": on / off,
        "trials": rates,
    }


def _summarise(precision, layout, rows, dtypes, flops, peak, batch) -> dict:
    hand = [r["img_per_s"] for r in rows["hand"]]
    fw = [r["img_per_s"] for r in rows["framework"]]
    ratios = [f / h for f, h in zip(fw, hand, strict=True)]
    waits = [r["data_wait_frac"] for r in rows["framework"]]
    tele_keys = rows["framework"][0]["telemetry"].keys()
    return {
        "precision": "fp32" if precision == "no" else precision,
        "layout": layout,
        "batch": batch,
        "autocast_dtype": dtypes,
        "hand": {
            "trials": rows["hand"],
            "img_per_s": hand,
            "median_img_per_s": _median(hand),
            "mfu": _median(hand) * flops / peak,
        },
        "framework": {
            "trials": rows["framework"],
            "img_per_s": fw,
            "median_img_per_s": _median(fw),
            "mfu": _median(fw) * flops / peak,
            "data_wait_frac": waits,
            "median_data_wait_frac": _median(waits),
            "telemetry": {k: _median([r["telemetry"][k] for r in rows["framework"]]) for k in tele_keys},
        },
        "ratio": ratios,
        "median_ratio": _median(ratios),
        "ratio_of_medians": _median(fw) / _median(hand),
    }


def compare_table(configs: list[dict]) -> str:
    lines = [
        "",
        f"{'config':<20} {'hand img/s':>11} {'framework img/s':>16} {'ratio':>6} {'hand MFU':>9} {'fw MFU':>7} "
        f"{'data wait':>9}  {'autocast':>8}",
    ]
    for c in configs:
        lines.append(
            f"{c['precision'] + '/' + c['layout']:<20} {c['hand']['median_img_per_s']:>11,.0f} "
            f"{c['framework']['median_img_per_s']:>16,.0f} {c['median_ratio']:>6.3f} "
            f"{100 * c['hand']['mfu']:>8.2f}% {100 * c['framework']['mfu']:>6.2f}% "
            f"{100 * c['framework']['median_data_wait_frac']:>8.1f}%  {c['autocast_dtype']['framework']:>8}"
        )
    lines.append("(medians over trials; ratio = median of per-trial framework/hand; MFU against the peak above)")
    return "\n".join(lines)


def _stream_rates(cfg, rank, world, batch, seconds, warmup, trials, resize, cold, device) -> list[float]:
    """img/s of this rank's `RankStream` alone; `cold` empties the decode cache before every batch (a first epoch)."""
    from cvae_dist.data import RankStream, decode_image, to_model_input
    from cvae_dist.distributed import data_workers

    d = cfg.data
    workers = data_workers(d.num_workers, device)
    stream = RankStream(d.source, d.train_split, rank, world, batch, d.shuffle_buffer, cfg.train.seed, workers)

    batches = _endless(stream)

    def step():
        if cold:
            decode_image.cache_clear()
        b = next(batches)
        if resize:
            to_model_input(b.pixels.to(device), cfg.model.image_size, cfg.train.channels_last)

    _timed_run(step, warmup, device, min_steps=stream.steps_per_epoch + 1)  # warm: every digit decoded once
    rates = []
    for _ in range(trials):
        steps, s = _timed_run(step, seconds, device)
        rates.append(steps * batch / s)
    return rates


def data_section(args, cfg, device, configs: list[dict] | None) -> dict:
    seconds = args.data_seconds or args.seconds
    global_batch = cfg.data.batch_size
    streams = []
    for world, ranks in ((1, [0]), (2, [0, 1])):
        batch = cfg.data.per_rank_batch_size or global_batch // world
        for rank in ranks:
            variants = ((True, False), (False, False), (False, True)) if world == 1 else ((True, False), (False, False))
            for cold, resize in variants:
                rates = _stream_rates(cfg, rank, world, batch, seconds, args.warmup, args.trials, resize, cold, device)
                streams.append(
                    {
                        "world": world,
                        "rank": rank,
                        "batch": batch,
                        "decode_cache": "cold" if cold else "warm",
                        "with_resize": resize,
                        "img_per_s": rates,
                        "median_img_per_s": _median(rates),
                    }
                )
    from cvae_dist.distributed import data_workers

    out: dict = {"num_workers": data_workers(cfg.data.num_workers, device), "streams": streams}
    if configs:
        train = {f"{c['precision']}/{c['layout']}": c["framework"]["median_img_per_s"] for c in configs}
        out["train_img_per_s"] = train
        for cache in ("cold", "warm"):
            single = next(s for s in streams if s["world"] == 1 and not s["with_resize"] and s["decode_cache"] == cache)
            out[f"data_to_train_ratio_{cache}"] = {k: single["median_img_per_s"] / v for k, v in train.items()}
            out[f"min_data_to_train_ratio_{cache}"] = min(out[f"data_to_train_ratio_{cache}"].values())
        waits = {f"{c['precision']}/{c['layout']}": c["framework"]["median_data_wait_frac"] for c in configs}
        out["data_wait_frac"] = waits
        out["max_data_wait_frac"] = max(waits.values())
    return out


def data_table(data: dict) -> str:
    lines = ["", f"data pipeline (RankStream, data.num_workers={data['num_workers']}):"]
    for s in data["streams"]:
        what = ("decode" if s["decode_cache"] == "cold" else "cached") + "+batch"
        what += "+resize" if s["with_resize"] else ""
        lines.append(
            f"  rank {s['rank']} of {s['world']} (batch {s['batch']:>3}) {what:<20} "
            f"{s['median_img_per_s']:>9,.0f} img/s"
        )
    for k, wait in data.get("data_wait_frac", {}).items():
        cold, warm = data["data_to_train_ratio_cold"][k], data["data_to_train_ratio_warm"][k]
        lines.append(
            f"  {k:<20} data/train {cold:5.1f}x first epoch, {warm:6.1f}x after   "
            f"data wait {100 * wait:4.1f}% of step time"
        )
    lines.append("  (first epoch: every digit decoded; after: decoded digits come from the per-process cache)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scaling


SCALING_RUNS = ((1, 2), (2, 1), (1, 1))  # (processes, threads per process)


def scaling_section(args, overrides: list[str]) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="cvae-bench-") as tmp:
        for processes, threads in SCALING_RUNS:
            out = Path(tmp) / f"p{processes}t{threads}.json"
            runs.append(_launch_worker(args, overrides, processes, threads, out))
            r = runs[-1]
            print(
                f"  scaling {processes} process(es) x {threads} thread(s): {r['median_img_per_s']:,.0f} img/s",
                flush=True,
            )
    rate = {(r["processes"], r["threads"]): r["median_img_per_s"] for r in runs}
    return {
        "runs": runs,
        "efficiency": rate[(2, 1)] / rate[(1, 2)],
        "per_core_efficiency": rate[(2, 1)] / (2 * rate[(1, 1)]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_worker(args, overrides: list[str], processes: int, threads: int, out: Path) -> dict:
    accelerate = Path(sys.executable).parent / "accelerate"
    launcher = [str(accelerate) if accelerate.exists() else (shutil.which("accelerate") or "accelerate"), "launch"]
    if processes == 1:
        launcher += ["--config_file", str(REPO / "launch" / "cpu_debug.yaml")]
    else:
        launcher += ["--config_file", str(REPO / "launch" / "ddp_cpu.yaml"), "--num_processes", str(processes)]
        launcher += ["--main_process_port", str(_free_port())]
    cmd = [
        *launcher,
        "-m",
        "cvae_dist.bench",
        "--worker",
        "--out",
        str(out),
        "--trials",
        str(args.trials),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        *(["--config", str(args.config)] if args.config else []),
        *(["--compile"] if args.compile else []),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    timeout = 180 + (args.trials + 1) * (args.seconds + args.warmup) * 3
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"scaling worker ({processes} x {threads}) exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return {"command": cmd, **json.loads(out.read_text())}


def _worker(args: argparse.Namespace) -> int:
    """One launched measurement: the framework path for `--trials` x `--seconds`; rank 0 writes the figures."""
    from cvae_dist import distributed
    from cvae_dist.config import load_config

    cfg = load_config(args.config, _overrides(args))
    distributed.set_threads()
    fw = FrameworkLoop(cfg, args.compile)
    threads = torch.get_num_threads()
    fw.trial(args.warmup)
    trials = [fw.trial(args.seconds) for _ in range(args.trials)]
    rates = [t["img_per_s"] for t in trials]
    if fw.accelerator.is_main_process:
        figures = {
            "processes": fw.world,
            "threads": threads,
            "per_rank_batch": fw.parts.batch,
            "precision": fw.precision,
            "backend": fw.accelerator.distributed_type.value,
            "trials": trials,
            "img_per_s": rates,
            "median_img_per_s": _median(rates),
            "median_sync_wait_frac": _median([t["telemetry"]["sync_wait_frac"] for t in trials]),
            "median_data_wait_frac": _median([t["data_wait_frac"] for t in trials]),
        }
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"bench worker: {json.dumps({k: v for k, v in figures.items() if k != 'trials'})}")
    fw.accelerator.wait_for_everyone()
    fw.accelerator.end_training()
    return 0


def scaling_table(s: dict) -> str:
    lines = ["", "scaling (framework path, real accelerate launches; global img/s):"]
    for r in s["runs"]:
        lines.append(
            f"  {r['processes']} process(es) x {r['threads']} thread(s) ({r['backend']}, batch {r['per_rank_batch']}"
            f"/rank): {r['median_img_per_s']:>8,.0f} img/s, sync wait {100 * r['median_sync_wait_frac']:.1f}%"
        )
    lines.append(
        f"  efficiency 2x1 / 1x2 = {s['efficiency']:.3f}; per-core 2x1 / (2 x 1x1) = {s['per_core_efficiency']:.3f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
