"""One optimisation step on a batch of decoded digits: eager, or on CUDA the whole step captured once as a CUDA graph
and replayed (the recipe's batch of 128 is launch-bound on a GPU: a replay removes the launch overhead).

Both take the uint8 (B, 1, 28, 28) batch on the device and add the batch's summed loss to the run's `LossMeter` on
the device (no host sync). The reparameterisation noise comes from `SampleNoise`: a digit's draw belongs to its place
in the global batch, not to the rank that computes it. The eager step is the one definition: the graph records it,
and proves on its first replay that it computes what the eager step computes. Neither knows of timers: telemetry
times them from outside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from cvae_dist.data import derived_seed, to_model_input
from cvae_dist.model import vae_loss

log = logging.getLogger(__name__)

# How far a replayed graph may be from the eager step computed from the same state (relative, one step: the loss, and
# the change it makes to the weights and buffers). bf16 and fp16 round the activations; the GPU check holds whole
# trajectories to the same bars.
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}


class SampleNoise:
    """The standard normal draws of one step's reparameterisation, by place in the global batch: every rank draws the
    whole global batch's from a generator in the same state and keeps its share's rows, so the noise a digit gets,
    and the generator's state, do not depend on the world size. Each epoch reseeds it from (seed, epoch); a resumed
    epoch skips the draws its steps made, so a checkpoint needs no RNG state."""

    def __init__(self, seed: int, global_batch: int, latent_dim: int, share: slice, device: torch.device):
        self.seed, self.shape, self.share = seed, (global_batch, latent_dim), share
        self.generator = torch.Generator(device).manual_seed(seed)

    def start_epoch(self, epoch: int, steps_done: int = 0) -> None:
        self.generator.manual_seed(derived_seed(self.seed, epoch, "noise"))
        for _ in range(steps_done):
            self.draw()

    def draw(self) -> torch.Tensor:
        noise = torch.randn(self.shape, generator=self.generator, device=self.generator.device)
        return noise[self.share]

    @contextlib.contextmanager
    def forked(self):
        """Draw from a copy of the generator: the real one stays where it was."""
        real, self.generator = self.generator, torch.Generator(self.generator.device)
        self.generator.set_state(real.get_state())
        try:
            yield
        finally:
            self.generator = real


class EagerStep:
    """resize -> forward (autocast) -> summed loss in fp32 -> backward -> AdamW."""

    def __init__(
        self, accelerator: Accelerator, model, optimizer, noise: SampleNoise, image_size: int, channels_last: bool,
        skip_nonfinite: bool,
    ):  # fmt: skip
        self.accelerator, self.model, self.optimizer, self.noise = accelerator, model, optimizer, noise
        self.image_size, self.channels_last, self.skip_nonfinite = image_size, channels_last, skip_nonfinite

    def __call__(self, pixels: torch.Tensor, meter) -> None:
        loss = self.forward_backward(pixels)
        # The gradients are already averaged over ranks, so every rank reaches the same verdict (one sync per step,
        # paid only in skip mode).
        skip = self.skip_nonfinite and not _finite_gradients(self.optimizer)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        meter.add(None if skip else loss.detach())  # None: dropped for non-finite gradients

    mode, check = "EagerStep", None  # what ran, and a graph's first-replay check (GraphStep's)

    def close(self) -> None:
        """Nothing to release (GraphStep's holds a CUDA graph)."""

    def forward_backward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_model_input(pixels, self.image_size, self.channels_last)
        with self.accelerator.autocast():
            out = self.model(x, self.noise.draw())
        loss = vae_loss(out, x).total
        # Each rank's loss sums its share of the global batch; DDP/DeepSpeed average gradients over ranks, so
        # scale by the world size to keep the recipe's "summed over the batch" gradient.
        self.accelerator.backward(loss * self.accelerator.num_processes)
        return loss


def cuda_graph(body: Callable[[], None], stream: torch.cuda.Stream, generator: torch.Generator):
    """`body` captured as one CUDA graph on `stream` (the warm-up's: cuBLAS / cuDNN handles were made there). Each
    replay advances `generator`, which `SampleNoise.start_epoch` may reseed between replays; thread_local: a data
    worker's pinned-memory thread may query events meanwhile."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        body()
    return graph


class GraphStep:
    """The eager step captured as one CUDA graph (forward, loss, backward with DDP's all-reduce, fused capturable
    AdamW, the loss meter's in-place update) after `warmup` eager steps on a side stream, then replayed for every
    step, fed through a static input. The warm-up steps are real training steps (capture needs a warm allocator,
    AdamW's state and, under DDP, its rebuilt gradient buckets: PyTorch's CUDA-graph notes ask for 11).

    A fast path no GPU of ours has run proves itself where it runs: the first replay is checked against the eager
    step computed from the same state (weights, AdamW, BatchNorm buffers, loss meter and noise, snapshot and
    restored) and must agree within TOLERANCE. If capture raises or they disagree on any rank, every rank trains on
    eagerly from the eager step's result, saying why in one line (train.cuda_graph=false skips the attempt). `mode`
    and `check` say what ran and what was measured. `capture(body, stream, generator)` makes the graph (`cuda_graph`;
    tests pass others to drive this on a CPU)."""

    def __init__(self, eager: EagerStep, batch: int, warmup: int, side_stream, tolerance: float,
                 capture: Callable = cuda_graph):  # fmt: skip
        self.eager, self.warmup, self.graph, self.noise = eager, warmup, None, eager.noise
        self.tolerance, self.capture = tolerance, capture
        self.static_pixels = torch.zeros(batch, 1, 28, 28, dtype=torch.uint8, device=eager.accelerator.device)
        self.side_stream = side_stream  # DDP was wrapped on it too (PyTorch's notes on capturing DDP's backward)
        self.mode, self.check = "GraphStep", None

    def __call__(self, pixels: torch.Tensor, meter) -> None:
        if self.graph is not None:
            self.static_pixels.copy_(pixels, non_blocking=True)
            self.graph.replay()
        elif self.warmup > 0 or self.mode != "GraphStep":
            self.warmup -= 1
            with self._on_side_stream():
                self.eager(pixels, meter)
        else:
            self.static_pixels.copy_(pixels, non_blocking=True)
            self._capture_and_check(meter)

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the captured graph go once the GPU is done with it: NCCL's teardown waits for graphs that captured its
        communicator (pytorch/pytorch#115388), so this runs before the process group is destroyed. It runs on every
        way out, a CUDA or NCCL fault's included: it waits at most `timeout_s` and never raises (the error that ended
        the run is the one to see); a graph the GPU is still busy with is left to the process's exit."""
        graph, self.graph = self.graph, None
        if graph is None:
            return
        try:
            done = torch.cuda.Event()
            done.record()
            deadline = time.monotonic() + timeout_s
            while not done.query():
                if time.monotonic() > deadline:
                    log.warning("the GPU is still busy %.0f s after the last step (a peer gone?): the CUDA graph is "
                                "left to the process's exit", timeout_s)  # fmt: skip
                    return
                time.sleep(0.01)
            graph.reset()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("could not release the CUDA graph (%s: %s)", type(e).__name__, e)

    def _on_side_stream(self):
        """The warm-up's stream, ordered after the work already queued (and the work after it after it)."""
        if self.side_stream is None:
            return contextlib.nullcontext()
        return _ordered(self.side_stream)

    def _body(self, meter) -> None:
        loss = self.eager.forward_backward(self.static_pixels).detach()
        self.eager.optimizer.step()
        meter.add(loss)

    def _capture_and_check(self, meter) -> None:
        """Capture; replay once against the eager step from the same state; keep the graph or fall back (all ranks
        alike)."""
        self.eager.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the gradients
        graph, failure = None, None
        try:
            graph = self.capture(lambda: self._body(meter), self.side_stream, self.noise.generator)
            with self.noise.forked():  # the check below copies the generator a graph now advances
                pass
        except Exception as e:  # noqa: BLE001 - any failure to capture: train on eagerly, saying why
            failure = f"capture failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if self._any_rank(failure is not None, 0.0)[0]:
            with self._on_side_stream():
                self.eager(self.static_pixels, meter)
            return self._fall_back(failure or "capture failed on another rank")
        start = _snapshot(self.eager, meter)
        self.eager.optimizer.zero_grad(set_to_none=True)
        with self._on_side_stream(), self.noise.forked():  # the noise the replay is about to draw
            self.eager(self.static_pixels, meter)
        eager = _snapshot(self.eager, meter)
        _restore(self.eager, meter, start)
        graph.replay()
        difference = _relative_difference(start, eager, _snapshot(self.eager, meter))
        disagrees, worst = self._any_rank(not difference <= self.tolerance, difference)
        self.check = {"max_rel_diff": worst, "tolerance": self.tolerance}
        if disagrees:
            _restore(self.eager, meter, eager)
            self.eager.optimizer.zero_grad(set_to_none=True)
            graph.reset()
            return self._fall_back(f"its first replay differs from the eager step by {worst:.2e} (> {self.tolerance})")
        self.graph = graph
        self.eager.accelerator.print(f"CUDA graph: the first replay matches the eager step (relative difference "
                                     f"{worst:.1e}, tolerance {self.tolerance})")  # fmt: skip

    def _fall_back(self, why: str) -> None:
        self.mode = "EagerStep"
        self.check = {**(self.check or {}), "fallback": why}
        self.eager.accelerator.print(f"CUDA graph: not used, {why}; training on with eager steps "
                                     "(train.cuda_graph=false skips the attempt)")  # fmt: skip

    def _any_rank(self, flag: bool, value: float) -> tuple[bool, float]:
        """Whether `flag` holds on any rank, and the largest `value` (one gather, once per run)."""
        local = torch.tensor([[float(flag), value]], dtype=torch.float64, device=self.eager.accelerator.device)
        gathered = self.eager.accelerator.gather(local).cpu()
        return bool(gathered[:, 0].any()), float(gathered[:, 1].max())


@contextlib.contextmanager
def _ordered(stream: torch.cuda.Stream):
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _state_tensors(eager: EagerStep, meter) -> list[torch.Tensor]:
    """Everything a step changes in place: weights, buffers (BatchNorm's), AdamW's state, the meter's sums."""
    model = eager.accelerator.unwrap_model(eager.model)
    optimizer_state = [t for s in eager.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    sums = [v for v in meter.local().values() if isinstance(v, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *optimizer_state, *sums, meter.step]


def _snapshot(eager: EagerStep, meter) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _state_tensors(eager, meter)]


def _restore(eager: EagerStep, meter, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():  # in place: a graph reads these very tensors
        for live, value in zip(_state_tensors(eager, meter), saved, strict=True):
            live.copy_(value)


def _relative_difference(start: list[torch.Tensor], eager: list[torch.Tensor], graph: list[torch.Tensor]) -> float:
    """How far the graph's step is from the eager one: per floating-point tensor, the norm of their difference
    relative to what the eager step changed in it (or to a millionth of its size, where the step barely moved it);
    the largest of these (NaN where either is not finite)."""
    worst = 0.0
    for s, e, g in zip(start, eager, graph, strict=True):
        if s.is_floating_point():
            s, e, g = s.double(), e.double(), g.double()
            scale = max(float((e - s).norm()), 1e-6 * float(e.norm()), 1e-12)
            worst = max(worst, float((g - e).norm()) / scale, key=lambda x: (x != x, x))  # NaN wins
    return worst


def make_step(setup, model, optimizer, cfg, share: slice, side_stream=None) -> EagerStep | GraphStep:
    """The step this run uses: a CUDA graph where the set-up allows one (`setup.eager_reason` is None;
    `side_stream`: the stream the model was prepared on), else eager. `share`: this rank's rows of a global batch."""
    from cvae_dist.config import NonFinite

    device = setup.accelerator.device
    noise = SampleNoise(cfg.train.seed, cfg.data.batch_size, cfg.model.latent_dim, share, device)
    eager = EagerStep(
        setup.accelerator, model, optimizer, noise, cfg.model.image_size, cfg.train.channels_last,
        cfg.train.on_nonfinite is NonFinite.skip,
    )  # fmt: skip
    batch = share.stop - share.start
    if not setup.graph:
        return eager
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return GraphStep(eager, batch, warmup=11 if ddp else 3, side_stream=side_stream or torch.cuda.Stream(),
                     tolerance=TOLERANCE[setup.precision])  # fmt: skip


def apply_step_mode(
    optimizer: torch.optim.Optimizer, graph: bool, lr: float, device: torch.device, weight_decay: float | None = None
) -> None:
    """Set AdamW for this run's step mode and settings. Call it after any `load_state`, which brings back every
    setting the checkpoint was written with (`capturable`, `lr` and `weight_decay` included, whatever mode wrote it:
    a resume that changes train.lr or train.weight_decay applies them here). A CUDA graph needs
    `capturable` and the lr as a device tensor that every replay reads (a float is baked into the captured kernel:
    change it in place, `group["lr"].fill_(x)`); eager steps are faster with neither."""
    for group in optimizer.param_groups:
        group["capturable"] = graph
        group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if graph else lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad.detach().abs().sum() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack(grads).isfinite().all()) if grads else True
