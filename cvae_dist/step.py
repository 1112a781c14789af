"""One optimisation step: eager, or on CUDA the eager step captured once as a CUDA graph and replayed (the recipe's
batch of 128 is launch-bound on a GPU). Both add the batch's summed loss to the run's `LossMeter` on the device (no
host sync); the graph proves on its first replay that it computes what the eager step computes."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import torch

from cvae_dist.config import NonFinite
from cvae_dist.data import derived_seed, to_model_input
from cvae_dist.distributed import is_deepspeed
from cvae_dist.model import vae_loss
from cvae_dist.schedule import Knobs

log = logging.getLogger(__name__)

# How far a graph's first replay may be from the eager step (relative; bf16 and fp16 round the activations).
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}


class SampleNoise:
    """One step's reparameterisation noise by place in the global batch: every rank draws the whole batch's from a
    generator in the same state and keeps its rows, so the noise is the same at any world size. Each epoch reseeds
    it; a resumed epoch skips the draws its steps made (a checkpoint needs no RNG state)."""

    def __init__(self, seed: int, global_batch: int, latent_dim: int, share: slice, device: torch.device):
        self.seed, self.shape, self.share = seed, (global_batch, latent_dim), share
        self.generator = torch.Generator(device).manual_seed(seed)

    def start_epoch(self, epoch: int, steps_done: int = 0) -> None:
        self.generator.manual_seed(derived_seed(self.seed, epoch, "noise"))
        for _ in range(steps_done):
            self.draw()

    def draw(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.generator.device)[self.share]

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
    """resize -> forward (autocast) -> summed loss in fp32 -> backward -> clip -> AdamW -> EMA. The lr and the KL
    weight are set in place before the step (`set`): a CUDA graph reads those very tensors."""

    def __init__(
        self, accelerator, model, optimizer, noise, image_size, channels_last, skip_nonfinite, clip=None, ema=None
    ):
        self.accelerator, self.model, self.optimizer, self.noise, self.ema = accelerator, model, optimizer, noise, ema
        self.image_size, self.channels_last = image_size, channels_last
        self.clip, self.skip_nonfinite = clip or math.inf, skip_nonfinite  # (clip: train.clip_grad_norm)
        self.kl_weight, self.knobs = torch.ones((), device=accelerator.device), None
        self.mode, self.check = "EagerStep", None  # what ran, and a graph's first-replay check (GraphStep's)

    def __call__(self, pixels: torch.Tensor, meter, knobs: Knobs | None = None) -> None:
        self.set(knobs)
        loss = self.forward_backward(pixels)
        norm = self.clip_gradients()
        # the gradients are averaged over ranks: every rank reaches the same verdict (a sync a step, skip mode only)
        skip = self.skip_nonfinite and not _finite_gradients(self.optimizer)
        if not skip:
            self.update()
        self.optimizer.zero_grad(set_to_none=True)
        meter.add(None if skip else loss.detach(), norm)  # None: dropped for non-finite gradients
        self.keep(pixels)

    def set(self, knobs: Knobs | None) -> None:
        """This step's lr, KL weight and EMA decay, where the step reads them (nothing when unchanged)."""
        if knobs is None or knobs == self.knobs:
            return
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(knobs.lr)  # in place: a float would be baked into a captured kernel
            else:
                group["lr"] = knobs.lr
        self.kl_weight.fill_(knobs.kl_weight)
        if self.ema is not None:
            self.ema.weight.fill_(1.0 - knobs.ema_decay)
        self.knobs = knobs

    def close(self) -> None: ...  # nothing to release (GraphStep's holds a CUDA graph)

    def forward_backward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The summed loss (KL weight 1, the seed's figure); the gradient is the weighted objective's."""
        x = to_model_input(pixels, self.image_size, self.channels_last)
        with self.accelerator.autocast():
            out = self.model(x, self.noise.draw())
        parts = vae_loss(out, x)
        # DDP/DeepSpeed average gradients over ranks: times the world size, the gradient of the global batch's sum
        self.accelerator.backward((parts.reconstruction + self.kl_weight * parts.kl) * self.accelerator.num_processes)
        return parts.total

    def clip_gradients(self) -> torch.Tensor | float | None:
        """The global gradient norm (after DDP's all-reduce), clipped to train.clip_grad_norm (a multiply by 1 when
        off); no host sync. Under DeepSpeed its engine clipped inside backward and this reads its norm (or None)."""
        if is_deepspeed(self.accelerator):
            return self.model.get_global_grad_norm()  # (accelerate's would read it on the host: a sync a step)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip)

    def update(self) -> None:
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()

    def keep(self, pixels: torch.Tensor) -> None:
        if self.ema is not None:  # the batches its BatchNorm statistics are re-estimated over
            self.ema.keep(pixels)


def cuda_graph(body: Callable[[], None], stream: torch.cuda.Stream, generator: torch.Generator):
    """`body` captured as one CUDA graph on `stream` (the warm-up's: cuBLAS / cuDNN handles were made there); each
    replay advances `generator`. thread_local: a data worker's pinned-memory thread may query events meanwhile."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        body()
    return graph


class GraphStep:
    """The eager step captured as one CUDA graph after `warmup` real eager steps on a side stream (capture needs a warm
    allocator, AdamW's state and DDP's rebuilt gradient buckets: PyTorch's notes ask for 11), replayed for every step
    through a static input. The first replay is checked against the eager step from the same state and must agree
    within `tolerance`; if capture raises or they disagree on any rank, every rank trains on eagerly, saying why.
    `mode` and `check` say what ran and what was measured; `capture` makes the graph (tests drive it on a CPU)."""

    def __init__(self, eager: EagerStep, batch: int, warmup: int, side_stream, tolerance: float, capture=cuda_graph):
        self.eager, self.warmup, self.graph, self.noise = eager, warmup, None, eager.noise
        self.static_pixels = torch.zeros(batch, 1, 28, 28, dtype=torch.uint8, device=eager.accelerator.device)
        self.side_stream = side_stream  # DDP was wrapped on it too (PyTorch's notes on capturing DDP's backward)
        self.tolerance, self.capture, self.mode, self.check = tolerance, capture, "GraphStep", None

    def __call__(self, pixels: torch.Tensor, meter, knobs: Knobs | None = None) -> None:
        self.eager.set(knobs)  # between replays, never a recapture
        if self.graph is not None:
            self.static_pixels.copy_(pixels, non_blocking=True)
            self.graph.replay()
            self.eager.keep(pixels)
        elif self.warmup > 0 or self.mode != "GraphStep":
            self.warmup -= 1
            with self._on_side_stream():
                self.eager(pixels, meter)
        else:
            self.static_pixels.copy_(pixels, non_blocking=True)
            self._capture_and_check(meter)

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the graph go once the GPU is done with it, before the process group is destroyed (NCCL's teardown waits
        for graphs that captured its communicator: pytorch/pytorch#115388). On every way out, a fault's included: it
        waits at most `timeout_s` and never raises; a graph the GPU is still busy with is left to the process's exit."""
        graph, self.graph = self.graph, None
        if graph is None:
            return
        try:
            done = torch.cuda.Event()
            done.record()
            deadline = time.monotonic() + timeout_s
            while not done.query():
                if time.monotonic() > deadline:
                    left = "the CUDA graph is left to the process's exit"
                    log.warning("the GPU is still busy %.0f s after the last step (a peer gone?): %s", timeout_s, left)
                    return
                time.sleep(0.01)
            graph.reset()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("could not release the CUDA graph (%s: %s)", type(e).__name__, e)

    def _on_side_stream(self):
        """The warm-up's stream, ordered after the work already queued (and the work after it after it)."""
        return contextlib.nullcontext() if self.side_stream is None else _ordered(self.side_stream)

    def _body(self, meter) -> None:
        loss = self.eager.forward_backward(self.static_pixels).detach()
        norm = self.eager.clip_gradients()
        self.eager.update()
        meter.add(loss, norm)

    def _capture_and_check(self, meter) -> None:
        """Capture, replay once against the eager step from the same state, keep the graph or fall back (all ranks)."""
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
        start = self._snapshot(meter)
        self.eager.optimizer.zero_grad(set_to_none=True)
        with self._on_side_stream(), self.noise.forked():  # the noise the replay is about to draw
            self.eager(self.static_pixels, meter)
        eager = self._snapshot(meter)
        self._restore(meter, start)
        graph.replay()
        difference = _relative_difference(start, eager, self._snapshot(meter))
        disagrees, worst = self._any_rank(not difference <= self.tolerance, difference)
        self.check = {"max_rel_diff": worst, "tolerance": self.tolerance}
        if disagrees:
            self._restore(meter, eager)
            self.eager.optimizer.zero_grad(set_to_none=True)
            graph.reset()
            return self._fall_back(f"its first replay differs from the eager step by {worst:.2e} (> {self.tolerance})")
        self.graph = graph
        match = f"the first replay matches the eager step (relative difference {worst:.1e}, tolerance {self.tolerance})"
        self.eager.accelerator.print(f"CUDA graph: {match}")

    def _fall_back(self, why: str) -> None:
        self.mode, self.check = "EagerStep", {**(self.check or {}), "fallback": why}
        skip = "(train.cuda_graph=false skips the attempt)"
        self.eager.accelerator.print(f"CUDA graph: not used, {why}; training on with eager steps {skip}")

    def _state(self, meter) -> list[torch.Tensor]:
        """Everything a step changes in place: weights, buffers (BatchNorm's), AdamW's state, the meter's sums."""
        model, optimizer = self.eager.accelerator.unwrap_model(self.eager.model), self.eager.optimizer
        adamw = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        sums = [v for v in meter.local().values() if isinstance(v, torch.Tensor)]
        ema = self.eager.ema.tensors() if self.eager.ema is not None else []
        return [*model.parameters(), *model.buffers(), *adamw, *sums, meter.step, *ema]

    def _snapshot(self, meter) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._state(meter)]

    def _restore(self, meter, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():  # in place: a graph reads these very tensors
            for live, value in zip(self._state(meter), saved, strict=True):
                live.copy_(value)

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


def _relative_difference(start: list[torch.Tensor], eager: list[torch.Tensor], graph: list[torch.Tensor]) -> float:
    """The largest difference between the graph's and the eager step's tensors, relative to what the eager step changed
    (or to a millionth of the tensor's norm, where it barely moved); NaN where either is not finite."""
    worst = 0.0
    for s, e, g in zip(start, eager, graph, strict=True):
        if s.is_floating_point():
            s, e, g = s.double(), e.double(), g.double()
            scale = max(float((e - s).norm()), 1e-6 * float(e.norm()), 1e-12)
            worst = max(worst, float((g - e).norm()) / scale, key=lambda x: (x != x, x))  # NaN wins
    return worst


def make_step(setup, model, optimizer, cfg, share: slice, side_stream=None, ema=None) -> EagerStep | GraphStep:
    """A CUDA graph where the set-up allows one (`side_stream`: the one the model was prepared on), else eager."""
    noise = SampleNoise(cfg.train.seed, cfg.data.batch_size, cfg.model.latent_dim, share, setup.accelerator.device)
    skip = cfg.train.on_nonfinite is NonFinite.skip
    train = cfg.train
    eager = EagerStep(
        setup.accelerator,
        model,
        optimizer,
        noise,
        cfg.model.image_size,
        train.channels_last,
        skip,
        train.clip_grad_norm,
        ema,
    )
    if not setup.graph:
        return eager
    warmup = 11 if isinstance(model, torch.nn.parallel.DistributedDataParallel) else 3
    stream, tolerance = side_stream or torch.cuda.Stream(), TOLERANCE[setup.precision]
    return GraphStep(eager, share.stop - share.start, warmup, stream, tolerance)


def apply_step_mode(optimizer, graph: bool, lr: float, device: torch.device, weight_decay: float | None = None) -> None:
    """Set AdamW for this run's step mode and settings, after any `load_state`. A CUDA graph needs `capturable` and the
    lr as a device tensor (a float is baked into the captured kernel: `group["lr"].fill_(x)`); eager steps neither."""
    for group in optimizer.param_groups:
        group["capturable"] = graph
        group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if graph else lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad.detach().abs().sum() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack(grads).isfinite().all()) if grads else True
