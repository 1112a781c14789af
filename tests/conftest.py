import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the test helpers: launch, the offline W&B reader, mnist_full

from mnist_full import mnist_full  # noqa: E402, F401  (one fixture for every test file: converted once per session)

# Tests run `log.wandb` as a user does: no WANDB_MODE to override it, and no API key, so `auto` means offline and
# no test reaches a W&B server.
os.environ.pop("WANDB_MODE", None)
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")


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
    """Tests marked `gpu` need CUDA: skipped, saying so, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
