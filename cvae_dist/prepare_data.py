"""Convert MNIST files (CSV, IDX, or the official IDX split) into parquet shards in the Hugging Face `ylecun/mnist`
layout: `image` (PNG bytes), `label` (`ClassLabel` 0-9) and `id` (the row's index in its source file)."""

from __future__ import annotations

import gzip
import io
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image as PILImage

from cvae_dist.data import FEATURES

IDX_MAGIC = {"images": 0x803, "labels": 0x801}  # unsigned bytes, 3 and 1 dimensions
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataFormatError(ValueError):
    """The input file is not MNIST CSV / IDX as accepted here."""


class Split(NamedTuple):
    """One output split: its digits in output order, their source ids, and how many shards to cut it into."""

    pixels: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int (N,)
    ids: np.ndarray  # int (N,): each row's index in its source file
    shards: int


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CSV with 784 pixel columns and a label column (first or last; a header naming `label` is honoured)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        first = f.readline()
    header = not first.split(",")[0].strip().lstrip("-").isdigit()
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=int(header), ndmin=2)
    if rows.shape[1] != 785:
        raise DataFormatError(f"{path}: {rows.shape[1]} columns per row; expected 785 (784 pixels + label)")
    label_first = header and first.split(",")[0].strip().strip('"').lower() == "label"
    labels, pixels = (rows[:, 0], rows[:, 1:]) if label_first else (rows[:, -1], rows[:, :-1])
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataFormatError(f"{path}: pixel values outside 0..255")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def read_idx_file(path: Path, kind: str) -> np.ndarray:
    """An MNIST IDX file of `kind` ("images" or "labels"), plain or gzipped: its uint8 array."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: not MNIST IDX {kind} ({e})") from None
    magic, want = int.from_bytes(raw[:4], "big"), IDX_MAGIC[kind]
    if magic != want:
        raise DataFormatError(f"{path}: not MNIST IDX {kind} (magic number {magic:#010x}; expected {want:#010x})")
    start = 4 + 4 * raw[3]  # the header: the magic number, then one big-endian int32 per dimension
    shape = [int.from_bytes(raw[i : i + 4], "big") for i in range(4, start, 4)]
    if len(raw) - start != math.prod(shape):
        raise DataFormatError(f"{path}: not MNIST IDX {kind} ({len(raw) - start:,} bytes for a {shape} array)")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST IDX image and label files (optionally gzipped)."""
    x, y = read_idx_file(images, "images"), read_idx_file(labels, "labels")
    if len(x) != len(y):
        raise DataFormatError(f"{images}: {len(x):,} images but {labels}: {len(y):,} labels")
    return x, y.astype(np.int64)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (28, 28) pixels -> PNG bytes."""
    buf = io.BytesIO()
    PILImage.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def check_empty(out: Path) -> None:
    """Refuse an output path that exists and is not an empty directory: nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty directory; choose a new or empty one (nothing is overwritten)")


def write_split(folder: Path, name: str, split: Split) -> None:
    """One split as `split.shards` contiguous, equal-size `{name}-XXXXX-of-NNNNN.parquet` files in `folder`."""
    from datasets import Dataset

    images = [{"bytes": encode_png(p), "path": None} for p in split.pixels]
    ds = Dataset.from_dict({"image": images, "label": split.labels.tolist(), "id": split.ids.tolist()}, FEATURES)
    n = split.shards
    for i in range(n):
        ds.shard(n, i, contiguous=True).to_parquet(str(folder / f"{name}-{i:05d}-of-{n:05d}.parquet"))


def write_splits(out: Path, splits: dict[str, Split]) -> dict[str, int]:
    """The non-empty splits into `out` through a sibling renamed into place: an interrupted run leaves no `out`."""
    check_empty(out)
    for name, split in splits.items():
        if len(split.labels) and (split.labels.min() < 0 or split.labels.max() > 9):
            raise DataFormatError(f"{name}: labels outside 0..9 (found {split.labels.min()}..{split.labels.max()})")
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir()
    try:
        for name, split in splits.items():
            if len(split.labels):
                write_split(partial, name, split)
        check_empty(out)  # nothing appeared there meanwhile
        if out.is_dir():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {name: len(split.labels) for name, split in splits.items() if len(split.labels)}


def write_shards(pixels, labels, out: Path, shards: int = 8, heldout_per_class: int = 50, seed: int = 0) -> dict:
    """One file's digits -> `shards` shuffled train shards and a stratified `test` split; returns split sizes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_idx = np.concatenate([order[labels[order] == c][:heldout_per_class] for c in range(10)])
    test_idx = test_idx[rng.permutation(len(test_idx))]
    train_idx = np.setdiff1d(order, test_idx, assume_unique=True)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    train = Split(pixels[train_idx], labels[train_idx], train_idx, shards)
    return write_splits(out, {"train": train, "test": Split(pixels[test_idx], labels[test_idx], test_idx, 1)})


def convert_mnist(folder: Path, out: Path, shards=8, seed=0, n_train=60_000, n_test=10_000) -> dict[str, int]:
    """The official split in `folder` (its four files, each plain or `.gz`) -> the training digits shuffled with `seed`
    into `shards` train shards, and the test digits in their file order as one `test` shard; returns split sizes."""
    expected = ", ".join(n for names in MNIST_FILES.values() for n in names)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such directory; --mnist expects one holding {expected} (.gz or not)")
    found = {n: next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in expected.split(", ")}
    if missing := [n for n, path in found.items() if path is None]:
        raise DataFormatError(f"{folder}: no {', '.join(missing)}; --mnist expects {expected} (.gz or not)")
    splits = {}
    for split, n, kind in (("train", n_train, "training"), ("test", n_test, "test")):
        images, labels = (found[name] for name in MNIST_FILES[split])
        x, y = read_idx(images, labels)
        if len(x) != n:
            raise DataFormatError(f"{images}: {len(x):,} images; expected {n:,} {kind} images")
        ids = np.random.default_rng(seed).permutation(len(y)) if split == "train" else np.arange(len(y))
        splits[split] = Split(x[ids], y[ids], ids, shards if split == "train" else 1)
    return write_splits(out, splits)
