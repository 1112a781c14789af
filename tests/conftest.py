import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the test helpers: the `support` package

# Tests run `log.wandb` as a user does: no WANDB_MODE to override it, and no API key, so `auto` means offline and
# no test reaches a W&B server.
os.environ.pop("WANDB_MODE", None)
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")
# Resident splits are decoded once per machine into this cache: one for the session, not ~/.cache (set here, before
# support.launching copies the environment for the launches; the W&B settings above reach them the same way)
os.environ.setdefault("CVAE_DIST_CACHE", tempfile.mkdtemp(prefix="cvae-dist-cache-"))

# Session fixtures for every test file (imported into several files, each would build its own)
from support.checks import finished  # noqa: E402, F401  (a finished tiny run)
from support.mnist_full import mnist_full  # noqa: E402, F401  (the full MNIST set, converted once)

LAUNCH = Path(__file__).parent / "launch"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts with no Accelerator: accelerate keeps one process-wide state and refuses a second
    Accelerator in another precision (`auto` picks bf16 or fp32 by the CPU, so tests differ in what they build)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pytest_collection_modifyitems(config, items):
    """Everything under tests/launch starts real processes (marked `multiprocess`); tests marked `gpu` need CUDA:
    skipped, saying so, where there is none."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if item.path.is_relative_to(LAUNCH):
            item.add_marker(pytest.mark.multiprocess)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
