"""One optimisation step on a batch of decoded digits: eager, or on CUDA the whole step captured once as a CUDA graph
and replayed (the recipe's batch of 128 is launch-bound on a GPU: a replay removes the launch overhead).

Both take the uint8 (B, 1, 28, 28) batch on the device and add the batch's summed loss to the run's `LossMeter` on
the device (no host sync). The reparameterisation noise comes from `SampleNoise`: a digit's draw belongs to its place
in the global batch, not to the rank that computes it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from cvae_dist.data import derived_seed, to_model_input
from cvae_dist.model import vae_loss


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


class EagerStep:
    """resize -> forward (autocast) -> summed loss in fp32 -> backward -> AdamW."""

    def __init__(
        self, accelerator: Accelerator, model, optimizer, noise: SampleNoise, image_size: int, channels_last: bool,
        skip_nonfinite: bool,
    ):  # fmt: skip
        self.accelerator, self.model, self.optimizer, self.noise = accelerator, model, optimizer, noise
        self.image_size, self.channels_last, self.skip_nonfinite = image_size, channels_last, skip_nonfinite

    def __call__(self, pixels: torch.Tensor, timer, meter) -> None:
        loss = self.forward_backward(pixels)
        timer.backward_done()
        # The gradients are already averaged over ranks, so every rank reaches the same verdict (one sync per step,
        # paid only in skip mode).
        skip = self.skip_nonfinite and not _finite_gradients(self.optimizer)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        meter.add(None if skip else loss.detach())  # None: dropped for non-finite gradients

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


class GraphStep:
    """The eager step captured as one CUDA graph (forward, loss, backward with DDP's all-reduce, fused capturable
    AdamW) after `warmup` eager steps on a side stream, then replayed for every step, fed through a static input.

    The warm-up steps are real training steps (capture needs a warm allocator, AdamW's state and, under DDP, its
    rebuilt gradient buckets: PyTorch's CUDA-graph notes ask for 11). The loss meter's update is part of the
    graph too (it works in place on fixed tensors)."""

    def __init__(self, eager: EagerStep, batch: int, warmup: int, side_stream: torch.cuda.Stream):
        self.eager, self.warmup, self.graph, self.noise = eager, warmup, None, eager.noise
        self.static_pixels = torch.zeros(batch, 1, 28, 28, dtype=torch.uint8, device=eager.accelerator.device)
        self.side_stream = side_stream  # DDP was wrapped on it too (PyTorch's notes on capturing DDP's backward)

    def __call__(self, pixels: torch.Tensor, timer, meter) -> None:
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                self.eager(pixels, timer, meter)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return
        self.static_pixels.copy_(pixels, non_blocking=True)
        if self.graph is None:
            self._capture(meter)
        self.graph.replay()

    def close(self) -> None:
        """Let the captured graph go once the GPU is done with it: NCCL's teardown waits for graphs that captured
        its communicator (pytorch/pytorch#115388), so this runs before the process group is destroyed."""
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
            self.graph = None

    def _capture(self, meter) -> None:
        optimizer = self.eager.optimizer
        optimizer.zero_grad(
            set_to_none=True
        )  # backward in the graph allocates the gradients: each replay rewrites them
        self.graph = torch.cuda.CUDAGraph()
        # each replay advances the noise generator, which `start_epoch` may reseed between replays
        self.graph.register_generator_state(self.eager.noise.generator)
        # the warm-up's stream (cuBLAS / cuDNN handles made there); thread_local: a data worker's pinned-memory thread
        # may query events meanwhile
        with torch.cuda.graph(self.graph, stream=self.side_stream, capture_error_mode="thread_local"):
            loss = self.eager.forward_backward(self.static_pixels).detach()
            optimizer.step()
            meter.add(loss)


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
    return GraphStep(eager, batch, warmup=11 if ddp else 3, side_stream=side_stream or torch.cuda.Stream())


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
