"""MNIST as a Hugging Face `datasets` stream: one path for the hub, local parquet and the shipped digits.

shards -> `load_dataset(..., streaming=True)` -> `split_dataset_by_node(rank, world)` -> seeded shuffle
(`set_epoch`) -> fixed-size batches -> batched PNG decode to uint8 -> (on the device) bilinear resize.
Every rank yields the same number of batches per epoch, so no rank waits alone in a collective.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Features, Image, Value
from datasets.distributed import split_dataset_by_node
from PIL import Image as PILImage

SHIPPED_DIR = Path(__file__).parent / "assets" / "mnist5k"
FEATURES = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)]), "id": Value("int64")})


class DataError(ValueError):
    """The data source is missing or not in the accepted layout."""


class Batch(NamedTuple):
    pixels: torch.Tensor  # uint8, (B, 1, 28, 28): resized on the device by `to_model_input`
    labels: torch.Tensor  # int64, (B,)
    ids: torch.Tensor  # int64, (B,): source row ids (-1 where the source has no `id` column)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


def parquet_files(source: str, split: str) -> list[str] | None:
    """The parquet shards of `split` ("a+b" joins splits) under a local source; None for a hub dataset id."""
    root = SHIPPED_DIR if source == "shipped" else Path(source)
    if source != "shipped" and not root.exists():
        if "/" in source and not source.startswith((".", "/")) and len(Path(source).parts) == 2:
            return None  # looks like a hub id: org/name
        raise DataError(
            f"data.source={source!r}: no such directory (accepted: 'shipped', a directory of parquet "
            "shards, or a hub dataset id like 'ylecun/mnist')"
        )
    files = []
    for name in split.split("+"):
        found = sorted(str(p) for p in root.glob(f"{name}-*.parquet")) or sorted(
            str(p) for p in root.glob(f"{name}/*.parquet")
        )
        if not found:
            raise DataError(f"data split {name!r}: no '{name}-*.parquet' files in {root}")
        files += found
    return files


def open_stream(source: str, split: str) -> datasets.IterableDataset:
    """The split as an undecoded `IterableDataset` (image bytes are decoded in batches later)."""
    files = parquet_files(source, split)
    if files is None:
        ds = datasets.load_dataset(source, split=split, streaming=True)
    else:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    missing = {"image", "label"} - set(ds.column_names or [])
    if missing:
        raise DataError(f"{source}:{split} lacks column(s) {sorted(missing)}; expected 'image' (PNG) and 'label'")
    return ds.cast_column("image", Image(decode=False))


def count_rows(ds: datasets.IterableDataset) -> int:
    """Rows in a (possibly rank-split) stream, read as Arrow without decoding images."""
    return sum(len(t) for t in ds.select_columns(["label"]).with_format("arrow").iter(batch_size=8192))


def decode_batch(rows: dict) -> Batch:
    """PNG bytes -> uint8 (B, 1, 28, 28) tensor, labels and ids."""
    images = np.stack([np.asarray(PILImage.open(io.BytesIO(img["bytes"])).convert("L")) for img in rows["image"]])
    labels = torch.as_tensor(rows["label"], dtype=torch.int64)
    ids = torch.as_tensor(rows["id"], dtype=torch.int64) if "id" in rows else torch.full_like(labels, -1)
    return Batch(torch.from_numpy(images).unsqueeze(1), labels, ids)


def to_model_input(pixels: torch.Tensor, image_size: int, channels_last: bool) -> torch.Tensor:
    """uint8 images -> float in [0, 1], bilinearly resized to image_size (runs on the batch's device)."""
    x = pixels.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class RankStream:
    """This rank's shard of a split, reshuffled each epoch, cut into `steps_per_epoch` equal batches.

    `steps_per_epoch` is the same on every rank: the smallest rank's row count // per-rank batch
    (the caller agrees on it across ranks, see `trainer.agree_on_steps`). Rows past it are dropped
    for that epoch; with the shuffle a different tail is dropped each epoch.
    """

    def __init__(
        self,
        source: str,
        split: str,
        rank: int,
        world_size: int,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ):
        ds = open_stream(source, split)
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.local_rows = count_rows(self.dataset)
        if shuffle_buffer > 0:
            # One input shard at a time: interleaving several parquet shards makes datasets sleep 5 s at the
            # end of every pass (its workaround for apache/arrow#45214). Shard order is still shuffled.
            self.dataset = self.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=1)
        self.batches = self.dataset.batch(batch_size, drop_last_batch=True)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.steps_per_epoch = self.local_rows // batch_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Decoded batches of one epoch: a new, reproducible order for each epoch number.

        `skip` batches are passed over first (a resumed epoch continues where its checkpoint was taken)."""
        self.batches.set_epoch(epoch)  # on the batched view: `batch()` does not carry the epoch along
        decoded = _DecodedBatches(self.batches)
        if self.num_workers > 0:  # decode in worker processes; datasets splits the shards among them
            decoded = torch.utils.data.DataLoader(
                decoded,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4,
                pin_memory=torch.cuda.is_available(),
            )
        return itertools.islice(iter(decoded), skip, self.steps_per_epoch)


class _DecodedBatches(torch.utils.data.IterableDataset):
    def __init__(self, batches: datasets.IterableDataset):
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return (decode_batch(rows) for rows in self.batches)


def load_split(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split as uint8 pixels and labels, in file order: for evaluation and image grids."""
    pixels, labels = [], []
    for rows in open_stream(source, split).iter(batch_size=1024):
        b = decode_batch(rows)
        pixels.append(b.pixels)
        labels.append(b.labels)
    if not pixels:
        raise DataError(f"{source}:{split} is empty")
    return torch.cat(pixels), torch.cat(labels)
