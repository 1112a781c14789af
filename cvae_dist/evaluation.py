"""Held-out loss and the reconstruction / prior-sample figure: what the trainer reports each epoch and what
`cvae-dist eval` reproduces (one implementation, so their figures agree)."""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator

from cvae_dist.images import recon_sample_grid
from cvae_dist.model import vae_loss

EVAL_BATCH = 128
GRID_IMAGES = 128  # digits in each half of the figure


@torch.no_grad()
def evaluate(model, accelerator: Accelerator, pixels: torch.Tensor, model_input, seed: int) -> dict[str, float]:
    """Held-out loss: each rank a strided share, equal batch counts everywhere, sums reduced over ranks; each digit's
    noise is drawn by its place in `pixels` (seeded), so the figure is the same at any world size. `model_input` turns
    uint8 pixels into the model's input on this rank's device."""
    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    latent_dim = accelerator.unwrap_model(model).config.latent_dim
    noise = torch.randn(len(pixels), latent_dim, generator=torch.Generator().manual_seed(seed))
    mine, my_noise = pixels[rank::world], noise[rank::world]
    n_batches = math.ceil(math.ceil(len(pixels) / world) / EVAL_BATCH)  # same on every rank
    totals = torch.zeros(3, device=accelerator.device)  # reconstruction, KL, images
    for i in range(n_batches):
        rows = slice(i * EVAL_BATCH, (i + 1) * EVAL_BATCH)
        chunk, chunk_noise, weight = mine[rows], my_noise[rows], 1.0
        if len(chunk) == 0:  # keep collective-driven wrappers (ZeRO-3) in step with the other ranks
            chunk, chunk_noise, weight = pixels[:1], noise[:1], 0.0
        x = model_input(chunk)
        with accelerator.autocast():
            out = model(x, chunk_noise.to(x.device))
        parts = vae_loss(out, x)
        n = torch.tensor(float(len(chunk)), device=totals.device)
        totals += weight * torch.stack([parts.reconstruction, parts.kl, n])
    recon, kl, n = accelerator.reduce(totals, "sum").tolist()
    model.train(was_training)
    per_image = (recon + kl) / n
    return {
        "eval/loss_per_image": per_image,
        "eval/loss": per_image * EVAL_BATCH,
        "eval/recon_per_image": recon / n,
        "eval/kl_per_image": kl / n,
    }


@torch.no_grad()
def figure(model, accelerator: Accelerator, pixels, prior, model_input, seed: int):
    """The run's figure (reconstructions of a fixed held-out batch, a blank row, decoded prior draws) and the
    reconstructions themselves."""
    was_training = model.training
    model.eval()
    with fixed_noise(accelerator.device, seed):  # (a prepared model autocasts inside its forward)
        x = model_input(pixels)
        reconstructions = model(x).reconstruction
        samples = model(z=prior.to(x.device))
    model.train(was_training)
    return recon_sample_grid(reconstructions, samples), reconstructions


@contextlib.contextmanager
def fixed_noise(device: torch.device, seed: int):
    """Seeded noise for evaluation that leaves the training RNG streams exactly where they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
