"""The recipe's clocks: a step's learning rate, KL weight and EMA decay, read off the images seen once it is taken
(steps x the global batch). One clock for every rank, so 1, 2 or 3 ranks, and a run resumed on another world size,
follow the same curve; a resume that changes a knob continues on the new curve from where the run is."""

from __future__ import annotations

import math
from typing import NamedTuple

from cvae_dist.config import LRSchedule, TrainConfig

WSD_DECAY = 0.2  # warmup-stable-decay: the share of the images at the end that the decay takes


class Knobs(NamedTuple):
    """What a step is taken with."""

    lr: float
    kl_weight: float
    ema_decay: float = 0.0  # train.ema_decay, warmed up: the average forgets its start as the run goes (0: no EMA)

    def logged(self) -> dict[str, float]:
        return {"train/lr": self.lr, "train/kl_weight": self.kl_weight}


class Schedule:
    """`at(step)`: the knobs of step `step` (1 is the first), for a run of `total_steps` steps of `batch` images."""

    def __init__(self, train: TrainConfig, batch: int, total_steps: int):
        self.train, self.batch, self.total = train, batch, total_steps * batch

    def at(self, step: int) -> Knobs:
        seen, t = step * self.batch, self.train
        kl = min(1.0, seen / t.kl_warmup_images) if t.kl_warmup_images else 1.0
        # (1 + n) / (10 + n) after n updates, as TensorFlow's ExponentialMovingAverage: the initial weights fade fast
        ema = min(t.ema_decay, step / (9 + step)) if t.ema_decay else 0.0
        if seen < t.warmup_images:
            return Knobs(t.lr * seen / t.warmup_images, kl, ema)
        if t.lr_schedule is LRSchedule.constant:
            return Knobs(t.lr, kl, ema)
        return Knobs(t.min_lr + (t.lr - t.min_lr) * self._decay(seen), kl, ema)

    def _decay(self, seen: int) -> float:
        """From 1 (the peak) down to 0 (train.min_lr) at the end of the run."""
        kind, start = self.train.lr_schedule, self.train.warmup_images
        if kind is LRSchedule.wsd:
            start = max(start, self.total * (1 - WSD_DECAY))
        done = min(max((seen - start) / max(self.total - start, 1), 0.0), 1.0)
        if kind is LRSchedule.cosine:
            return 0.5 * (1 + math.cos(math.pi * done))
        if kind is LRSchedule.linear:
            return 1 - done
        return 1 - math.sqrt(done)  # wsd
