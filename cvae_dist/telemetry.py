"""Per-rank throughput telemetry: every rank measures, one small all-gather per log interval, the main process
writes `rank/<r>/...` and `throughput/...` series, flags stragglers and prints a per-rank table at the end.

Timing is honest without syncing every step: on CPU the step is synchronous, so wall clocks are exact; on CUDA
the phases are CUDA events, read (one synchronize) only at the log point.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}
# Order of the per-rank vector gathered each interval (after the trainer's own leading entries).
RANK_FIELDS = (
    "img_per_s",  # images / wall time: what this rank delivered (ranks in one DDP job move in lockstep)
    "busy_img_per_s",  # images / (wall - time waiting for peers): what this rank could do alone; names stragglers
    "step_time_s",
    "data_wait_frac",
    "sync_wait_frac",  # time blocked on peers (DDP buffer broadcast + gradient all-reduce)
    "fwd_bwd_s",
    "optimizer_s",
    "peak_mem_mb",
    "mfu",
)


def count_flops_per_image(model_cfg, batch: int = 8) -> float:
    """Forward + backward FLOPs of one image of the architecture `model_cfg`, counted by torch.utils.flop_counter
    on a fresh model (the prepared one may be sharded or hooked)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cvae_dist.model import CVAE, vae_loss

    with torch.random.fork_rng(devices=[]):  # leave the training RNG stream untouched (exact resume)
        probe = CVAE(model_cfg).train()
        x = torch.rand(batch, 1, model_cfg.image_size, model_cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            vae_loss(probe(x), x).total.backward()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device, configured_tflops: float | None) -> tuple[float, str]:
    """The device's peak FLOP/s: configured, from the GPU table, or measured (CPU: an fp32 matmul loop)."""
    if configured_tflops:
        return configured_tflops * 1e12, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"table:{key}"
    a = torch.ones(512, 512, device=device)
    torch.mm(a, a)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        torch.mm(a, a)
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 512**3 * n / (time.perf_counter() - start), "measured:fp32-matmul"


class _Clock:
    """Wall clock on CPU; CUDA events on GPU (elapsed times read at the interval's end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


@dataclass
class Interval:
    """What the trainer gets back from one interval's gather."""

    per_rank: torch.Tensor  # (world, len(leading) + len(RANK_FIELDS))
    record: dict = field(default_factory=dict)


class Telemetry:
    def __init__(self, accelerator: Accelerator, cfg, per_rank_batch: int, identity: dict):
        self.accelerator = accelerator
        self.cfg = cfg.log
        self.batch = per_rank_batch
        self.flops_per_image = count_flops_per_image(cfg.model)
        self.peak, self.peak_source = peak_flops(accelerator.device, cfg.log.peak_tflops)
        self.identities = gather_object([identity])  # once, at start: host and machine of every rank
        self.clock = _Clock(accelerator.device)
        self.delay = cfg.train.debug_delay_s if accelerator.process_index == cfg.train.debug_delay_rank else 0.0
        self.slow_streak = [0] * accelerator.num_processes
        self.last_alert = -1e9
        self.totals = [dict.fromkeys(RANK_FIELDS, 0.0) | {"intervals": 0} for _ in self.identities]
        self._reset()

    def instrument(self, model: torch.nn.Module) -> None:
        """Measure time blocked on peers in DDP: the buffer broadcast that opens each forward, and the gradient
        all-reduce (a communication hook). Other wrappers (DeepSpeed) report no sync wait."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return
        model.module.register_forward_pre_hook(self._inner_forward_started)
        model.register_comm_hook(self, _timed_allreduce)

    def forward_starts(self) -> None:
        self._forward_called = time.perf_counter()

    def _inner_forward_started(self, _module, _args) -> None:
        if self._forward_called is not None:
            self.sync_wait += time.perf_counter() - self._forward_called
            self._forward_called = None

    def _reset(self) -> None:
        self.sync_wait = 0.0
        self._forward_called = None
        self.data_wait = 0.0
        self.phases: list[tuple] = []  # (batch ready, backward done, optimizer done) per step
        self.steps = 0
        self.start = time.perf_counter()
        if self.clock.cuda:
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)

    def timed(self, batches: Iterable) -> Iterator:
        """Yield batches, adding the time spent waiting for each to the data-wait meter."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - t0
            self._ready = self.clock.now()
            yield batch

    def backward_done(self) -> None:
        self._backward = self.clock.now()

    def step_done(self) -> None:
        if self.delay:
            time.sleep(self.delay)  # test-only: make this rank a straggler
        self.phases.append((self._ready, self._backward, self.clock.now()))
        self.steps += 1

    def interval(self, leading: list[torch.Tensor], step: int) -> Interval:
        """Gather `leading` (the trainer's loss sums and stop flag) with this rank's figures: one collective."""
        if self.clock.cuda:
            torch.cuda.synchronize(self.accelerator.device)
        wall = max(time.perf_counter() - self.start, 1e-9)
        fwd_bwd = sum(self.clock.seconds(r, b) for r, b, _ in self.phases)
        opt = sum(self.clock.seconds(b, d) for _, b, d in self.phases)
        images, steps = self.steps * self.batch, max(self.steps, 1)
        busy = max(wall - self.sync_wait, 1e-9)
        mine = [
            images / wall,
            images / busy,
            wall / steps,
            self.data_wait / wall,
            self.sync_wait / wall,
            fwd_bwd / steps,
            opt / steps,
            _peak_memory_mb(self.accelerator.device),
            images / busy * self.flops_per_image / self.peak,
        ]
        device = leading[0].device
        vector = torch.cat([torch.stack(leading).float(), torch.tensor(mine, device=device)])
        per_rank = self.accelerator.gather(vector[None]).cpu()
        self._reset()
        return Interval(per_rank, self._record(per_rank[:, len(leading) :], step))

    def _record(self, figures: torch.Tensor, step: int) -> dict:
        record: dict = {"images_seen": step * self.batch * len(figures)}
        for r, row in enumerate(figures.tolist()):
            for name, value in zip(RANK_FIELDS, row, strict=True):
                record[f"rank/{r}/{name}"] = value
                self.totals[r][name] += value
            self.totals[r]["intervals"] += 1
        col = {name: figures[:, i].tolist() for i, name in enumerate(RANK_FIELDS)}
        busy = col["busy_img_per_s"]
        median = statistics.median(busy)
        record |= {
            "throughput/global_img_per_s": sum(col["img_per_s"]),
            "throughput/min_rank_img_per_s": min(busy),
            "throughput/straggler_ratio": min(busy) / median if median else 1.0,
            "throughput/mfu": sum(col["mfu"]) / len(busy),
            "throughput/data_wait_frac": max(col["data_wait_frac"]),
        }
        record["stragglers"] = self._stragglers(busy, median)
        return record

    def _stragglers(self, rates: list[float], median: float) -> list[int]:
        """Ranks slower than `straggler_fraction` x median for `straggler_intervals` intervals in a row."""
        flagged = []  # ranks that just crossed the threshold (the console names each once per episode)
        for r, rate in enumerate(rates):
            self.slow_streak[r] = self.slow_streak[r] + 1 if rate < self.cfg.straggler_fraction * median else 0
            if self.slow_streak[r] == self.cfg.straggler_intervals:
                flagged.append(r)
        return flagged

    def alert_due(self) -> bool:
        """Rate limit for straggler alerts."""
        if time.monotonic() - self.last_alert < self.cfg.straggler_alert_every_s:
            return False
        self.last_alert = time.monotonic()
        return True

    def describe(self, rank: int) -> str:
        ident = self.identities[rank]
        return f"rank {rank} ({ident['node']}, machine {ident['machine_rank']})"

    def summary_table(self) -> str:
        """Per-rank means over the run: rank, host, img/s, data-wait %, MFU, peak memory."""
        lines = [
            f"{'rank':>4}  {'host':<16} {'img/s':>9} {'busy img/s':>10} {'data wait':>9} {'MFU':>7} {'peak mem':>10}"
        ]
        for r, (ident, t) in enumerate(zip(self.identities, self.totals, strict=True)):
            n = max(t["intervals"], 1)
            lines.append(
                f"{r:>4}  {ident['node'][:16]:<16} {t['img_per_s'] / n:>9,.0f} {t['busy_img_per_s'] / n:>10,.0f} "
                f"{100 * t['data_wait_frac'] / n:>8.1f}% {100 * t['mfu'] / n:>6.2f}% "
                f"{t['peak_mem_mb'] / n:>7,.0f} MB"
            )
        return "\n".join(lines)

    def run_facts(self) -> dict:
        return {
            "flops_per_image": self.flops_per_image,
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "hosts": [i["host"] for i in self.identities],
            "nodes": [i["node"] for i in self.identities],
        }


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last interval. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed_allreduce(telemetry: Telemetry, bucket):  # no return annotation: DDP checks it literally
    """DDP's default all-reduce (mean), timing how long this rank waits for it to complete."""
    import torch.distributed as dist

    start = time.perf_counter()
    tensor = bucket.buffer().div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def done(fut):
        telemetry.sync_wait += time.perf_counter() - start
        return fut.value()[0]

    return future.then(done)


class NoTelemetry:
    """Telemetry switched off (the bench's baseline for its cost): no timers, and the interval is the bare
    gather of the trainer's own figures."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def timed(self, batches: Iterable) -> Iterator:
        return iter(batches)

    def forward_starts(self) -> None: ...

    def backward_done(self) -> None: ...

    def step_done(self) -> None: ...

    def interval(self, leading: list[torch.Tensor], step: int) -> Interval:
        return Interval(self.accelerator.gather(torch.stack(leading).float()[None]).cpu(), {"stragglers": []})
