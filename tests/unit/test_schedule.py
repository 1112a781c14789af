"""The recipe's clocks (schedule.py): a step's lr and KL weight as functions of the images seen."""

import math

import pytest

from cvae_dist.config import ConfigError, LRSchedule, TrainConfig, load_config
from cvae_dist.schedule import Knobs, Schedule

BATCH, STEPS = 128, 100  # a run of 12,800 images


def lrs(steps: int = STEPS, batch: int = BATCH, **train) -> list[float]:
    schedule = Schedule(TrainConfig(**train), batch, steps)
    return [schedule.at(s).lr for s in range(1, steps + 1)]


def test_the_default_is_the_seeds_recipe_a_constant_lr_and_kl_weight_1():
    schedule = Schedule(TrainConfig(), BATCH, STEPS)
    assert {schedule.at(s) for s in range(1, STEPS + 1)} == {Knobs(1e-3, 1.0)}  # exactly: the same bits as before


def test_a_warmup_rises_linearly_to_the_peak_from_the_first_step_on():
    lr = lrs(warmup_images=10 * BATCH)  # 10 steps
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4)  # the first step is not wasted at lr 0
    assert lr[9:] == [1e-3] * (STEPS - 9)


@pytest.mark.parametrize(
    ("kind", "middle"),
    [(LRSchedule.cosine, 0.5), (LRSchedule.linear, 0.5), (LRSchedule.wsd, 1.0)],
)
def test_decays_end_at_min_lr_on_the_last_step(kind, middle):
    lr = lrs(lr_schedule=kind, min_lr=1e-5, warmup_images=0)
    assert lr[-1] == pytest.approx(1e-5) and max(lr) <= 1e-3
    assert lr[STEPS // 2 - 1] == pytest.approx(1e-5 + (1e-3 - 1e-5) * middle)
    assert all(a >= b for a, b in zip(lr, lr[1:], strict=False))  # never rises after the warm-up


def test_wsd_holds_the_peak_until_the_last_fifth_then_decays_as_one_minus_sqrt():
    lr = lrs(lr_schedule=LRSchedule.wsd, warmup_images=5 * BATCH)
    assert lr[4:80] == [1e-3] * 76 and lr[79] == 1e-3 and lr[80] < 1e-3
    assert lr[89] == pytest.approx(1e-3 * (1 - math.sqrt(0.5)))  # half of the decay's images: 1 - sqrt(1/2)


def test_the_clock_is_images_seen_not_steps():
    # half the batch, twice the steps: the same images at every point, the same curve (1, 2, 3 ranks share the
    # global batch already; this is what makes a recipe portable across batch sizes too)
    big = lrs(lr_schedule=LRSchedule.cosine, warmup_images=1000, min_lr=1e-5)
    small = lrs(steps=2 * STEPS, batch=BATCH // 2, lr_schedule=LRSchedule.cosine, warmup_images=1000, min_lr=1e-5)
    assert small[1::2] == pytest.approx(big, rel=1e-12)


def test_the_kl_weight_rises_from_0_to_1_over_its_images():
    schedule = Schedule(TrainConfig(kl_warmup_images=4 * BATCH), BATCH, STEPS)
    assert [schedule.at(s).kl_weight for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert schedule.at(3).logged() == {"train/lr": 1e-3, "train/kl_weight": 0.75}


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("train.min_lr=0.01", "train.min_lr=0.01: must be at most train.lr=0.001"),
        ("train.ema_decay=1", "train.ema_decay=1.0: must be above 0 and below 1"),
        ("train.clip_grad_norm=0", "train.clip_grad_norm=0.0: must be a finite number above 0"),
        ("train.warmup_images=-1", "train.warmup_images=-1: must be 0 or more images"),
        ("train.kl_warmup_images=-5", "train.kl_warmup_images=-5: must be 0 or more images"),
        ("train.early_stop_epochs=0", "train.early_stop_epochs=0: must be a positive number of epochs"),
        ("train.lr_schedule=step", "train.lr_schedule"),
    ],
)
def test_a_wrong_knob_is_one_line_naming_what_is_accepted(override, said):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert said in str(e.value) and "\n" not in str(e.value)


def test_the_ema_decay_warms_up_so_the_initial_weights_fade():
    schedule = Schedule(TrainConfig(ema_decay=0.99), BATCH, 1000)
    decays = [schedule.at(s).ema_decay for s in range(1, 1001)]
    assert decays[0] == pytest.approx(0.1) and decays[9] == pytest.approx(10 / 19)  # (1 + n) / (10 + n), n updates
    assert decays[890] == decays[-1] == 0.99 and decays[889] < 0.99  # the decay itself from the 891st step on
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False))
    assert Schedule(TrainConfig(), BATCH, STEPS).at(5).ema_decay == 0.0  # no EMA
