"""What the data path meets outside the shards' content: a shard that is not a regular file, a read-only home."""

import contextlib
import os
import shutil
import tempfile
import threading

import datasets
import pytest
from support.checks import SHARD, one_line, read_only, run_cli, status, train_argv

from cvae_dist.data import SHIPPED_DIR


@contextlib.contextmanager
def unblocked(fifo, after_s: float = 5.0):
    """After `after_s`, keeps opening `fifo`'s write end (and closing it) for any reader that waits there, so that
    code which opens it fails rather than hangs the tests. Yields a list: one entry for every reader let through."""
    stop, let_through = threading.Event(), []

    def writer():
        stop.wait(after_s)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                let_through.append(1)
            stop.wait(0.1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield let_through
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_named_not_opened(tmp_path, capsys, kind):
    # A FIFO named like a shard once hung the run forever in Arrow's open(), holding the run lock and deaf to
    # SIGTERM and Ctrl-C: only regular files are opened.
    source = tmp_path / "data"
    source.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, source / SHARD)
    shard = source / "train-00000-of-00001.parquet"
    os.mkfifo(shard) if kind == "FIFO" else shard.mkdir()
    with unblocked(shard) as let_through:
        code, err = run_cli(capsys, train_argv(tmp_path, "run", f"data.source={source}", "data.train_split=train"))
    assert not let_through, "the trainer opened the FIFO"
    assert code == 2
    one_line(err, f"cvae-dist train: error: {shard} is a {kind}; shards are read only from regular parquet files")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only_home(tmp_path, monkeypatch):
    """$HOME on a read-only file system (common on clusters), with every cache in its default place there."""
    home = tmp_path / "home"
    home.mkdir()
    with read_only(home):
        monkeypatch.setenv("HOME", str(home))
        for name in ("CVAE_DIST_CACHE", "HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        # datasets reads its cache's place from the environment once, at import: where it would be under this home
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / ".cache" / "huggingface" / "datasets")
        yield home


def test_a_read_only_home_trains_from_local_shards_and_leaves_no_scratch(read_only_home, tmp_path, capsys, monkeypatch):
    # datasets made ~/.cache/huggingface for a stream of local shards, which need no cache: an OSError traceback.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # to see what the run leaves in the temporary folder
    code, err = run_cli(capsys, train_argv(tmp_path / "runs", "run", "train.max_steps=1"))
    assert code == 0, err
    assert status(tmp_path / "runs" / "run")["state"] == "completed"
    assert not list(scratch.iterdir())


def test_a_hub_source_with_an_unwritable_datasets_cache_is_one_line(read_only_home, tmp_path, capsys, monkeypatch):
    # A hub dataset does need datasets' cache: refused in one line, naming the way out, before anything is written.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (no network check: the cache is what is tested)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", "data.source=some/hubid"))
    assert code == 2
    cache = read_only_home / ".cache" / "huggingface" / "datasets"
    one_line(err, f"data.source=some/hubid: datasets' cache {cache} is not writable", "HF_HOME", "prepare-data")
    assert not (tmp_path / "run").exists()
