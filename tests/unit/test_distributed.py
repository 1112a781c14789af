"""The precision rule and the launch configs (distributed.py, launch/*.yaml)."""

import pytest
import torch
from accelerate import Accelerator
from support.launching import REPO

from cvae_dist.config import ConfigError, Precision


def test_fp16_without_a_gpu_is_refused_in_one_line(monkeypatch):
    from cvae_dist.distributed import resolve_precision

    with pytest.raises(ConfigError, match=r"^train.precision=fp16 needs a GPU .*; on a CPU use bf16 or fp32$"):
        resolve_precision(Precision.fp16, "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # the launcher's fp16 under auto: the same refusal
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision(Precision.auto, "cpu")
    assert resolve_precision(Precision.fp16, "cuda") == ("fp16", "train.precision")


@pytest.mark.parametrize(("forced", "want"), [("1", "bf16"), ("0", "fp32")])
def test_auto_can_be_told_what_the_device_has(monkeypatch, forced, want):
    """CVAE_DIST_FAST_BF16 answers `auto`'s question for a test run (CI runs the auto tests both ways)."""
    from cvae_dist.distributed import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("CVAE_DIST_FAST_BF16", forced)
    for device in ("cpu", "cuda"):
        assert resolve_precision(Precision.auto, device)[0] == want
    monkeypatch.setenv("CVAE_DIST_FAST_BF16", "yes")
    with pytest.raises(ConfigError, match=r"^CVAE_DIST_FAST_BF16='yes': accepted 1 \(fast bf16\), 0 \(none\)"):
        resolve_precision(Precision.auto, "cpu")


def test_launch_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in sorted((REPO / "launch").glob("*.yaml"))}
    assert len(configs) >= 6
    assert configs["gpu_compile.yaml"].dynamo_config == {"dynamo_backend": "INDUCTOR"}
    assert configs["deepspeed.yaml"].deepspeed_config["zero_stage"] == 2  # --zero_stage picks another


EXPLICIT = [(p, d) for p in (Precision.fp32, Precision.bf16) for d in ("cpu", "cuda")] + [(Precision.fp16, "cuda")]


def use_launcher(monkeypatch, launcher: str | None) -> None:
    """ACCELERATE_MIXED_PRECISION as `accelerate launch` sets it (None: not launched by it)."""
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)


@pytest.mark.parametrize(("requested", "device"), EXPLICIT, ids=lambda v: getattr(v, "value", v))
def test_an_explicit_precision_wins_over_the_launcher_and_the_device(monkeypatch, requested, device):
    from cvae_dist.distributed import resolve_precision

    for launcher in (None, "no", "bf16", "fp16"):
        for fast in ("1", "0"):
            use_launcher(monkeypatch, launcher)
            monkeypatch.setenv("CVAE_DIST_FAST_BF16", fast)
            assert resolve_precision(requested, device) == (requested.value, "train.precision")


@pytest.mark.parametrize(
    ("launcher", "fast", "device", "want"),
    [
        ("bf16", "0", "cpu", "bf16"),
        ("BF16", "0", "cuda", "bf16"),
        ("fp16", "1", "cuda", "fp16"),  # the launcher's
        ("no", "1", "cpu", "bf16"),
        (None, "1", "cuda", "bf16"),
        ("NO", "0", "cpu", "fp32"),
        (None, "0", "cuda", "fp32"),
    ],
)
def test_auto_takes_the_launchers_precision_else_the_devices_fastest(monkeypatch, launcher, fast, device, want):
    from cvae_dist.distributed import resolve_precision

    use_launcher(monkeypatch, launcher)
    monkeypatch.setenv("CVAE_DIST_FAST_BF16", fast)
    chosen, why = resolve_precision(Precision.auto, device)
    assert chosen == want and why.startswith("auto: ")
    by_launcher = launcher is not None and launcher.lower() != "no"
    assert ("launcher" in why) is by_launcher  # the reason printed says which rule answered


def test_auto_refuses_a_launcher_precision_it_does_not_know(monkeypatch):
    from cvae_dist.distributed import resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match=r"^the launcher's mixed_precision=fp8 is not supported; accepted: no, bf16"):
        resolve_precision(Precision.auto, "cuda")
    assert resolve_precision(Precision.fp32, "cuda")[0] == "fp32"  # an explicit choice does not ask the launcher


@pytest.mark.parametrize(("cores", "local_world", "want"), [(16, None, 16), (16, "3", 5), (4, "8", 1), (2, "1", 2)])
def test_cores_per_rank_is_this_processes_share_of_its_cores(monkeypatch, cores, local_world, want):
    from cvae_dist.distributed import cores_per_rank

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert cores_per_rank() == want


def test_data_workers_keep_an_explicit_zero_and_leave_a_lone_core_to_training(monkeypatch):
    from cvae_dist.distributed import data_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # one core per rank
    assert data_workers(None, torch.device("cuda")) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data_workers(0, torch.device("cuda")) == 0  # configured: none, though 8 cores would allow 4
    assert data_workers(2, torch.device("cpu")) == 2


def test_exchange_returns_every_value_by_name_as_float64_on_the_host():
    from cvae_dist.distributed import exchange

    accelerator = Accelerator(cpu=True)
    loss = (torch.tensor(3.0, requires_grad=True) * 2).reshape(1)  # a device tensor still in a graph
    values = {"host_first": 1.25, "loss": loss, "steps": 35, "flag": torch.tensor(True), "last": 0.5}
    gathered = exchange(accelerator, values)
    assert set(gathered) == set(values)
    expected = {"host_first": 1.25, "loss": 6.0, "steps": 35.0, "flag": 1.0, "last": 0.5}
    for name, value in gathered.items():
        assert value.dtype == torch.float64 and value.device.type == "cpu" and value.shape == (1,)
        assert not value.requires_grad and value.item() == expected[name]


def test_an_exchange_is_enqueued_before_anything_waits_for_the_device_and_read_later(monkeypatch):
    """A rank must not wait for the device before its gather is enqueued: behind a dead peer's captured collective
    that wait has no deadline, while the gather is watched by NCCL's watchdog. `send` enqueues; only `read` waits."""
    from cvae_dist.distributed import send

    accelerator = Accelerator(cpu=True)
    waits = []  # what waited for the device, in order
    gather = accelerator.gather
    monkeypatch.setattr(accelerator, "gather", lambda t: waits.append("gather") or gather(t))
    for name in ("cpu", "item", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: waits.append(_n) or _r(self, *a, **k)
        )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append("synchronize"))
    read = send(accelerator, {"loss/interval": torch.tensor(3.5), "stop": 1.0, "poll/seconds_per_step": 0.25})
    assert waits == ["gather"]
    gathered = read()
    assert waits[0] == "gather" and "cpu" in waits
    assert {k: v.tolist() for k, v in gathered.items()} == {
        "loss/interval": [3.5],
        "stop": [1.0],
        "poll/seconds_per_step": [0.25],
    }


def test_stop_polls_are_spaced_by_the_slowest_ranks_pace_and_never_due_at_once_after_a_send():
    from cvae_dist.faults import StopPoll

    poll = StopPoll(step=10)
    assert poll.due(11)  # the first poll learns the pace
    poll.local(False, 11)
    assert not poll.due(11) and poll.due(12)
    gathered = {"stop": torch.tensor([0.0, 0.0]), "poll/seconds_per_step": torch.tensor([0.01, 0.02])}
    assert poll.polled(gathered) is False  # read at the next exchange: 50 steps a second on the slowest rank
    poll.local(False, 12)
    assert not poll.due(61) and poll.due(62)
    assert poll.polled({**gathered, "stop": torch.tensor([0.0, 1.0])}) is True
