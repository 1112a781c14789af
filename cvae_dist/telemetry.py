"""Per-rank throughput telemetry: every rank's `StepTimer` measures (`NoTimer`: img/s only); the one gather per log
interval carries the figures to every rank for `summarise`, the `StragglerDetector` and the end's `RankTable`. Timing
never syncs: on CPU the step is synchronous; on CUDA the marks are events, read once the device has passed them."""

from __future__ import annotations

import contextlib
import itertools
import math
import resource
import statistics
import time
from collections.abc import Iterable, Iterator

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.flop_counter import FlopCounterMode

from cvae_dist.model import CVAE, vae_loss
from cvae_dist.strict_json import shown

# Dense tensor-core TFLOP/s (bf16 = fp16, tf32, fp32) by GPU name; an fp32 run gets TF32's where cuDNN may use it.
GPU_PEAK_TFLOPS = {
    "H200": (989, 494, 67),
    "H100": (989, 494, 67),
    "A100": (312, 156, 19.5),
    "L40S": (362, 183, 91.6),
    "A10G": (125, 62.5, 31.2),
    "L4": (121, 60, 30.3),
    "V100": (125, 15.7, 15.7),  # no bf16 or tf32: fp16 tensor cores only
    "T4": (65, 8.1, 8.1),
}
# This rank's figures, gathered each interval as `rank/<r>/<name>` (docs/telemetry.md says what each one measures).
RANK_FIELDS = (
    *("img_per_s", "busy_img_per_s", "step_time_s", "data_wait_frac", "idle_frac", "sync_wait_frac"),
    *("fwd_bwd_s", "optimizer_s", "peak_mem_mb", "mfu"),
)


def count_flops_per_image(model_cfg, batch: int = 8) -> float:
    """Forward + backward FLOPs of one image, counted on a fresh model (the prepared one may be sharded or hooked)."""
    with torch.random.fork_rng(devices=[]):  # leave the training RNG stream untouched (exact resume)
        probe = CVAE(model_cfg).train()
        x = torch.rand(batch, 1, model_cfg.image_size, model_cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            vae_loss(probe(x), x).total.backward()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None) -> tuple[float, str]:
    """The device's peak FLOP/s in `precision`, and where it comes from; NaN (MFU null) where it is not known."""
    if configured_tflops:
        return configured_tflops * 1e12, "configured"
    if device.type != "cuda":
        return float("nan"), "unknown: no peak for a CPU (set log.peak_tflops)"
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            kind = precision if precision != "fp32" else "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
            return {"tf32": tf32, "fp32": fp32}.get(kind, half) * 1e12, f"table:{key}:{kind}"
    return float("nan"), f"unknown: {name} is not in the GPU table (set log.peak_tflops)"


def compute_dtype(model: torch.nn.Module, run_forward) -> str:
    """The dtype the encoder's mu head produces in one forward of `run_forward`: what the model really computes in."""
    inner = model
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):  # DDP / DeepSpeed / torch.compile wrappers
        inner = getattr(inner, "module", None) or inner._orig_mod
    seen: list[torch.dtype] = []
    handle = inner.encoder.mu.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            run_forward()
    finally:
        handle.remove()
    return str(seen[0]).removeprefix("torch.") if seen else "unknown"


class _Marks:
    """Points on the device's timeline: host clock readings on a CPU; on CUDA, events from a pool, never waited for."""

    def __init__(self, device: torch.device):
        self.cuda, self.pool = device.type == "cuda", []

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.pool.pop() if self.pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, mark) -> bool:
        return not self.cuda or mark.query()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def release(self, marks: Iterable) -> None:
        if self.cuda:
            self.pool.extend(m for m in marks if m is not None)


class _Interval:
    """One log interval on this rank: host figures taken when it closes, device marks read once complete."""

    def __init__(self):
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0
        self.wall = self.peak_mem = math.nan
        self.steps_marks: list[tuple] = []  # (ready, backward done or None, step done) per step
        self.waits: list[tuple] = []  # (arrived, went on) around each collective this rank waited in

    def marks(self) -> list:
        return [m for t in (*self.steps_marks, *self.waits) for m in t]

    def last(self):  # None: it took no step
        return self.steps_marks[-1][2] if self.steps_marks else None


class NoTimer:
    """`log.telemetry=false`: images over wall time, nothing else measured and no hook on the model."""

    def __init__(self, per_rank_batch: int):
        self.batch = per_rank_batch
        self.restart()

    def instrument(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def restart(self) -> None:
        self.steps, self.start = 0, time.perf_counter()

    def timed(self, batches: Iterable) -> Iterable:
        return batches

    def step_done(self) -> None:
        self.steps += 1

    def local(self) -> dict[str, float]:
        figures = {"img_per_s": self.steps * self.batch / max(time.perf_counter() - self.start, 1e-9)}
        self.restart()
        return figures


class StepTimer:
    """This rank's meters over a log interval (RANK_FIELDS). On CUDA `local()` reports the newest interval whose events
    have completed (the one before the step line's; the first line's: null). Time blocked on peers is timed around
    the collectives hooks can see; `blocked_unknown` says why it cannot be (then it and the busy rate are null)."""

    def __init__(self, device, per_rank_batch: int, flops_per_image: float, peak_flops: float, blocked_unknown=None):
        self.device, self.batch, self.flops_per_image, self.peak = device, per_rank_batch, flops_per_image, peak_flops
        self.blocked_unknown, self.marks, self.closed = blocked_unknown, _Marks(device), []
        self.restart()

    def instrument(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Mark backward's end (AdamW's step pre-hook) and, under DDP, time the waits for peers: the buffer broadcast
        opening each forward, and backward's end after the last gradient bucket went out."""
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer  # accelerate's wrapper, DeepSpeed's ZeRO optimizer: the AdamW inside
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.register_step_pre_hook(lambda *_: self._backward_done())
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return
        model.register_forward_pre_hook(lambda *_: setattr(self, "_arrived", self.marks.now()))
        model.module.register_forward_pre_hook(lambda *_: self._went_on())
        model.register_comm_hook(self, _timed_allreduce)

    @contextlib.contextmanager
    def waiting(self):  # around a collective this rank waits in
        arrived = self.marks.now()
        yield
        self.current.waits.append((arrived, self.marks.now()))

    def _went_on(self, at=None) -> None:
        if self._arrived is not None:
            self.current.waits.append((self._arrived, self.marks.now() if at is None else at))
            self._arrived = None

    def _backward_done(self) -> None:
        self._backward = self.marks.now()
        self._went_on(self._backward)  # the last gradient bucket went out at `_arrived`: backward ends the wait

    def restart(self) -> None:
        """Start a new interval now (the ones not yet read are dropped)."""
        self.marks.release(m for interval in self.closed for m in interval.marks())
        self.current, self.closed = _Interval(), []
        self._arrived = self._backward = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        t0 = time.perf_counter()
        for batch in it:  # the data wait: from asking for a batch to having it
            self.current.data_wait += time.perf_counter() - t0
            self._ready, self._backward = self.marks.now(), None
            yield batch
            t0 = time.perf_counter()

    def step_done(self) -> None:
        self.current.steps += 1
        self.current.steps_marks.append((self._ready, self._backward, self.marks.now()))

    def local(self) -> dict[str, float]:
        """Close this interval; the figures of the newest one whose marks have all completed (NaN: none yet)."""
        closing, self.current = self.current, _Interval()
        closing.wall, closing.peak_mem = max(time.perf_counter() - closing.start, 1e-9), _peak_memory_mb(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.closed.append(closing)
        ready = [i for i in self.closed if i.last() is None or self.marks.done(i.last())]
        figures = self._figures(ready[-1]) if ready else dict.fromkeys(RANK_FIELDS, math.nan)
        newest = self.closed.index(ready[-1]) + 1 if ready else 0
        self.marks.release(m for interval in self.closed[:newest] for m in interval.marks())
        self.closed = self.closed[newest:]
        return figures

    def _figures(self, i: _Interval) -> dict[str, float]:
        seconds = self.marks.seconds
        images, steps = i.steps * self.batch, max(i.steps, 1)
        fwd_bwd = sum(seconds(ready, backward or done) for ready, backward, done in i.steps_marks)
        opt = sum(seconds(backward, done) for _, backward, done in i.steps_marks if backward is not None)
        between = sum(seconds(a[2], b[0]) for a, b in itertools.pairwise(i.steps_marks))
        blocked = math.nan if self.blocked_unknown else sum(seconds(a, b) for a, b in i.waits)
        img_per_s = images / i.wall
        return {
            "img_per_s": img_per_s,
            "busy_img_per_s": math.nan if math.isnan(blocked) else images / max(i.wall - blocked, 1e-9),
            "step_time_s": i.wall / steps,
            "data_wait_frac": i.data_wait / i.wall,
            "idle_frac": between / i.wall,
            "sync_wait_frac": blocked / i.wall,
            "fwd_bwd_s": fwd_bwd / steps,
            "optimizer_s": opt / steps,
            "peak_mem_mb": i.peak_mem,
            "mfu": _at_most_one(img_per_s * self.flops_per_image / self.peak),
        }


def summarise(gathered: dict[str, torch.Tensor], step: int, global_batch: int) -> dict:
    """The interval's `rank/<r>/<name>` and `throughput/*` series from every rank's gathered figures."""
    series: dict = {"images_seen": step * global_batch}
    series |= {f"rank/{r}/{n}": v for n in RANK_FIELDS if n in gathered for r, v in enumerate(gathered[n].tolist())}
    series["throughput/global_img_per_s"] = gathered["img_per_s"].sum().item()
    if "busy_img_per_s" in gathered:
        busy = gathered["busy_img_per_s"].tolist()
        median = statistics.median(busy)
        series |= {
            "throughput/min_rank_busy_img_per_s": min(busy),
            "throughput/straggler_ratio": min(busy) / median if median else 1.0,
            "throughput/mfu": gathered["mfu"].nanmean().item(),
            "throughput/data_wait_frac": gathered["data_wait_frac"].max().item(),
        }
    return series


class StragglerDetector:
    """Ranks whose busy rate stays below `straggler_fraction` of the median for `straggler_intervals` intervals."""

    def __init__(self, log_cfg, world_size: int):
        self.fraction, self.intervals = log_cfg.straggler_fraction, log_cfg.straggler_intervals
        self.slow_streak = [0] * world_size

    def update(self, gathered: dict[str, torch.Tensor]) -> list[int]:
        """The ranks that just became stragglers (named once per slow spell)."""
        if "busy_img_per_s" not in gathered:
            return []
        rates = gathered["busy_img_per_s"].tolist()
        slow = self.fraction * statistics.median(rates)
        self.slow_streak = [n + 1 if rate < slow else 0 for n, rate in zip(self.slow_streak, rates, strict=True)]
        return [r for r, streak in enumerate(self.slow_streak) if streak == self.intervals]

    def describe(self, ranks: list[int], step: int, identities: list[dict]) -> str:
        names = ", ".join(f"rank {r} ({identities[r]['node']}, machine {identities[r]['machine_rank']})" for r in ranks)
        return f"step {step}: {names} below {self.fraction:.0%} of the median img/s for {self.intervals} intervals"


class RankTable:
    """Per-rank means over the run's intervals for the end; NaNs left out of the means, none at all prints n/a."""

    def __init__(self, identities: list[dict]):
        self.identities = identities
        self.sums = [dict.fromkeys(RANK_FIELDS, 0.0) for _ in identities]
        self.counts = [dict.fromkeys(RANK_FIELDS, 0) for _ in identities]

    def add(self, gathered: dict[str, torch.Tensor]) -> None:
        for name in (n for n in RANK_FIELDS if n in gathered):
            for r, value in enumerate(gathered[name].tolist()):
                if math.isfinite(value):
                    self.sums[r][name] += value
                    self.counts[r][name] += 1

    def render(self) -> str:
        row = "{:>4}  {:<16.16} {:>9} {:>10} {:>9} {:>7} {:>10}".format
        lines = [row("rank", "host", "img/s", "busy img/s", "data wait", "MFU", "peak mem")]
        for r, ident in enumerate(self.identities):
            m = {k: s / self.counts[r][k] if self.counts[r][k] else math.nan for k, s in self.sums[r].items()}
            img, busy = shown(m["img_per_s"], ",.0f"), shown(m["busy_img_per_s"], ",.0f")
            wait, mfu = shown(m["data_wait_frac"], ".1f", 100, "%"), shown(m["mfu"], ".2f", 100, "%")
            lines.append(row(r, ident["node"], img, busy, wait, mfu, shown(m["peak_mem_mb"], ",.0f", unit=" MB")))
        return "\n".join(lines)


def _at_most_one(mfu: float) -> float:
    """An MFU above 1 means the peak is wrong: no figure (null) rather than one that cannot be true."""
    return mfu if mfu <= 1 else float("nan")


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last interval; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed_allreduce(timer: StepTimer, bucket):  # no return annotation: DDP checks it literally
    """DDP's own all-reduce, noting when this bucket went out (the last one's mark starts backward's wait)."""
    timer.marks.release([timer._arrived])
    timer._arrived = timer.marks.now()
    return allreduce_hook(None, bucket)
