"""What a user sees, checked in process: the command line's exit code and one-line error, a run directory's
files before and after, read-only directories and full disks, and the lr a run's first step took."""

import contextlib
import gc
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvae_dist import cli
from cvae_dist.checkpoint import checkpoint_dirs
from cvae_dist.config import load_config
from cvae_dist.data import SHIPPED_DIR
from cvae_dist.model import CVAE
from support.launching import DEBUG, lines, strict_loads  # noqa: F401  (lines: for the tests)
from support.wandb_offline import read_run

SMALL = ["train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb=disabled"]


FINISHED = ["train.epochs=2", "checkpoint.every_steps=1", "checkpoint.keep=2"]  # 3 steps an epoch: steps 1..6


SHARD = "test-00000-of-00001.parquet"


def train_argv(out: Path, name: str, *overrides: str) -> list[str]:
    return ["train", "--config", str(DEBUG), f"output_dir={out}", f"run_name={name}", *SMALL, *overrides]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`cvae-dist <argv>` in this process: its exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str, *fragments: str) -> str:
    """The single line on stderr (no traceback), holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` and a digest of each file's bytes (the run lock's note of who held it
    last aside: any launch that takes the lock rewrites it)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if p.name != ".lock"
    }


def leftovers(root: Path) -> list[str]:
    """Half-written files or folders: a partial checkpoint, image or status."""
    return [str(p) for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


def step_losses(run_dir):
    """Every logged step's loss, by step."""
    return {r["step"]: r["train/step_loss"] for r in lines(run_dir) if "train/step_loss" in r}


def epoch_losses(run_dir):
    """Every epoch's loss, by epoch."""
    return {r["epoch"]: r["train/loss"] for r in lines(run_dir) if "train/loss" in r}


def status(run_dir: Path) -> dict:
    return strict_loads((run_dir / "status.json").read_text(), run_dir / "status.json")


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def _sh(*cmd) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    gc.collect()  # a run that failed in this process may still hold a file open there
    if not _sh("umount", path):
        _sh("umount", "-l", path)


@contextlib.contextmanager
def read_only(path: Path):
    """Make the directory `path` unwritable for this user. Root ignores permission bits (os.access says yes after a
    chmod), so as root: a read-only bind mount of it, else `chattr +i`; skipped when neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
    elif _sh("mount", "--bind", path, path):
        try:
            if not _sh("mount", "-o", "remount,ro,bind", path):
                pytest.skip(f"cannot remount {path} read-only (mount -o remount,ro,bind failed)")
            assert not os.access(path, os.W_OK)
            yield
        finally:
            _umount(path)
    elif _sh("chattr", "+i", path):
        try:
            assert not os.access(path, os.W_OK)
            yield
        finally:
            _sh("chattr", "-i", path)
    else:
        pytest.skip(
            "root bypasses permission bits, and neither a read-only bind mount (needs CAP_SYS_ADMIN) nor "
            "chattr +i (needs a filesystem that supports it) works here"
        )


@contextlib.contextmanager
def small_disk(path: Path, kib: int):
    """A tmpfs of `kib` KiB at `path`: a disk that fills up. Needs root (mount); skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed ({result.stderr.strip()}): cannot simulate a full disk")
    try:
        yield path
    finally:
        _umount(path)


def corrupt(file: Path, how: str) -> None:
    """`half`: the file cut to half its size (a copy that stopped early). `overwritten`: 100 bytes in the middle
    overwritten (bad sectors, a bit-flipping transfer); they cover a value's length prefix, as corruption there
    breaks the page for pyarrow rather than one image."""
    data = bytearray(file.read_bytes())
    if how == "half":
        del data[len(data) // 2 :]
    else:
        at = data.find(b"\x89PNG", len(data) // 2) - 4  # the length prefix of a PNG value mid-file
        data[at - 48 : at + 52] = b"\xff" * 100
    file.write_bytes(bytes(data))


def corrupt_source(root: Path, how: str) -> Path:
    """A data source whose training shard (the 500 held-out digits) is corrupt; its test split is intact."""
    root.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, root / SHARD)
    shutil.copy(SHIPPED_DIR / SHARD, root / "train-00000-of-00001.parquet")
    corrupt(root / "train-00000-of-00001.parquet", how)
    return root


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A finished 1-process run of 2 epochs (steps 1..6), checkpointed every step, keeping the newest 2."""
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(train_argv(out, "run", *FINISHED)) == 0
    return out / "run"


def copy_of(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run_dir, tmp_path / name, symlinks=True)
    return tmp_path / name


LR = 1e-3  # the recipe's
# One epoch on the 500 held-out digits: 3 steps of 128; ONE_STEP stops after the first, so the export in model/ is
# then the weights after exactly one AdamW update.
TINY = ["data.train_split=test", "train.epochs=1", "log.every_steps=1", "train.precision=fp32"]
ONE_STEP = [*TINY, "train.max_steps=1"]


def first_update(run_dir) -> torch.Tensor:
    """|w after step 1 - w at start| of every trainable parameter element. The start is what the trainer builds,
    CVAE(model config) right after seeding with train.seed: the same on every rank, so it can be rebuilt here."""
    cfg = load_config(run_dir / "config.yaml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        start = CVAE(cfg.model)
    after = load_file(str(run_dir / "model" / "model.safetensors"))
    return torch.cat([(after[name] - p.detach()).abs().flatten() for name, p in start.named_parameters()])


def optimizer_lr(run_dir) -> float:
    """The lr in the optimizer state of the run's last checkpoint (accelerate's optimizer.bin)."""
    state = torch.load(checkpoint_dirs(run_dir)[-1] / "optimizer.bin", weights_only=True)
    return state["param_groups"][0]["lr"]


def check_lr(run_dir, world_size: int, want: float) -> None:
    """The run's world size and lr as it logged them (W&B config), the lr in its optimizer state, and the one its
    first step took."""
    config = read_run(run_dir).config
    assert config["world_size"] == world_size and config["train"]["lr"] == pytest.approx(want, rel=1e-12)
    assert optimizer_lr(run_dir) == pytest.approx(want, rel=1e-12)
    # AdamW's first update is lr * g / (|g| + eps) (bias-corrected moments of a single gradient): lr per element
    # wherever |g| >> eps, plus a weight decay of lr * 1e-5 * w.
    update = first_update(run_dir)
    assert update.median().item() == pytest.approx(want, rel=0.01)
    assert update.max().item() < want * 1.01
