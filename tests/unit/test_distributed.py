"""The precision rule and the launch configs (distributed.py, launch/*.yaml)."""

import pytest
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
