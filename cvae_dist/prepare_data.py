"""Convert MNIST files (CSV or IDX) into parquet shards in the Hugging Face `ylecun/mnist` layout.

Each shard holds `image` (PNG bytes, the `Image` feature), `label` (`ClassLabel` 0-9) and `id` (the
row's index in the source file, so every example can be traced). The held-out `test` split is a
stratified sample (the same number of digits per class), drawn with a fixed seed; the rest is shuffled
with that seed and cut into equal `train` shards.
"""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from cvae_dist.data import FEATURES


class DataFormatError(ValueError):
    """The input file is not MNIST CSV / IDX as accepted here."""


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

    try:
        x, y = read(images, read_image_file), read(labels, read_label_file)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        raise DataFormatError(f"{images} / {labels}: not MNIST IDX files ({e})") from None
    if len(x) != len(y):
        raise DataFormatError(f"{images}: {len(x)} images but {labels}: {len(y)} labels")
    return x, y.astype(np.int64)


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    pixels: np.ndarray, labels: np.ndarray, out: Path, shards: int = 8, heldout_per_class: int = 50, seed: int = 0
) -> dict[str, int]:
    """Write `train-XXXXX-of-NNNNN.parquet` shards and one `test-00000-of-00001.parquet`; returns split sizes."""
    from datasets import Dataset

    if labels.min() < 0 or labels.max() > 9:
        raise DataFormatError(f"labels outside 0..9 (found {labels.min()}..{labels.max()})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_idx = np.concatenate([order[labels[order] == c][:heldout_per_class] for c in range(10)])
    test_idx = test_idx[rng.permutation(len(test_idx))]
    train_idx = np.setdiff1d(order, test_idx, assume_unique=True)
    train_idx = train_idx[rng.permutation(len(train_idx))]

    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.parquet"))
    if existing:
        raise FileExistsError(f"{out} already holds parquet files ({existing[0].name}, ...); choose an empty directory")

    def table(idx: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {
                "image": [{"bytes": encode_png(pixels[i]), "path": None} for i in idx],
                "label": labels[idx].tolist(),
                "id": idx.tolist(),
            },
            features=FEATURES,
        )

    sizes = {}
    for split, idx, n in (("train", train_idx, shards), ("test", test_idx, 1)):
        if len(idx) == 0:
            continue
        ds = table(idx)
        for i in range(n):
            ds.shard(n, i, contiguous=True).to_parquet(str(out / f"{split}-{i:05d}-of-{n:05d}.parquet"))
        sizes[split] = len(idx)
    return sizes
