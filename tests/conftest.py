import contextlib
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


@pytest.fixture(autouse=True)
def strict_json_files(request):
    """Every JSON file a test's run wrote (metrics.jsonl, status.json, ranks/, checkpoints, the bench's, eval's) is
    strict JSON: no NaN or Infinity, which jq and JSON.parse reject. W&B's own files are W&B's; a file that is not
    JSON at all is one a test damaged on purpose."""
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None  # (kept to the end)
    yield
    if tmp_path is None:
        return
    from support.launching import strict_loads

    for path in tmp_path.rglob("*.json*"):
        if path.suffix in (".json", ".jsonl") and "wandb" not in path.parts and path.is_file():
            text = path.read_text(errors="replace")
            for line in text.splitlines() if path.suffix == ".jsonl" else [text]:
                with contextlib.suppress(ValueError):  # not JSON at all: a file a test broke on purpose
                    strict_loads(line, path)  # (NaN and Infinity raise AssertionError)


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
