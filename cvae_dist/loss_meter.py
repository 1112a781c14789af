"""The run's loss sums: added on the device every step (no host sync), read once per log interval, resumable."""

from __future__ import annotations

import math

import torch

from cvae_dist.faults import NonFiniteLoss


class LossMeter:
    """This rank's summed losses over the epoch and the interval, its first non-finite step and the steps skipped;
    plus every rank's sums as of the last exchange: what a checkpoint saves and a resumed run starts from."""

    NAMES = ("loss/interval", "loss/epoch", "loss/first_bad", "grad/norm")  # (and loss/skipped, a host count)

    def __init__(self, device: torch.device, rank: int, step: int, state: dict | None = None, world_size: int = 1):
        state = state or {}
        self.epoch_sums, self.interval_sums = list(state.get("epoch_sums", [])), list(state.get("interval_sums", []))
        self.epoch_skipped, self.interval_skipped = state.get("epoch_skipped", 0), state.get("interval_skipped", 0)
        self.interval = torch.tensor(_share(self.interval_sums, rank, world_size), device=device)
        self.epoch = torch.tensor(_share(self.epoch_sums, rank, world_size), device=device)
        self.first_bad = torch.full_like(self.epoch, -1.0)  # -1: none yet
        self.step = torch.full_like(self.epoch, float(step))  # the global step, counted on the device
        self.grad_norm = torch.zeros_like(self.epoch)  # the last step's global gradient norm (before clipping)

    @classmethod
    def from_state(cls, state: dict, device: torch.device, rank: int, step: int, world_size: int) -> LossMeter:
        return cls(device, rank, step, state, world_size)

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in ("epoch_sums", "interval_sums", "epoch_skipped", "interval_skipped")}

    def add(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | float | None = None) -> None:
        """One step's summed loss (None: the step was skipped) and gradient norm (None: unknown), in place: a CUDA
        graph can capture it."""
        self.step.add_(1)
        if isinstance(grad_norm, torch.Tensor):
            self.grad_norm.copy_(grad_norm)
        else:
            self.grad_norm.fill_(math.nan if grad_norm is None else grad_norm)
        if loss is None:
            self.epoch_skipped += 1
            self.interval_skipped += 1
            return
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~loss.isfinite(), self.step, self.first_bad))
        self.epoch.add_(loss)
        self.interval.add_(loss)

    def local(self) -> dict[str, torch.Tensor]:
        sums = dict(zip(self.NAMES, (self.interval, self.epoch, self.first_bad, self.grad_norm), strict=True))
        return sums | {"loss/skipped": float(self.interval_skipped)}  # (the same on every rank: a global verdict)

    def note(self, gathered: dict[str, torch.Tensor]) -> None:
        """Between step lines: every rank's sums as of this exchange, for a checkpoint taken now."""
        self.epoch_sums, self.interval_sums = gathered["loss/epoch"].tolist(), gathered["loss/interval"].tolist()

    def start_interval(self) -> None:
        """A step line's exchange has taken this interval's sums: the next starts from zero (in place)."""
        self.interval.zero_()
        self.interval_skipped = 0

    def end_interval(self, gathered: dict[str, torch.Tensor], step: int, steps: int) -> float:
        """Check every rank's sums are finite; the mean summed loss of the interval's trained steps."""
        check_finite(gathered["loss/interval"], gathered["loss/first_bad"], step - steps + 1, step)
        self.epoch_sums, self.interval_sums = gathered["loss/epoch"].tolist(), []
        return gathered["loss/interval"].sum().item() / max(steps - int(gathered["loss/skipped"].max()), 1)

    def end_epoch(self, gathered: dict[str, torch.Tensor], step: int, steps: int) -> float:
        """At an epoch's end (after its `steps` steps): check, and return the epoch's loss, the mean per-batch summed
        loss of its trained steps. Steps since the last step line carry into the next epoch's first one."""
        check_finite(gathered["loss/epoch"], gathered["loss/first_bad"], step - steps + 1, step)
        loss = gathered["loss/epoch"].sum().item() / max(steps - self.epoch_skipped, 1)
        self.epoch_sums, self.interval_sums, self.epoch_skipped = [], gathered["loss/interval"].tolist(), 0
        self.epoch.zero_()
        self.first_bad.fill_(-1.0)
        return loss


def _share(saved: list[float], rank: int, world_size: int) -> float:
    """This rank's own saved sum at the world size saved (bit for bit as if uninterrupted); else the total on rank 0."""
    if len(saved) == world_size:
        return saved[rank]
    return float(sum(saved)) if rank == 0 else 0.0


def check_finite(per_rank_sums: torch.Tensor, first_bad: torch.Tensor, first_step: int, last_step: int) -> None:
    """Stop on a non-finite loss, naming where it started (it spreads to every rank through the gradients)."""
    bad = [r for r, v in enumerate(per_rank_sums.tolist()) if not math.isfinite(v)]
    if not bad:
        return
    starts = {r: int(s) for r, s in enumerate(first_bad.tolist()) if s >= 0}
    step = min(starts.values(), default=None)
    origin = f"first at step {step} on rank(s) {[r for r, s in starts.items() if s == step]}; " if starts else ""
    where = f"in steps {first_step}-{last_step} ({origin}then on rank(s) {bad})"
    raise NonFiniteLoss(f"non-finite loss {where}; the last checkpoint is kept as it was")
