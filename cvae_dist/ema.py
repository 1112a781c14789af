"""An exponential moving average of the weights, kept on the device and updated in place after every optimizer step
with `torch._foreach_lerp_` (no host sync: a CUDA graph captures it). `swa_utils.AveragedModel` counts its updates
in a tensor it reads on the host (`if n_averaged == 0`), which neither a graph nor a sync-free step can have.
BatchNorm's statistics are averaged too, but while the weights move fast the averaged statistics do not fit the
averaged weights (held-out 93.8 against 81.1 for the live weights, measured: README), so before the average is
evaluated or exported they are re-estimated for its weights over the latest batches (`swa_utils.update_bn`)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim.swa_utils import update_bn

from cvae_dist.config import ModelConfig
from cvae_dist.evaluation import fixed_noise
from cvae_dist.model import CVAE, portable

FILE = "ema.safetensors"  # in a checkpoint
RECENT = 8  # the latest batches BatchNorm's statistics are re-estimated over (this rank's shares of them)


class EMA:
    """`model`: a plain CVAE in eval mode holding the average of `live`'s weights (BatchNorm's statistics too)."""

    def __init__(self, live: torch.nn.Module, cfg: ModelConfig, decay: float, device, channels_last: bool):
        layout = torch.channels_last if channels_last else torch.contiguous_format  # as `live`'s (fast foreach)
        self.model = CVAE(cfg).to(device, memory_format=layout).eval().requires_grad_(False)
        source = OrderedDict(live.state_dict(keep_vars=True))
        for prefix in ("module.", "_orig_mod."):
            consume_prefix_in_state_dict_if_present(source, prefix)
        mine = self.model.state_dict(keep_vars=True)  # (Parameters themselves: an engine may swap their storage)
        pairs = [(mine[name], theirs) for name, theirs in source.items()]
        self.averaged = [mine for mine, _ in pairs if mine.is_floating_point()]
        self.live = [theirs for mine, theirs in pairs if mine.is_floating_point()]
        self.counts = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]
        self.recent, self.refreshed_at = deque(maxlen=RECENT), None
        self.weight = torch.tensor(1.0 - decay, device=device)  # of the live weights; set each step (the schedule's)
        self.start()

    def start(self) -> None:
        """The average starts at the live weights (a run, or a resume that turns the EMA on)."""
        with torch.no_grad():
            for mine, theirs in zip(self.tensors(), self.live + [t for _, t in self.counts], strict=True):
                mine.copy_(theirs)

    @torch.no_grad()
    def update(self) -> None:
        """average <- decay x average + (1 - decay) x live (the decay a tensor: a CUDA graph reads it)."""
        torch._foreach_lerp_(self.averaged, self.live, self.weight)
        for mine, theirs in self.counts:  # BatchNorm's num_batches_tracked
            mine.copy_(theirs)

    def keep(self, pixels: torch.Tensor) -> None:
        """A batch just trained on (uint8, this rank's share), for `refresh`."""
        self.recent.append(pixels.clone())

    def refresh(self, model_input: Callable, step: int, seed: int) -> None:
        """BatchNorm's statistics re-estimated for the averaged weights over the latest batches, once per `step` (every
        rank together: with global BatchNorm they are the global batches', the same at any world size)."""
        if step == self.refreshed_at or not self.recent:
            return
        with fixed_noise(self.model.encoder.mu.weight.device, seed):  # (the training RNG streams stay where they were)
            update_bn([model_input(p) for p in self.recent], self.model)
        self.refreshed_at = step

    def tensors(self) -> list[torch.Tensor]:
        """What `update` changes in place (a graph's first-replay check compares them)."""
        return self.averaged + [mine for mine, _ in self.counts]

    def save(self, checkpoint: Path) -> None:
        save_file(portable(self.model.state_dict()), str(checkpoint / FILE))

    def load(self, checkpoint: Path) -> bool:
        """The average a checkpoint holds (False: it has none; the average starts at the live weights)."""
        if not (checkpoint / FILE).is_file():
            return False
        saved = load_file(checkpoint / FILE)
        with torch.no_grad():
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                tensor.copy_(saved[name])
        return True
