"""MNIST as a Hugging Face `datasets` stream: one path for the hub, local parquet and the shipped digits.

shards -> `load_dataset(..., streaming=True)` -> `split_dataset_by_node(rank, world)` -> seeded shuffle
(`set_epoch`) -> fixed-size batches -> batched PNG decode to uint8 -> (on the device) bilinear resize.
Every rank yields the same number of batches per epoch, so no rank waits alone in a collective.

Decoding is the pipeline's only real cost (~30 us a digit with PIL, ~6 % of a bf16 CPU step), so decoded digits
are kept by content (`decode_image`): from its second epoch on a rank streams, shuffles and batches as before but
decodes nothing. MNIST's 70,000 digits fit in ~110 MB; past `DECODE_CACHE_SIZE` digits the oldest are dropped.
"""

from __future__ import annotations

import functools
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
DIGIT_SIZE = 28
DECODE_CACHE_SIZE = 131_072  # digits per process (~1.6 kB each with the PNG key): all of MNIST, with room to spare
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


@functools.lru_cache(maxsize=DECODE_CACHE_SIZE)
def decode_image(data: bytes) -> np.ndarray | str:
    """PNG bytes -> read-only uint8 (28, 28) pixels, or a description of what is wrong with them (cached by content)."""
    try:
        pixels = np.asarray(PILImage.open(io.BytesIO(data)).convert("L"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"undecodable image ({type(e).__name__})"
    if pixels.shape != (DIGIT_SIZE, DIGIT_SIZE):
        return f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {DIGIT_SIZE}x{DIGIT_SIZE}"
    pixels.setflags(write=False)  # shared by every later batch that holds this digit
    return pixels


def decode_row(image: dict | None, label) -> np.ndarray | str:
    """One record -> uint8 (28, 28) pixels, or a description of what is wrong with it."""
    data = (image or {}).get("bytes")
    if not data:
        return "no image bytes"
    pixels = decode_image(data)
    if isinstance(pixels, str):
        return pixels
    if label is None:
        return "missing label"
    if not 0 <= int(label) <= 9:
        return f"label {label} outside 0..9"
    return pixels


def decode_batch(rows: dict, on_bad: str = "error", files: list[str] | None = None) -> Batch:
    """PNG bytes -> uint8 (B, 1, 28, 28) tensor, labels and ids. A bad record raises DataError naming its file
    and row (`on_bad="error"`) or is left out of the batch (`"skip"`)."""
    images, keep = [], []
    for i, (image, label) in enumerate(zip(rows["image"], rows["label"], strict=True)):
        pixels = decode_row(image, label)
        if isinstance(pixels, str):
            if on_bad == "error":
                raise DataError(f"{locate(files, rows, i)}: {pixels} (data.on_bad_record=skip drops such records)")
            continue
        images.append(pixels)
        keep.append(i)
    labels = torch.as_tensor([rows["label"][i] for i in keep], dtype=torch.int64)
    ids = (
        torch.as_tensor([rows["id"][i] for i in keep], dtype=torch.int64)
        if "id" in rows
        else torch.full_like(labels, -1)
    )
    empty = torch.empty(0, 1, DIGIT_SIZE, DIGIT_SIZE, dtype=torch.uint8)
    pixels = torch.from_numpy(np.stack(images)).unsqueeze(1) if images else empty
    return Batch(pixels, labels, ids)


def locate(files: list[str] | None, rows: dict, i: int) -> str:
    """'file: row N' of record i of a batch (searched for on this error path only), or its id."""
    import pyarrow.parquet as pq

    record_id = rows["id"][i] if "id" in rows else None
    image_bytes = (rows["image"][i] or {}).get("bytes")
    for file in files or []:
        table = pq.read_table(file, columns=[c for c in ("id", "image") if c in pq.read_schema(file).names])
        if record_id is not None and "id" in table.column_names:
            matches = [n for n, v in enumerate(table.column("id").to_pylist()) if v == record_id]
        else:
            matches = [
                n for n, v in enumerate(table.column("image").to_pylist()) if (v or {}).get("bytes") == image_bytes
            ]
        if matches:
            return f"{file}: row {matches[0]}"
    return f"record id {record_id}" if record_id is not None else "a record (source file unknown)"


def count_valid_rows(ds: datasets.IterableDataset) -> tuple[int, int]:
    """(valid, bad) records of a stream: decodes every image once (only with data.on_bad_record=skip)."""
    valid = bad = 0
    for rows in ds.iter(batch_size=1024):
        for image, label in zip(rows["image"], rows["label"], strict=True):
            ok = not isinstance(decode_row(image, label), str)
            valid, bad = valid + ok, bad + (not ok)
    return valid, bad


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
        on_bad_record: str = "error",
    ):
        ds = open_stream(source, split)
        self.files = parquet_files(source, split)
        self.on_bad_record = on_bad_record
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        if on_bad_record == "skip":  # equal steps must be agreed on the records that will really be used
            self.local_rows, self.bad_rows = count_valid_rows(self.dataset)
        else:
            self.local_rows, self.bad_rows = count_rows(self.dataset), 0
        if shuffle_buffer > 0:
            # One input shard at a time: interleaving several parquet shards makes datasets sleep 5 s at the
            # end of every pass (its workaround for apache/arrow#45214). Shard order is still shuffled.
            self.dataset = self.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=1)
        self.batches = self.dataset.batch(batch_size)  # a last partial batch is dropped after decoding
        self.batch_size = batch_size
        self.steps_per_epoch = self.local_rows // batch_size
        self.num_workers = num_workers
        self.chunks = _DecodedChunks(self.batches, on_bad_record, self.files)
        self.loader = None
        if num_workers > 0:
            # Worker processes decode; datasets gives each some of this rank's shards, and its shared epoch counter
            # reaches them, so they persist across epochs and keep their decode caches.
            self.loader = torch.utils.data.DataLoader(
                self.chunks,
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=4,
                persistent_workers=True,
                pin_memory=torch.cuda.is_available(),
            )

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Decoded batches of one epoch: a new, reproducible order for each epoch number.

        `skip` batches are passed over first (a resumed epoch continues where its checkpoint was taken)."""
        self.batches.set_epoch(epoch)  # on the batched view: `batch()` does not carry the epoch along
        chunks = iter(self.loader if self.loader is not None else self.chunks)
        return itertools.islice(full_batches(chunks, self.batch_size), skip, self.steps_per_epoch)


class _DecodedChunks(torch.utils.data.IterableDataset):
    """Each batch of rows decoded: full-size, or short where bad records were dropped or a worker's shards ran out."""

    def __init__(self, batches: datasets.IterableDataset, on_bad: str, files: list[str] | None):
        self.batches, self.on_bad, self.files = batches, on_bad, files

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.batches:
            yield decode_batch(rows, self.on_bad, self.files)


def full_batches(chunks: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Batches of exactly `size` from chunks of any size: short chunks are joined with the ones after them."""
    pending: list[Batch] = []
    for chunk in chunks:
        if len(chunk.labels) == size and not pending:
            yield chunk
            continue
        pending.append(chunk)
        merged = Batch(*(torch.cat(parts) for parts in zip(*pending, strict=True)))
        while len(merged.labels) >= size:
            yield Batch(*(t[:size] for t in merged))
            merged = Batch(*(t[size:] for t in merged))
        pending = [merged] if len(merged.labels) else []


def load_split(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split as uint8 pixels and labels, in file order: for evaluation and image grids."""
    pixels, labels = [], []
    files = parquet_files(source, split)
    for rows in open_stream(source, split).iter(batch_size=1024):
        b = decode_batch(rows, files=files)
        pixels.append(b.pixels)
        labels.append(b.labels)
    if not pixels:
        raise DataError(f"{source}:{split} is empty")
    return torch.cat(pixels), torch.cat(labels)
