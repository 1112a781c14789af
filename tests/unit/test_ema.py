"""The EMA of the weights (ema.py): a lerp in place after each step, checkpointed and resumed."""

import copy
import functools

import torch
from torch.optim.swa_utils import update_bn

from cvae_dist.config import ModelConfig
from cvae_dist.data import to_model_input
from cvae_dist.ema import EMA, RECENT
from cvae_dist.evaluation import fixed_noise
from cvae_dist.model import CVAE

CFG = ModelConfig(latent_dim=2, filters=8, image_size=16)


def trained_a_little(model: CVAE) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.rand(4, 1, 16, 16))  # BatchNorm's statistics (and its count) move too


def test_the_average_starts_at_the_weights_and_moves_one_minus_decay_of_the_way_each_update():
    torch.manual_seed(0)
    live = CVAE(CFG)
    ema = EMA(live, CFG, 0.75, torch.device("cpu"), channels_last=False)
    start = {k: v.clone() for k, v in live.state_dict().items()}
    assert all(torch.equal(ema.model.state_dict()[k], v) for k, v in start.items())
    trained_a_little(live)
    ema.update()
    now, averaged = live.state_dict(), ema.model.state_dict()
    for name, before in start.items():
        if before.is_floating_point():
            assert torch.allclose(averaged[name], 0.75 * before + 0.25 * now[name], atol=1e-6), name
        else:
            assert torch.equal(averaged[name], now[name])  # BatchNorm's count: copied
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


def test_the_average_lives_in_a_checkpoint_and_comes_back(tmp_path):
    torch.manual_seed(0)
    live = CVAE(CFG)
    ema = EMA(live, CFG, 0.5, torch.device("cpu"), channels_last=True)
    trained_a_little(live)
    ema.update()
    ema.save(tmp_path)
    other = EMA(CVAE(CFG), CFG, 0.5, torch.device("cpu"), channels_last=True)
    assert other.load(tmp_path)
    for name, tensor in ema.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[name], tensor), name
    assert not EMA(live, CFG, 0.5, torch.device("cpu"), False).load(tmp_path / "none")  # none there: False


class Wrapped(torch.nn.Module):
    """Names as DDP gives them (`module.`)."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def test_a_wrapped_models_weights_are_read_through_its_wrapper():
    torch.manual_seed(0)
    live = CVAE(CFG)
    ema = EMA(Wrapped(live), CFG, 0.9, torch.device("cpu"), False)
    trained_a_little(live)
    ema.update()
    assert torch.allclose(ema.model.encoder.mu.bias, 0.1 * live.encoder.mu.bias, atol=1e-6)  # (it started at 0)


def test_batchnorm_statistics_are_re_estimated_for_the_averaged_weights_over_the_latest_batches():
    # averaged with the weights, the statistics lag them while they move fast: before the average is evaluated they
    # are those of its own weights over the latest batches (swa_utils.update_bn), once per step
    torch.manual_seed(0)
    live, cpu = CVAE(CFG), torch.device("cpu")
    ema = EMA(live, CFG, 0.5, cpu, channels_last=False)
    batches = [torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8) for _ in range(RECENT + 2)]
    for pixels in batches:
        trained_a_little(live)
        ema.update()
        ema.keep(pixels)
    model_input = functools.partial(to_model_input, image_size=16, channels_last=False)
    expected = copy.deepcopy(ema.model)
    with fixed_noise(cpu, 3):
        update_bn([model_input(p) for p in batches[-RECENT:]], expected)
    averaged = ema.model.encoder.down1.norm.running_mean.clone()
    ema.refresh(model_input, step=10, seed=3)
    assert not torch.equal(ema.model.encoder.down1.norm.running_mean, averaged)
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in ema.model.state_dict().items())
    assert not ema.model.training
    ema.keep(batches[0])
    ema.refresh(model_input, step=10, seed=3)  # the same step: not again
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in ema.model.state_dict().items())
