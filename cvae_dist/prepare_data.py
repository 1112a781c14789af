"""Convert MNIST files (CSV, IDX, or the official IDX split) into parquet shards in the Hugging Face `ylecun/mnist`
layout: `image` (PNG bytes), `label` (`ClassLabel` 0-9) and `id` (the row's index in its source file).

From one file (`write_shards`) the held-out `test` split is a stratified sample drawn with a fixed seed, the rest is
shuffled into equal `train` shards; from the official split (`convert_mnist`) `train` is its 60,000 training digits,
shuffled, and `test` its 10,000 test digits in file order.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
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


def check_magic(path: Path, kind: str) -> None:
    """Refuse an IDX file whose magic number is not that of MNIST `kind` ("images" or "labels")."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = int.from_bytes(f.read(4), "big")
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: not MNIST IDX {kind} ({e})") from None
    if magic != IDX_MAGIC[kind]:
        raise DataFormatError(
            f"{path}: not MNIST IDX {kind} (magic number {magic:#010x}; expected {IDX_MAGIC[kind]:#010x})"
        )


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST IDX image and label files (optionally gzipped), via torchvision's reader."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    def read(path: Path, reader):
        if path.suffix != ".gz":
            return reader(str(path)).numpy()
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(gzip.decompress(path.read_bytes()))
            tmp.flush()
            return reader(tmp.name).numpy()

    check_magic(images, "images")
    check_magic(labels, "labels")
    try:
        x, y = read(images, read_image_file), read(labels, read_label_file)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        raise DataFormatError(f"{images} / {labels}: not MNIST IDX files ({e})") from None
    if len(x) != len(y):
        raise DataFormatError(f"{images}: {len(x):,} images but {labels}: {len(y):,} labels")
    return x, y.astype(np.int64)


def find_mnist_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """The official split's (images, labels) files in `folder`, each plain or `.gz`; all four must be there."""
    expected = ", ".join(n for names in MNIST_FILES.values() for n in names)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such directory; --mnist expects one holding {expected} (.gz or not)")
    found, missing = {}, []
    for split, names in MNIST_FILES.items():
        paths = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
        missing += [n for n, p in zip(names, paths, strict=True) if p is None]
        found[split] = tuple(paths)
    if missing:
        raise DataFormatError(f"{folder}: no {', '.join(missing)}; --mnist expects {expected} (.gz or not)")
    return found


def read_mnist(folder: Path, n_train: int = 60_000, n_test: int = 10_000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official split's (pixels, labels) per split, each checked against its expected number of digits."""
    expected = {"train": n_train, "test": n_test}
    data = {}
    for split, (images, labels) in find_mnist_files(folder).items():
        x, y = read_idx(images, labels)
        if len(x) != expected[split]:
            kind = "training" if split == "train" else "test"
            raise DataFormatError(f"{images}: {len(x):,} images; expected {expected[split]:,} {kind} images")
        data[split] = x, y
    return data


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

    ds = Dataset.from_dict(
        {
            "image": [{"bytes": encode_png(p), "path": None} for p in split.pixels],
            "label": split.labels.tolist(),
            "id": split.ids.tolist(),
        },
        features=FEATURES,
    )
    n = split.shards
    for i in range(n):
        ds.shard(n, i, contiguous=True).to_parquet(str(folder / f"{name}-{i:05d}-of-{n:05d}.parquet"))


def write_splits(out: Path, splits: dict[str, Split]) -> dict[str, int]:
    """Write the non-empty splits into `out` (absent or empty) through a temporary sibling directory that is renamed
    into place at the end, so a failed or interrupted run leaves nothing under `out`. Returns the split sizes."""
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


def write_shards(
    pixels: np.ndarray, labels: np.ndarray, out: Path, shards: int = 8, heldout_per_class: int = 50, seed: int = 0
) -> dict[str, int]:
    """One file's digits -> `shards` shuffled train shards and a stratified `test` split; returns split sizes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_idx = np.concatenate([order[labels[order] == c][:heldout_per_class] for c in range(10)])
    test_idx = test_idx[rng.permutation(len(test_idx))]
    train_idx = np.setdiff1d(order, test_idx, assume_unique=True)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    return write_splits(
        out,
        {
            "train": Split(pixels[train_idx], labels[train_idx], train_idx, shards),
            "test": Split(pixels[test_idx], labels[test_idx], test_idx, 1),
        },
    )


def convert_mnist(
    folder: Path, out: Path, shards: int = 8, seed: int = 0, n_train: int = 60_000, n_test: int = 10_000
) -> dict[str, int]:
    """The official split in `folder` -> the 60,000 training digits shuffled with `seed` into `shards` train shards,
    and the 10,000 test digits in their file order as one `test` shard; returns split sizes."""
    data = read_mnist(folder, n_train, n_test)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    order = np.random.default_rng(seed).permutation(len(y))
    return write_splits(
        out,
        {
            "train": Split(x[order], y[order], order, shards),
            "test": Split(x_test, y_test, np.arange(len(y_test)), 1),
        },
    )
