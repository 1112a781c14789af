"""Image grids as the seed draws them: reconstructions, a blank row, then samples from the prior."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

GRID_COLUMNS = 16


def seed_grid(reconstructions: torch.Tensor, samples: torch.Tensor, columns: int = GRID_COLUMNS) -> torch.Tensor:
    """(1, H, W) image: the reconstruction grid, one blank image-high row, the prior-sample grid."""
    top = make_grid(reconstructions.float().cpu(), nrow=columns, padding=0)
    bottom = make_grid(samples.float().cpu(), nrow=columns, padding=0)
    blank = torch.zeros(top.shape[0], reconstructions.shape[-2], top.shape[-1])
    return torch.cat([top, blank, bottom], dim=1)[:1]


def save_grid(image: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path
