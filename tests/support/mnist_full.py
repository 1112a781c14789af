"""The official MNIST split (60,000 train / 10,000 test) converted once per test session: `mnist_full`, a fixture
conftest.py offers every test file (imported into several test files, it would be converted once per file).

`mnist_full` (session-scoped) runs `cvae-dist prepare-data --mnist` on the IDX files in MNIST_IDX (outside the repo,
in the shared data folder; users never have it) and returns the output directory; the command's printed line is kept
beside it, in `CLI_LINE`. Tests that use the fixture skip, naming the folder, where it is absent.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
MNIST_IDX = REPO.parent / "shared" / "data" / "mnist_idx"
CLI_LINE = "prepare-data.txt"  # in the output directory's parent


@pytest.fixture(scope="session")
def mnist_full(tmp_path_factory) -> Path:
    from cvae_dist.cli import main

    if not MNIST_IDX.is_dir():
        pytest.skip(f"no official MNIST IDX files: {MNIST_IDX} is absent")
    out = tmp_path_factory.mktemp("mnist_full") / "parquet"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["prepare-data", "--mnist", str(MNIST_IDX), "--out", str(out)])
    if rc != 0:
        raise RuntimeError(f"prepare-data --mnist {MNIST_IDX} exited {rc}: {stderr.getvalue()}")
    (out.parent / CLI_LINE).write_text(stdout.getvalue())
    return out


TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # official, checked against the files


TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def column(files: list[str], name: str) -> np.ndarray:
    return np.concatenate([pq.read_table(f, columns=[name]).column(name).to_numpy() for f in files])
