import pytest
import torch

from cvae_dist.config import ModelConfig
from cvae_dist.model import CVAE, VAEOutput, count_parameters, vae_loss


def test_reference_parameter_count():
    assert count_parameters(CVAE(ModelConfig(latent_dim=8, filters=64, image_size=64))) == 149_265


def test_parameter_count_follows_config():
    # latent 3, filters F = 16 (F/4 = 4, F/2 = 8), 40 px images: 40 / 8 = 5, so the flattened encoder output and the
    # decoder's first map are F x 5 x 5 = 400. Conv 3x3: c_out * c_in * 9 weights + c_out biases; BatchNorm(c): 2c
    # (weight and bias; its running statistics are buffers); Linear(n, m): n * m + m.
    encoder = [
        4 * 1 * 9 + 4 + 2 * 4,  # down1: conv 1 -> 4 (40) + BN (8) = 48
        8 * 4 * 9 + 8 + 2 * 8,  # down2: conv 4 -> 8 (296) + BN (16) = 312
        16 * 8 * 9 + 16 + 2 * 16,  # down3: conv 8 -> 16 (1,168) + BN (32) = 1,200
        2 * (400 * 3 + 3),  # heads mu and log sigma^2: 2 x Linear(400, 3) = 2,406
    ]
    decoder = [
        3 * 400 + 400,  # Linear(3, 400) = 1,600
        8 * 16 * 9 + 8 + 2 * 8,  # up1: conv 16 -> 8 (1,160) + BN (16) = 1,176
        4 * 8 * 9 + 4 + 2 * 4,  # up2: conv 8 -> 4 (292) + BN (8) = 300
        1 * 4 * 9 + 1,  # out: conv 4 -> 1 = 37
    ]
    assert encoder == [48, 312, 1_200, 2_406] and decoder == [1_600, 1_176, 300, 37]  # the arithmetic above
    model = CVAE(ModelConfig(latent_dim=3, filters=16, image_size=40))
    assert count_parameters(model.encoder) == 3_966  # 48 + 312 + 1,200 + 2,406
    assert count_parameters(model.decoder) == 3_113  # 1,600 + 1,176 + 300 + 37
    assert count_parameters(model) == 7_079


@pytest.mark.parametrize("size", [32, 40, 56, 64])  # any multiple of 8, a power of two or not (28 is not one)
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
