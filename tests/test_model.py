import pytest
import torch

from cvae_dist.config import ModelConfig
from cvae_dist.model import CVAE, VAEOutput, count_parameters, vae_loss


def test_reference_parameter_count():
    assert count_parameters(CVAE(ModelConfig(latent_dim=8, filters=64, image_size=64))) == 149_265


def test_parameter_count_follows_config():
    small = count_parameters(CVAE(ModelConfig(latent_dim=2, filters=32, image_size=32)))
    assert small != 149_265 and small > 0


@pytest.mark.parametrize("size", [28 + 4, 64, 32])  # any multiple of 8 (28 itself is not one)
def test_shapes(size):
    model = CVAE(ModelConfig(image_size=size)).eval()
    x = torch.rand(3, 1, size, size)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.mu.shape == out.log_var.shape == (3, 8)
    assert model(z=torch.randn(5, 8)).shape == (5, 1, size, size)
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1


def test_28px_digits_are_resized_not_fed_raw():
    from cvae_dist.data import to_model_input

    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = to_model_input(pixels, 64, channels_last=True)
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert to_model_input(pixels, 28, channels_last=False).eq(pixels / 255).all()


def test_head_biases_start_at_zero_and_log_var_is_clamped():
    model = CVAE(ModelConfig())
    assert model.encoder.mu.bias.abs().sum() == 0 and model.encoder.log_var.bias.abs().sum() == 0
    with torch.no_grad():
        model.encoder.log_var.bias.fill_(1e4)
    _, log_var = model.encoder(torch.rand(2, 1, 64, 64))
    assert log_var.max() == 10.0


def test_loss_matches_hand_computation():
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    rec = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    mu, log_var = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    parts = vae_loss(VAEOutput(rec, mu, log_var), x)
    sse = 0.25 + 0.25 + 0 + 0.0625
    kl = -0.5 * ((1 + 0 - 1 - 1) + (1 + 1 - 4 - torch.e))
    assert parts.reconstruction.item() == pytest.approx(sse)
    assert parts.kl.item() == pytest.approx(kl)
    assert parts.total.item() == pytest.approx(sse + kl)


def test_loss_sums_over_the_batch():
    model = CVAE(ModelConfig(image_size=32))
    x = torch.rand(4, 1, 32, 32)
    out = model(x)
    whole = vae_loss(out, x).reconstruction
    halves = sum(vae_loss(VAEOutput(*(t[i : i + 2] for t in out)), x[i : i + 2]).reconstruction for i in (0, 2))
    assert whole.item() == pytest.approx(halves.item(), rel=1e-6)
