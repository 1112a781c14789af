"""The run's loss sums: per-step adds on the device, the interval and epoch figures from every rank's sums, the
state a checkpoint keeps, and the non-finite check (loss_meter.py)."""

import json

import pytest
import torch

from cvae_dist.faults import NonFiniteLoss
from cvae_dist.loss_meter import LossMeter, check_finite

CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")


def meters(world: int, step: int = 0) -> list[LossMeter]:
    return [LossMeter(CPU, rank=r, step=step) for r in range(world)]


def gather(ranks: list[LossMeter]) -> dict[str, torch.Tensor]:
    """What `distributed.exchange` hands every rank: each name's values, indexed by rank, as float64."""
    return {name: torch.stack([torch.as_tensor(m.local()[name]) for m in ranks]).double() for name in ranks[0].local()}


def step(ranks: list[LossMeter], losses: list[float] | None) -> None:
    """One step: rank r's summed loss is losses[r]; None: skipped (every rank reaches the same verdict)."""
    for r, meter in enumerate(ranks):
        meter.add(None if losses is None else torch.tensor(losses[r]))


def end_interval(ranks: list[LossMeter], at: int, steps: int) -> float:
    """A step line: its exchange is sent (the meters start a new interval) and then read."""
    gathered = gather(ranks)
    for m in ranks:
        m.start_interval()
    results = {m.end_interval(gathered, at, steps) for m in ranks}
    assert len(results) == 1  # every rank logs the same figure
    return results.pop()


def end_epoch(ranks: list[LossMeter], at: int, steps: int) -> float:
    gathered = gather(ranks)
    results = {m.end_epoch(gathered, at, steps) for m in ranks}
    assert len(results) == 1
    return results.pop()


def test_meter_adds_on_its_device_and_reports_this_ranks_sums():
    meter = LossMeter(CPU, rank=0, step=0)
    for loss in (1.5, 2.0, 4.25):
        meter.add(torch.tensor(loss))
    local = meter.local()
    assert set(local) == {*LossMeter.NAMES, "loss/skipped"} and local["loss/skipped"] == 0
    assert local["loss/interval"].item() == local["loss/epoch"].item() == 1.5 + 2.0 + 4.25
    assert local["loss/first_bad"].item() < 0  # none yet
    on_meta = LossMeter(torch.device("meta"), rank=0, step=0)  # a stand-in for a GPU: the sums stay on the device
    on_meta.add(torch.tensor(1.0, device="meta"))
    assert all(on_meta.local()[name].device.type == "meta" for name in LossMeter.NAMES)


def test_end_interval_is_the_mean_over_trained_steps_of_the_ranks_summed_losses():
    ranks = meters(3)
    losses = [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], None, [5.0, 6.0, 7.0]]  # step 3 skipped
    for x in losses[:2]:
        step(ranks, x)
    assert end_interval(ranks, at=2, steps=2) == pytest.approx((1 + 2 + 3 + 10 + 20 + 30) / 2)
    assert all(m.local()["loss/interval"].item() == 0 for m in ranks)  # a new interval
    for x in losses[2:]:
        step(ranks, x)
    assert end_interval(ranks, at=4, steps=2) == pytest.approx(5 + 6 + 7)  # one trained step
    trained = [x for x in losses if x is not None]
    assert ranks[0].to_state()["epoch_sums"] == [sum(x[r] for x in trained) for r in range(3)]  # for a checkpoint
    for x in ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]):
        step(ranks, x)
    assert end_interval(ranks, at=6, steps=2) == pytest.approx(9 / 2)  # the earlier skip no longer counts


def test_end_epoch_is_the_mean_per_step_and_steps_after_the_last_line_carry_over():
    # 3 steps an epoch, a step line every 2: step 3 ends epoch 1 between lines; it is part of epoch 1's loss and of
    # the interval of the line at step 4.
    ranks = meters(2)
    for x in ([1.0, 2.0], [3.0, 4.0]):
        step(ranks, x)
    end_interval(ranks, at=2, steps=2)
    step(ranks, [5.0, 6.0])
    assert end_epoch(ranks, at=3, steps=3) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 3)
    assert all(m.local()["loss/epoch"].item() == 0 for m in ranks)  # a new epoch
    assert ranks[0].to_state()["interval_sums"] == [5.0, 6.0]  # step 3, for a checkpoint here
    step(ranks, [7.0, 8.0])
    assert end_interval(ranks, at=4, steps=2) == pytest.approx((5 + 6 + 7 + 8) / 2)


def test_end_epoch_leaves_out_the_epochs_skipped_steps():
    ranks = meters(2)
    for x in ([1.0, 2.0], None):
        step(ranks, x)
    end_interval(ranks, at=2, steps=2)  # a step line between the skips: the epoch still counts both
    for x in ([3.0, 4.0], None):
        step(ranks, x)
    assert end_epoch(ranks, at=4, steps=4) == pytest.approx((1 + 2 + 3 + 4) / 2)
    for x in ([1.0, 1.0], [2.0, 2.0]):
        step(ranks, x)
    assert end_epoch(ranks, at=6, steps=2) == pytest.approx(6 / 2)  # the next epoch starts with no skips


# Two epochs of 5 steps, a step line every 3 steps, two ranks; steps 2 and 4 skipped. A checkpoint at the line at
# step 3 holds epoch sums and a skip; one at the end of epoch 1 (step 5) holds the interval's sums (step 5) and a skip
# (step 4).
RUN = [[1.0, 2.0], None, [3.0, 5.0], None, [7.0, 11.0], [13.0, 17.0], [19.0, 23.0], [29.0, 31.0], [37.0, 41.0], [1, 2]]


def train(ranks: list[LossMeter], first: int, last: int) -> list[float]:
    """Steps first..last of RUN with their step lines and epoch ends: the figures logged."""
    logged = []
    for s in range(first, last + 1):
        step(ranks, RUN[s - 1])
        if s % 3 == 0:
            logged.append(end_interval(ranks, s, 3))
        if s % 5 == 0:
            logged.append(end_epoch(ranks, s, 5))  # a resumed epoch counts all its steps (the trainer's batches_done)
    return logged


@pytest.mark.parametrize("stop", [3, 5], ids=["at-a-step-line", "at-an-epoch-end"])
def test_a_meter_resumed_from_its_state_continues_the_sums(stop):
    whole = train(meters(2), 1, len(RUN))
    ranks = meters(2)
    before = train(ranks, 1, stop)
    saved = json.loads(json.dumps(ranks[0].to_state()))  # as the checkpoint's trainer_state.json holds it
    resumed = [LossMeter.from_state(saved, CPU, rank=r, step=stop, world_size=2) for r in range(2)]
    assert [m.local()["loss/epoch"].item() for m in resumed] == [m.local()["loss/epoch"].item() for m in ranks]
    assert before + train(resumed, stop + 1, len(RUN)) == pytest.approx(whole)


@pytest.mark.parametrize("world", [1, 3])
def test_a_meter_resumed_on_another_world_size_continues_the_sums_over_ranks(world):
    ranks = meters(2)
    for x in ([1.0, 2.0], [3.0, 4.0]):
        step(ranks, x)
    end_interval(ranks, 2, 2)
    step(ranks, [5.0, 6.0])  # step 3: in the epoch's sums only once the next exchange sees it
    saved = json.loads(json.dumps(ranks[0].to_state()))
    resumed = [LossMeter.from_state(saved, CPU, rank=r, step=2, world_size=world) for r in range(world)]
    step(resumed, [5.0 + 6.0, *[0.0] * (world - 1)])  # step 3 again, its loss now summed over `world` ranks
    assert end_epoch(resumed, 3, 3) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 3)


def test_first_bad_is_the_global_step_of_the_first_non_finite_loss():
    meter = LossMeter(CPU, rank=0, step=10)  # resumed after step 10
    for loss in (1.0, None, NAN, INF, 2.0):  # steps 11 (fine), 12 (skipped), 13 (NaN), 14 (inf), 15
        meter.add(None if loss is None else torch.tensor(loss))
    assert meter.local()["loss/first_bad"].item() == 13


def test_a_non_finite_interval_stops_naming_its_steps_and_the_rank_it_began_on():
    ranks = meters(3, step=4)
    for x in ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, NAN, 1.0], [INF, NAN, NAN]):  # steps 5..8
        step(ranks, x)
    with pytest.raises(NonFiniteLoss) as err:
        ranks[0].end_interval(gather(ranks), 8, 4)
    message = str(err.value)
    assert "steps 5-8" in message and "first at step 7 on rank(s) [1]" in message and "[0, 1, 2]" in message


def test_the_epochs_check_names_the_epochs_steps_and_every_rank_that_began_at_once():
    ranks = meters(2)
    for x in ([1.0, 1.0], [1.0, 1.0]):
        step(ranks, x)
    end_interval(ranks, 2, 2)
    step(ranks, [NAN, INF])  # both ranks at step 3, the epoch's last
    with pytest.raises(NonFiniteLoss, match=r"steps 1-3 \(first at step 3 on rank\(s\) \[0, 1\]"):
        ranks[0].end_epoch(gather(ranks), 3, 3)


def test_check_finite_passes_finite_sums_and_names_the_bad_ranks_without_a_first_step():
    check_finite(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -1.0]), 1, 10)
    with pytest.raises(NonFiniteLoss) as err:
        check_finite(torch.tensor([1.0, NAN, INF]), torch.tensor([-1.0, -1.0, -1.0]), 11, 20)
    assert "steps 11-20" in str(err.value) and "rank(s) [1, 2]" in str(err.value) and "first at" not in str(err.value)
