"""MNIST as a Hugging Face `datasets` stream (the hub, local parquet or the shipped digits), dealt to the ranks.

A split whose decoded digits fit `data.resident_mb` is resident: decoded once per machine (then cached), kept on each
rank's device, read in one seeded order per epoch that every world size shares. Larger ones are streamed and decoded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Features, Image, Value
from datasets.distributed import split_dataset_by_node
from PIL import Image as PILImage
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cvae_dist.config import ConfigError
from cvae_dist.files import write_safely

SHIPPED_DIR = Path(__file__).parent / "assets" / "mnist5k"
DIGIT_SIZE = 28
FEATURES = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)]), "id": Value("int64")})
NOT_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}
NOT_FILES |= {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
CACHE_VERSION = 1  # part of the cache key: bump it when the decoded layout changes

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data source is missing or not in the accepted layout."""


class Batch(NamedTuple):
    pixels: torch.Tensor  # uint8, (B, 1, 28, 28), on the device for a resident shard: resized by `to_model_input`
    labels: torch.Tensor  # int64, (B,)
    ids: torch.Tensor  # int64, (B,): source row ids (-1 where the source has no `id` column)


def parquet_files(source: str, split: str) -> list[str] | None:
    """The shards of `split` ("a+b" joins splits), footers checked before anything is written; None for a hub id."""
    root = SHIPPED_DIR if source == "shipped" else Path(source)
    if source != "shipped" and not root.exists():
        if not source.startswith((".", "/")) and len(root.parts) == 2:
            return None  # looks like a hub id: org/name
        raise DataError(
            f"data.source={source!r}: no such directory (accepted: 'shipped', a directory of parquet "
            "shards, or a hub dataset id like 'ylecun/mnist')"
        )
    files = []
    for name in split.split("+"):
        patterns = (f"{name}-*.parquet", f"{name}/*.parquet", f"*/{name}-*.parquet")
        found = next((sorted(map(str, root.glob(p))) for p in patterns if any(root.glob(p))), [])
        if not found:
            raise DataError(f"data split {name!r}: no '{name}-*.parquet' files in {root} (or in a folder below it)")
        files += found
    for file in files:
        if kind := not_a_file(file):
            raise DataError(f"{file} is {kind}; shards are read only from regular parquet files (or links to them)")
        try:
            with pq.ParquetFile(file) as shard:
                problem = shard_problem(shard.schema_arrow, shard.metadata.num_rows)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable parquet file ({error_line(e)}); replace or re-create it") from None
        if problem:
            raise DataError(f"{file}: {problem}; fix or re-create the split (e.g. with `cvae-dist prepare-data`)")
    return files


def not_a_file(path: str) -> str | None:
    """What `path` is when it is not a regular file (opening a FIFO would wait forever for a writer), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"an entry that cannot be opened ({e.strerror})"
    return None if stat.S_ISREG(mode) else NOT_FILES.get(stat.S_IFMT(mode), "a special file")


def shard_problem(schema: pa.Schema, rows: int) -> str | None:
    """What a shard's footer says is wrong with it for training, or None."""
    if rows == 0:
        return "holds no rows"
    if missing := [name for name in ("image", "label") if name not in schema.names]:
        return f"lacks column(s) {missing}; expected 'image' (PNG bytes) and 'label' (integers 0..9)"
    image, label = schema.field("image").type, schema.field("label").type
    if not (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0) and not pa.types.is_binary(image):
        return f"column 'image' is {image}, expected PNG bytes (a struct with 'bytes', as datasets' Image writes)"
    if not pa.types.is_integer(label):
        return f"column 'label' is {label}, expected integers 0..9"
    if "id" in schema.names and not pa.types.is_integer(schema.field("id").type):
        return f"column 'id' is {schema.field('id').type}, expected integers"
    return None


def check_hub(source: str, timeout_s: float = 5.0) -> None:
    """Refuse a read-only datasets cache, and an unreachable hub in seconds (not after minutes of retries)."""
    from huggingface_hub import constants, get_session

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    with suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
    if not os.access(cache, os.W_OK):
        raise DataError(
            f"data.source={source}: datasets' cache {cache} is not writable; set HF_HOME (or HF_DATASETS_CACHE) to a "
            "writable directory, or convert the data with `cvae-dist prepare-data` and set data.source=<that directory>"
        )
    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - any network failure means the same to the user
        raise DataError(
            f"data.source={source}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({type(e).__name__}); "
            "offline, convert MNIST with `cvae-dist prepare-data` and set data.source=<that directory>, or use the "
            "hub's cache with HF_HUB_OFFLINE=1"
        ) from None


@contextmanager
def reading(files: list[str] | None):
    """Turn a shard that breaks while being read (a corrupt page behind a good footer) into one line naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        bad = next((f for f in files or [] if not _reads(f)), "a parquet shard of the source")
        raise DataError(f"{bad}: unreadable ({error_line(e)}); replace or re-create it") from None


def _reads(file: str) -> bool:
    try:
        return pq.read_table(file) is not None
    except (pa.ArrowException, OSError):
        return False


def error_line(e: BaseException) -> str:
    """An exception in one line: its type and its message's first two lines."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:2])}"[:300]


def open_stream(source: str, split: str) -> datasets.IterableDataset:
    """The split as an undecoded `IterableDataset` (image bytes are decoded in batches later)."""
    files = parquet_files(source, split)
    if files is None:
        check_hub(source)
        ds = datasets.load_dataset(source, split=split, streaming=True)
    else:
        # datasets wants a cache folder (for a lock file) even here: a throwaway one, as ~/.cache may be read-only
        with tempfile.TemporaryDirectory(prefix="cvae-dist-datasets-") as scratch:
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True, cache_dir=scratch)
    if missing := {"image", "label"} - set(ds.column_names or []):
        raise DataError(f"{source}:{split} lacks column(s) {sorted(missing)}; expected 'image' (PNG) and 'label'")
    return ds.cast_column("image", Image(decode=False))


def count_rows(ds: datasets.IterableDataset) -> int:
    """Rows in a (possibly rank-split) stream, read as Arrow without decoding images."""
    return sum(len(t) for t in ds.select_columns(["label"]).with_format("arrow").iter(batch_size=8192))


def decode_image(data: bytes) -> np.ndarray | str:
    """PNG bytes -> uint8 (28, 28) pixels, or a description of what is wrong with them."""
    try:
        pixels = np.asarray(PILImage.open(io.BytesIO(data)).convert("L"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"undecodable image ({type(e).__name__})"
    if pixels.shape != (DIGIT_SIZE, DIGIT_SIZE):
        return f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {DIGIT_SIZE}x{DIGIT_SIZE}"
    return pixels


def decode_row(image: dict | None, label) -> np.ndarray | str:
    """One record -> uint8 (28, 28) pixels, or a description of what is wrong with it."""
    data = (image or {}).get("bytes")
    pixels = decode_image(data) if data else "no image bytes"
    if isinstance(pixels, str):
        return pixels
    if label is None:
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        return f"label {label!r} is not an integer"
    return pixels if 0 <= int(label) <= 9 else f"label {label} outside 0..9"


class _Decoded(NamedTuple):
    batch: Batch
    bad: int  # rows left out (on_bad="skip")


def decode_batch(rows: dict, on_bad: str = "error", files: list[str] | None = None) -> _Decoded:
    """PNG bytes -> uint8 (B, 1, 28, 28) pixels, labels, ids; a bad record raises (on_bad="error") or is left out."""
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
    ids = torch.as_tensor([rows["id"][i] if "id" in rows else -1 for i in keep], dtype=torch.int64)
    pixels = np.stack(images) if images else np.empty((0, DIGIT_SIZE, DIGIT_SIZE), np.uint8)
    return _Decoded(Batch(torch.from_numpy(pixels).unsqueeze(1), labels, ids), len(rows["label"]) - len(keep))


def locate(files: list[str] | None, rows: dict, i: int) -> str:
    """'file: row N' of record i of a batch (searched for on this error path only), or its id."""
    record_id = rows["id"][i] if "id" in rows else None
    image_bytes = (rows["image"][i] or {}).get("bytes")
    for file in files or []:
        table = pq.read_table(file, columns=[c for c in ("id", "image") if c in pq.read_schema(file).names])
        if record_id is not None and "id" in table.column_names:
            matches = [n for n, v in enumerate(table.column("id").to_pylist()) if v == record_id]
        else:
            images = table.column("image").to_pylist()
            matches = [n for n, v in enumerate(images) if (v or {}).get("bytes") == image_bytes]
        if matches:
            return f"{file}: row {matches[0]}"
    return f"record id {record_id}" if record_id is not None else "a record (source file unknown)"


def to_model_input(pixels: torch.Tensor, image_size: int, channels_last: bool) -> torch.Tensor:
    """uint8 images -> float in [0, 1], bilinearly resized to image_size (runs on the batch's device)."""
    x = pixels.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_share(batch_size: int, world_size: int, rank: int) -> slice:
    """Rank `rank`'s rows of every global batch, in rank order (128 over 3 ranks: 43, 43, 42), so a digit's place in
    the global batch is the same at any world size."""
    share, extra = divmod(batch_size, world_size)
    if share == 0:
        raise ConfigError(f"data.batch_size={batch_size} is smaller than the world size {world_size}")
    start = rank * share + min(rank, extra)
    return slice(start, start + share + (rank < extra))


def derived_seed(seed: int, epoch: int, purpose: str) -> int:
    """One epoch's seed for `purpose` (order, noise): unrelated across both, the same on every rank and world size."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # (torch seeds are non-negative int64)


class RankStream:
    """This rank's share of every global batch of the training split (`cfg`: the DataConfig), a new order each epoch.

    Resident: epoch e's order is one permutation of the rows seeded by (seed, e), cut into global batches of which
    this rank takes its `batch_share`: any world size trains on the same batches. Streamed: each rank is dealt shards,
    shuffled through a buffer (the order depends on the world size). `decode_first`: a context in which this
    machine's first rank decodes (and caches) before the others.
    """

    def __init__(self, cfg, rank, world_size, seed, num_workers: int = 0, device=None, decode_first=nullcontext):
        self.files = parquet_files(cfg.source, cfg.train_split)
        self.on_bad_record = cfg.on_bad_record.value
        self.share = batch_share(cfg.batch_size, world_size, rank)
        self.global_batch, self.seed, self.num_workers = cfg.batch_size, seed, num_workers
        self.batch_size = self.share.stop - self.share.start  # this rank's
        split = open_stream(cfg.source, cfg.train_split)
        with reading(self.files):
            total = count_rows(split)
        self.resident = 0 < total * DIGIT_SIZE**2 <= cfg.resident_mb * 2**20
        if self.resident:
            with decode_first(), reading(self.files):
                self.table = ResidentTable.load(split, self.on_bad_record, self.files, device, num_workers, total)
            self.bad_rows, self.local_rows = self.table.bad, len(self.table.labels)
            self.local_steps = self.local_rows // self.global_batch
            return
        self.dataset = split_dataset_by_node(split, rank=rank, world_size=world_size)
        shuffled = self.dataset
        if cfg.shuffle_buffer > 0:
            # One input shard at a time: interleaving several parquet shards makes datasets sleep 5 s at the
            # end of every pass (its workaround for apache/arrow#45214). Shard order is still shuffled.
            shuffled = self.dataset.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer, max_buffer_input_shards=1)
        with reading(self.files):  # equal steps must be agreed on the records that will really be used
            rows = count_valid_rows(self.dataset) if self.on_bad_record == "skip" else (count_rows(self.dataset), 0)
        self.local_rows, self.bad_rows = min(rows[0], fewest_rows(self.files, world_size) or rows[0]), rows[1]
        self.batches = shuffled.batch(self.batch_size)  # a last partial batch is dropped after decoding
        self.decode = functools.partial(decode_batch, on_bad=self.on_bad_record, files=self.files)
        self.loader = None
        if num_workers > 0:
            # Workers decode, dealt this rank's shards by datasets; its shared epoch counter lets them persist.
            opts = dict(prefetch_factor=4, persistent_workers=True, pin_memory=torch.cuda.is_available())
            self.loader = DataLoader(self.batches, None, num_workers=num_workers, collate_fn=self.decode, **opts)
        self.local_steps = self.local_rows // self.batch_size

    @property
    def order_depends_on_workers(self) -> bool:
        """Streamed shards are dealt out to the worker processes, so their number shapes the data order."""
        return not self.resident and self.num_workers > 0

    def epoch(self, epoch: int, steps: int, skip: int = 0) -> Iterator[Batch]:
        """Batches `skip` .. `steps` - 1 of epoch `epoch`, in that epoch's reproducible order."""
        if not self.resident:
            return self._streamed(epoch, steps, skip)
        order = self.order(epoch)
        on_device = order.to(self.table.pixels.device)  # once per epoch: a step only slices it (no host copy)
        b, share = self.global_batch, self.share
        rows = (slice(i * b + share.start, i * b + share.stop) for i in range(skip, steps))
        return (self.table.batch(order[r], on_device[r]) for r in rows)

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s global order: every table row once, the same on every rank and at every world size."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, "order"))
        return torch.randperm(len(self.table.labels), generator=generator)

    def _streamed(self, epoch: int, steps: int, skip: int) -> Iterator[Batch]:
        self.batches.set_epoch(epoch)  # on the batched view: `batch()` does not carry the epoch along
        chunks = iter(self.loader) if self.loader is not None else map(self.decode, self.batches)
        with reading(self.files):
            yield from itertools.islice((c.batch for c in full_batches(chunks, self.batch_size)), skip, steps)


def fewest_rows(files: list[str] | None, world_size: int) -> int | None:
    """The fewest rows a rank can be dealt: whole shards if the world divides their count (at worst the smallest),
    else every world-th row. None for a hub dataset."""
    if files is None:
        return None
    sizes = sorted(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(sizes[: len(sizes) // world_size]) if len(sizes) % world_size == 0 else sum(sizes) // world_size


class ResidentTable:
    """The split's decoded digits in file order: uint8 pixels on the device, labels and ids on the host."""

    def __init__(self, t: dict[str, torch.Tensor], device, source: str):
        self.pixels, self.labels, self.ids = t["pixels"].to(device or "cpu"), t["labels"], t["ids"]
        self.bad, self.source = int(t["bad"]), source  # source: "decoded" (and cached, if it could be) or "cache"

    @classmethod
    def load(cls, split, on_bad: str, files: list[str] | None, device, num_workers: int, rows: int) -> ResidentTable:
        """From this machine's cache of the same shards' decode, else decoded now in file order (by worker processes, if
        any: a map-style loader keeps their order) and cached (a hub dataset: decoded every time)."""
        cache = decoded_cache(files, on_bad)
        if cache is not None and cache.is_file():
            t, problem = read_cache(cache, rows)
            if problem is None:
                return cls(t, device, "cache")
            log.warning("%s: %s; decoding the split again and replacing it", cache, problem)
        decode = functools.partial(decode_batch, on_bad=on_bad, files=files)
        decoded = list(DataLoader(list(split.iter(batch_size=1024)), None, num_workers=num_workers, collate_fn=decode))
        parts = [torch.cat(p) for p in zip(*(d.batch for d in decoded), strict=True)] if decoded else None
        if not parts or not len(parts[0]):
            raise DataError(f"{files or 'the training split'}: no usable records")
        t = dict(zip(Batch._fields, parts, strict=True), bad=torch.tensor(sum(d.bad for d in decoded)))
        if cache is not None:
            write_cache(cache, t)
        return cls(t, device, "decoded")

    def batch(self, rows: torch.Tensor, rows_on_device: torch.Tensor) -> Batch:
        """The digits at `rows` (the same rows, already on the table's device, select the pixels there)."""
        return Batch(self.pixels.index_select(0, rows_on_device), self.labels[rows], self.ids[rows])


def decoded_cache(files: list[str] | None, on_bad: str) -> Path | None:
    """This machine's decode of these shards, named by their digest, in $CVAE_DIST_CACHE (None for a hub dataset)."""
    if files is None:
        return None
    h = hashlib.blake2b(f"v{CACHE_VERSION}:{on_bad}".encode(), digest_size=16)
    for file in files:
        with open(file, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    root = Path(os.environ.get("CVAE_DIST_CACHE") or Path.home() / ".cache" / "cvae-dist")
    return root / f"decoded-{h.hexdigest()}.safetensors"


def read_cache(path: Path, rows: int) -> tuple[dict[str, torch.Tensor], str | None]:
    """A cached decode's tensors and what makes them not a decode of a split of `rows` rows (None if nothing)."""
    try:
        with safe_open(str(path), "pt") as f:
            digest = (f.metadata() or {}).get("digest")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError) as e:
        return {}, f"unreadable ({error_line(e)})"
    n = t["labels"].numel() if "labels" in t else 0
    layout = {"pixels": (torch.uint8, (n, 1, DIGIT_SIZE, DIGIT_SIZE)), "labels": (torch.int64, (n,))}
    layout |= {"ids": (torch.int64, (n,)), "bad": (torch.int64, ())}
    if set(t) != set(layout):
        return t, f"holds {sorted(t)}, expected {sorted(layout)}"
    for name, (dtype, shape) in layout.items():
        if t[name].dtype != dtype or tuple(t[name].shape) != shape:
            return t, f"'{name}' is {t[name].dtype} {tuple(t[name].shape)}, expected {dtype} {shape}"
    if n + int(t["bad"]) != rows:
        return t, f"holds {n} digits and {int(t['bad'])} bad records, the split has {rows} rows"
    if digest != content_digest(t):
        return t, "its content does not match its digest" if digest else "it has no content digest"
    return t, None


def write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a decode with a digest of its content; an unwritable cache only costs the next rank time."""
    metadata = {"digest": content_digest(tensors)}
    with suppress(OSError, SafetensorError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safely(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of the tensors' names, layouts and bytes (sha256 of all of MNIST's: about 0.1 s)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy())
    return h.hexdigest()


def count_valid_rows(ds: datasets.IterableDataset) -> tuple[int, int]:
    """(valid, bad) records of a stream: decodes every image once (only with data.on_bad_record=skip)."""
    total = bad = 0
    for rows in ds.iter(batch_size=1024):
        total += len(rows["label"])
        bad += sum(isinstance(decode_row(i, lab), str) for i, lab in zip(rows["image"], rows["label"], strict=True))
    return total - bad, bad


def full_batches(chunks: Iterator[_Decoded], size: int) -> Iterator[_Decoded]:
    """Batches of exactly `size` from chunks of any size: short chunks are joined with the ones after them."""
    pending: list[Batch] = []
    for chunk in chunks:
        if len(chunk.batch.labels) == size and not pending:
            yield chunk
            continue
        pending.append(chunk.batch)
        merged = Batch(*(torch.cat(parts) for parts in zip(*pending, strict=True)))
        while len(merged.labels) >= size:
            yield _Decoded(Batch(*(t[:size] for t in merged)), 0)
            merged = Batch(*(t[size:] for t in merged))
        pending = [merged] if len(merged.labels) else []


def load_split(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split as uint8 pixels and labels, in file order: for evaluation and image grids."""
    files = parquet_files(source, split)
    with reading(files):
        batches = [decode_batch(rows, files=files).batch for rows in open_stream(source, split).iter(batch_size=1024)]
    if not batches:
        raise DataError(f"{source}:{split} is empty")
    return torch.cat([b.pixels for b in batches]), torch.cat([b.labels for b in batches])
