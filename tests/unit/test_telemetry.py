"""FLOPs, step timers, cross-rank series and stragglers (telemetry.py)."""

from cvae_dist.config import ModelConfig
from cvae_dist.telemetry import count_flops_per_image


def test_flops_per_image_is_counted_and_documented(repo):
    flops = count_flops_per_image(ModelConfig())
    assert flops == 75_497_472  # forward + backward of one 64x64 image, torch.utils.flop_counter
    assert "75,497,472" in (repo / "README.md").read_text()
