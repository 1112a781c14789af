"""Held-out loss and the reconstruction / prior-sample figure, for the trainer and `cvae-dist eval` alike."""

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
    """Held-out loss: each rank a strided share in equal batch counts, sums reduced; each digit's noise is drawn by its
    place in `pixels`, so the figure is the same at any world size. `model_input`: uint8 pixels -> the model's input."""
    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    latent_dim = accelerator.unwrap_model(model).config.latent_dim
    noise = torch.randn(len(pixels), latent_dim, generator=torch.Generator().manual_seed(seed))
    mine, my_noise = pixels[rank::world], noise[rank::world]
    n_batches = math.ceil(math.ceil(len(pixels) / world) / EVAL_BATCH)  # same on every rank
    totals = torch.zeros(3, device=accelerator.device)  # reconstruction, KL, images
    for i in range(0, n_batches * EVAL_BATCH, EVAL_BATCH):
        chunk, chunk_noise, weight = mine[i : i + EVAL_BATCH], my_noise[i : i + EVAL_BATCH], 1.0
        if len(chunk) == 0:  # keep collective-driven wrappers (ZeRO-3) in step with the other ranks
            chunk, chunk_noise, weight = pixels[:1], noise[:1], 0.0
        x = model_input(chunk)
        with accelerator.autocast():
            out = model(x, chunk_noise.to(x.device))
        parts = vae_loss(out, x)
        totals += weight * torch.stack([parts.reconstruction, parts.kl, totals.new_tensor(float(len(chunk)))])
    recon, kl, n = accelerator.reduce(totals, "sum").tolist()
    model.train(was_training)
    per_image = (recon + kl) / n
    figures = {"eval/loss_per_image": per_image, "eval/loss": per_image * EVAL_BATCH}
    return figures | {"eval/recon_per_image": recon / n, "eval/kl_per_image": kl / n}


@torch.no_grad()
def figure(model, accelerator: Accelerator, pixels, prior, model_input, seed: int):
    """The run's figure (reconstructions of a held-out batch, a blank row, decoded prior draws), reconstructions."""
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
