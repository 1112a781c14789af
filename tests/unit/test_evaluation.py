"""The held-out loss on one CPU process: seeded, computed in eval mode batch by batch, and harmless to the training
state (evaluation.py)."""

import pytest
import torch
from accelerate import Accelerator

from cvae_dist import evaluation
from cvae_dist.config import ModelConfig
from cvae_dist.data import to_model_input
from cvae_dist.evaluation import evaluate, fixed_noise
from cvae_dist.model import CVAE, vae_loss

SIZE = 16


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    return to_model_input(pixels, SIZE, channels_last=False)


@pytest.fixture
def setup():
    """A one-process Accelerator, a small trained-looking CVAE (BatchNorm statistics moved off their start) and ten
    random digits."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = CVAE(ModelConfig(latent_dim=2, filters=8, image_size=SIZE))
    with torch.no_grad():
        model(torch.rand(16, 1, SIZE, SIZE))  # a training-mode forward: running statistics no longer 0 and 1
    pixels = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    return accelerator, model, pixels


def by_hand(model, pixels, seed: int, batch: int) -> tuple[float, float]:
    """Summed reconstruction and KL of `pixels` in batches of `batch`, in eval mode, each digit's noise the row of its
    place in one seeded draw for all of them."""
    model.eval()
    recon = kl = 0.0
    noise = torch.randn(len(pixels), model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = model_input(pixels[i : i + batch])
            parts = vae_loss(model(x, noise[i : i + batch]), x)
            recon, kl = recon + parts.reconstruction.item(), kl + parts.kl.item()
    return recon, kl


@pytest.mark.parametrize("eval_batch", [128, 4], ids=["one-batch", "three-batches"])
def test_held_out_loss_per_image_is_the_summed_loss_over_the_images(setup, monkeypatch, eval_batch):
    accelerator, model, pixels = setup
    monkeypatch.setattr(evaluation, "EVAL_BATCH", eval_batch)  # 10 digits: 4 + 4 + 2
    figures = evaluate(model, accelerator, pixels, model_input, seed=7)
    recon, kl = by_hand(model, pixels, seed=7, batch=eval_batch)
    n = len(pixels)
    assert figures["eval/recon_per_image"] == pytest.approx(recon / n, rel=1e-5)
    assert figures["eval/kl_per_image"] == pytest.approx(kl / n, rel=1e-5)
    assert figures["eval/loss_per_image"] == pytest.approx((recon + kl) / n, rel=1e-5)


def test_held_out_loss_is_reproducible_for_a_seed_and_its_noise_changes_with_the_seed(setup):
    accelerator, model, pixels = setup
    first = evaluate(model, accelerator, pixels, model_input, seed=0)
    torch.rand(5)  # the training stream moved on meanwhile: the figures must not depend on it
    assert evaluate(model, accelerator, pixels, model_input, seed=0) == first
    other = evaluate(model, accelerator, pixels, model_input, seed=1)
    assert other["eval/recon_per_image"] != first["eval/recon_per_image"]  # another draw of z
    # mu and log sigma^2 are the encoder's, with no noise: the KL is the same
    assert other["eval/kl_per_image"] == pytest.approx(first["eval/kl_per_image"], rel=1e-6)


def test_evaluate_leaves_the_model_training_its_statistics_and_the_rng_as_they_were(setup):
    accelerator, model, pixels = setup
    model.train()
    statistics = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    evaluate(model, accelerator, pixels, model_input, seed=0)
    assert model.training
    assert all(torch.equal(v, statistics[k]) for k, v in model.state_dict().items())  # BatchNorm's too
    assert torch.equal(torch.rand(3), expected_next)  # an exact resume needs the training stream untouched


def test_fixed_noise_is_seeded_and_restores_the_stream():
    torch.manual_seed(5)
    expected_next = torch.rand(4)
    torch.manual_seed(5)
    with fixed_noise(torch.device("cpu"), seed=42):
        inside = torch.randn(6)
    assert torch.equal(inside, torch.randn(6, generator=torch.Generator().manual_seed(42)))
    assert torch.equal(torch.rand(4), expected_next)
