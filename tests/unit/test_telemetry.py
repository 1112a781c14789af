"""FLOPs, step timers, cross-rank series and stragglers (telemetry.py)."""

import math

import pytest
import torch

from cvae_dist import telemetry
from cvae_dist.config import LogConfig, ModelConfig
from cvae_dist.telemetry import (
    RANK_FIELDS,
    NoTimer,
    RankTable,
    StepTimer,
    StragglerDetector,
    _at_most_one,
    count_flops_per_image,
    summarise,
)


def test_flops_per_image_is_counted_and_documented(repo):
    flops = count_flops_per_image(ModelConfig())
    assert flops == 75_497_472  # forward + backward of one 64x64 image, torch.utils.flop_counter
    assert "75,497,472" in (repo / "README.md").read_text()


def gathered_from(per_rank: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """What `exchange` returns for ranks reporting `per_rank[r]`: each name's values by rank, float64."""
    return {name: torch.tensor([r[name] for r in per_rank], dtype=torch.float64) for name in per_rank[0]}


def figures(img: float, busy: float, **rest: float) -> dict[str, float]:
    """One rank's full telemetry (RANK_FIELDS), with the img/s and busy img/s given."""
    values = dict.fromkeys(RANK_FIELDS, 0.0) | {"img_per_s": img, "busy_img_per_s": busy}
    return values | rest


def median(values: list[float]) -> float:
    s, n = sorted(values), len(values)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@pytest.mark.parametrize(
    "busy",
    [[900.0, 600.0], [500.0, 1000.0, 800.0], [1000.0, 1000.0, 400.0]],
    ids=["world2-rank1-slowest", "world3-rank0-slowest", "world3-rank2-slowest"],
)
def test_summarise_names_every_ranks_figures_and_the_slowest_rank(busy):
    world = len(busy)
    ranks = [
        figures(0.9 * b, b, data_wait_frac=0.1 * (r + 1), mfu=0.2 + 0.1 * r, step_time_s=float(r))
        for r, b in enumerate(busy)
    ]
    series = summarise(gathered_from(ranks), step=20, global_batch=96)
    assert series["images_seen"] == 20 * 96
    for r in range(world):
        for name in RANK_FIELDS:
            assert series[f"rank/{r}/{name}"] == pytest.approx(ranks[r][name])
    assert series["throughput/global_img_per_s"] == pytest.approx(sum(0.9 * b for b in busy))
    assert series["throughput/min_rank_busy_img_per_s"] == min(busy)
    assert series["throughput/straggler_ratio"] == pytest.approx(min(busy) / median(busy))
    assert series["throughput/mfu"] == pytest.approx(sum(r["mfu"] for r in ranks) / world)
    assert series["throughput/data_wait_frac"] == pytest.approx(0.1 * world)  # the worst rank's
    named = {f"rank/{r}/{n}" for r in range(world) for n in RANK_FIELDS}
    assert {k for k in series if k.startswith("rank/")} == named


def test_summarise_without_telemetry_has_img_per_s_only():
    series = summarise(gathered_from([{"img_per_s": 100.0}, {"img_per_s": 50.0}]), step=3, global_batch=8)
    assert series == {
        "images_seen": 24,
        "rank/0/img_per_s": 100.0,
        "rank/1/img_per_s": 50.0,
        "throughput/global_img_per_s": 150.0,
    }


def busy_rates(*rates: float) -> dict[str, torch.Tensor]:
    return {"busy_img_per_s": torch.tensor(rates, dtype=torch.float64)}


def test_a_straggler_is_flagged_after_its_patience_once_a_spell_and_alone():
    detector = StragglerDetector(LogConfig(straggler_fraction=0.8, straggler_intervals=3), world_size=3)
    slow = busy_rates(1000.0, 1000.0, 700.0)  # rank 2 at 70% of the median
    nearly = busy_rates(1000.0, 1000.0, 850.0)  # above 80%: not slow
    assert [detector.update(slow) for _ in range(2)] == [[], []]
    assert detector.update(slow) == [2]  # the third interval in a row
    assert [detector.update(slow) for _ in range(3)] == [[], [], []]  # the same spell: not named again
    assert detector.update(nearly) == []  # the spell ends
    assert [detector.update(slow) for _ in range(3)] == [[], [], [2]]  # a new one counts from the start
    assert detector.update({"img_per_s": torch.tensor([1.0, 1.0, 0.1])}) == []  # no busy rates: nothing to judge


def test_straggler_fraction_and_patience_come_from_the_config():
    rates = busy_rates(1000.0, 1000.0, 450.0, 550.0, 1000.0)  # ranks 2 and 3 at 45% and 55% of the median
    strict = StragglerDetector(LogConfig(straggler_fraction=0.5, straggler_intervals=1), world_size=5)
    assert strict.update(rates) == [2]
    lenient = StragglerDetector(LogConfig(straggler_fraction=0.6, straggler_intervals=2), world_size=5)
    assert [lenient.update(rates) for _ in range(2)] == [[], [2, 3]]


def test_straggler_description_names_the_ranks_host_and_machine():
    detector = StragglerDetector(LogConfig(straggler_fraction=0.8, straggler_intervals=3), world_size=3)
    identities = [{"node": f"node{r // 2}", "machine_rank": r // 2} for r in range(3)]
    text = detector.describe([2], step=40, identities=identities)
    assert text.startswith("step 40: rank 2 (node1, machine 1) below 80% of the median") and "3 intervals" in text


class Clock:
    """A stand-in for the `time` module: the test moves the clock."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


def test_rank_table_has_a_row_per_rank_with_its_means():
    identities = [{"node": "gpu-node-with-a-long-name-1"}, {"node": "b"}, {"node": "c"}]
    table = RankTable(identities)
    intervals = [[1000.0, 2000.0, 3000.0], [3000.0, 4000.0, 5000.0]]
    for img in intervals:
        table.add(gathered_from([figures(i, 2 * i, data_wait_frac=0.25, mfu=0.5, peak_mem_mb=1024.0) for i in img]))
    header, *rows = table.render().splitlines()
    assert "rank" in header and "img/s" in header and len(rows) == 3
    for r, row in enumerate(rows):
        mean = (intervals[0][r] + intervals[1][r]) / 2
        assert row.split()[:3] == [str(r), identities[r]["node"][:16], f"{mean:,.0f}"]
        assert f"{2 * mean:,.0f}" in row and "25.0%" in row and "50.00%" in row and "1,024 MB" in row


def test_without_telemetry_a_rank_reports_img_per_s_only(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(telemetry, "time", clock)
    timer = NoTimer(per_rank_batch=32)
    for _ in timer.timed(range(5)):
        clock.now += 0.5
        timer.step_done()
    assert timer.local() == {"img_per_s": 5 * 32 / 2.5}
    clock.now += 1
    assert timer.local() == {"img_per_s": 0.0}  # it restarted


def timed_steps(timer, clock, steps: int = 4, data: float = 0.1, compute: float = 0.3, update: float = 0.1):
    """`steps` steps through `timer`: `data` s waiting for each batch, `compute` s forward + backward, `update` s in
    the optimizer (its step pre-hook marks the end of backward, as for AdamW in a run)."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    timer.instrument(model, optimizer)

    def batches():
        for b in range(steps):
            clock.now += data
            yield b

    for _ in timer.timed(batches()):
        clock.now += compute
        optimizer.step()
        clock.now += update
        timer.step_done()


def test_step_timer_on_cpu_measures_every_phase_of_the_interval(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(telemetry, "time", clock)
    # 4 steps of 0.1 s waiting for data, 0.3 s forward + backward, 0.1 s in the optimizer: 2 s in all
    timer = StepTimer(torch.device("cpu"), per_rank_batch=16, flops_per_image=1e9, peak_flops=128e9)
    timed_steps(timer, clock)
    local = timer.local()
    assert set(local) == set(RANK_FIELDS)
    img_per_s = 4 * 16 / 2.0
    expected = {
        "img_per_s": img_per_s,
        "busy_img_per_s": img_per_s,
        "step_time_s": 0.5,
        "data_wait_frac": 0.2,
        "idle_frac": 0.15,
        "sync_wait_frac": 0.0,
        "fwd_bwd_s": 0.3,
        "optimizer_s": 0.1,
        "mfu": img_per_s * 1e9 / 128e9,
    }
    assert {k: local[k] for k in expected} == pytest.approx(expected)  # (idle: the 3 waits between 4 steps)
    assert local["peak_mem_mb"] > 0  # the process's peak resident set
    clock.now += 1
    assert timer.local()["img_per_s"] == 0  # the meters restarted


def test_time_blocked_in_a_collective_is_timed_around_it_and_null_where_it_cannot_be(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(telemetry, "time", clock)
    measured = StepTimer(torch.device("cpu"), per_rank_batch=16, flops_per_image=1e9, peak_flops=128e9)
    for _ in measured.timed([0]):
        with measured.waiting():  # the global BatchNorm's all-reduce, say: 0.5 s until the peers arrive
            clock.now += 0.5
        clock.now += 1.5
        measured.step_done()
    local = measured.local()
    assert local["sync_wait_frac"] == pytest.approx(0.25) and local["busy_img_per_s"] == pytest.approx(16 / 1.5)
    # a replayed CUDA graph or DeepSpeed: no figure that looks fine, none at all (and MFU stays: it is wall-clock)
    unknown = StepTimer(torch.device("cpu"), 16, 1e9, 128e9, blocked_unknown="a replayed CUDA graph ...")
    for _ in unknown.timed([0]):
        with unknown.waiting():
            clock.now += 0.5
        unknown.step_done()
    local = unknown.local()
    assert math.isnan(local["sync_wait_frac"]) and math.isnan(local["busy_img_per_s"])
    assert local["img_per_s"] > 0 and local["mfu"] > 0


class FakeEvents:
    """CUDA events as the timer uses them: recorded marks at the clock's time, complete when the test says."""

    def __init__(self, clock):
        self.clock, self.made, self.pool = clock, 0, []

    class Mark:
        def __init__(self, t):
            self.t, self.complete = t, False

    cuda = True

    def now(self):
        self.made += 0 if self.pool else 1
        mark = self.pool.pop() if self.pool else self.Mark(0.0)
        mark.t, mark.complete = self.clock.now, False
        return mark

    def done(self, mark) -> bool:
        return mark.complete

    def seconds(self, a, b) -> float:
        assert a.complete and b.complete, "a mark read before the device passed it (that would wait)"
        return b.t - a.t

    def release(self, marks) -> None:
        self.pool.extend(m for m in marks if m is not None)


def test_on_a_gpu_a_step_line_reports_the_newest_interval_the_device_has_passed_and_never_waits(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(telemetry, "time", clock)
    monkeypatch.setattr(telemetry, "_peak_memory_mb", lambda _device: 1.0)
    timer = StepTimer(torch.device("cpu"), per_rank_batch=16, flops_per_image=1e9, peak_flops=128e9)
    events = timer.marks = FakeEvents(clock)
    marks: list = []
    real_now = events.now
    events.now = lambda: marks.append(real_now()) or marks[-1]

    timed_steps(timer, clock, steps=2, compute=0.3, update=0.1)  # interval 1: 2 steps of 0.5 s
    first = timer.local()  # the device is still busy with it: nothing to report, and no wait
    assert all(math.isnan(v) for v in first.values())
    for m in marks:
        m.complete = True  # the previous exchange was read: the device passed interval 1
    marks.clear()
    timed_steps(timer, clock, steps=2, compute=0.6, update=0.2)  # interval 2: slower steps, still on the device
    second = timer.local()
    assert second["fwd_bwd_s"] == pytest.approx(0.3) and second["optimizer_s"] == pytest.approx(0.1)  # interval 1's
    made = events.made
    for m in marks:
        m.complete = True
    marks.clear()
    timed_steps(timer, clock, steps=2)
    assert timer.local()["fwd_bwd_s"] == pytest.approx(0.6)  # interval 2's
    assert events.made == made  # its events came back to the pool: no new ones per step


def test_an_mfu_above_one_is_no_figure():
    assert _at_most_one(0.25) == 0.25 and _at_most_one(1.0) == 1.0
    assert math.isnan(_at_most_one(1.5))


def test_rank_table_leaves_an_unknown_figure_out_of_its_mean_and_prints_n_a_for_none():
    table = RankTable([{"node": "a"}, {"node": "b"}])
    for mfu in ([0.2, math.nan], [math.nan, math.nan], [0.4, math.nan]):
        table.add(gathered_from([figures(1000.0, 1000.0, mfu=m) for m in mfu]))
    _, rank0, rank1 = table.render().splitlines()
    assert "30.00%" in rank0 and "nan" not in rank0  # the mean of 0.2 and 0.4
    assert rank1.split()[5] == "n/a" and "nan" not in rank1


def test_a_cpu_has_no_peak_and_so_no_mfu_unless_one_is_configured():
    peak, source = telemetry.peak_flops(torch.device("cpu"), "fp32", None)
    assert math.isnan(peak) and source.startswith("unknown") and "log.peak_tflops" in source
    assert telemetry.peak_flops(torch.device("cpu"), "bf16", 2.5) == (2.5e12, "configured")
