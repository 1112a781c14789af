"""Image grids: the run's figure (reconstructions, a blank row, samples from the prior) and the inference layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(1, H, W) grayscale grid, no padding."""
    return make_grid(images.float().cpu(), nrow=columns, padding=0)[:1]


def recon_sample_grid(reconstructions: torch.Tensor, samples: torch.Tensor, columns: int = 16) -> torch.Tensor:
    """(1, H, W) image: the reconstruction grid, one blank image-high row, the prior-sample grid."""
    top, bottom = grid(reconstructions, columns), grid(samples, columns)
    blank = torch.zeros(1, reconstructions.shape[-2], top.shape[-1])
    return torch.cat([top, blank, bottom], dim=1)


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int) -> torch.Tensor:
    """Originals grid | one blank image-wide column | reconstructions grid, in the same places."""
    left, right = grid(originals, columns), grid(reconstructions, columns)
    blank = torch.zeros(1, left.shape[1], originals.shape[-1])
    return torch.cat([left, blank, right], dim=2)


def save_grid(image: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path
