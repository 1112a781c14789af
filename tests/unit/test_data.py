"""The data pipeline in process: splits, streams, resident tables, shards, workers (data.py)."""

import collections
import io
import itertools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file

from cvae_dist.config import ConfigError, DataConfig
from cvae_dist.data import (
    Batch,
    DataError,
    RankStream,
    _Decoded,
    batch_share,
    decode_batch,
    fewest_rows,
    full_batches,
    load_split,
    open_stream,
    to_model_input,
)


def test_shipped_splits_are_disjoint_and_stratified():
    train_ids = {i for rows in open_stream("shipped", "train").iter(1000) for i in rows["id"]}
    test_pixels, test_labels = load_split("shipped", "test")
    test_ids = {i for rows in open_stream("shipped", "test").iter(1000) for i in rows["id"]}
    assert len(train_ids) == 4500 and len(test_ids) == 500 and not train_ids & test_ids
    assert test_labels.bincount().tolist() == [50] * 10
    assert test_pixels.dtype == torch.uint8 and test_pixels.shape == (500, 1, 28, 28)


def stream(resident: bool = True, workers: int = 0, rank: int = 0, world: int = 1, **data) -> RankStream:
    cfg = DataConfig(resident_mb=DataConfig.resident_mb if resident else 0, **data)
    return RankStream(cfg, rank=rank, world_size=world, seed=0, num_workers=workers)


def epoch_ids(s: RankStream, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    return [b.ids for b in s.epoch(epoch, s.local_steps, skip)]


@pytest.mark.parametrize("resident", [True, False])
def test_stream_count_dtype_range_and_reshuffle(resident):
    s = stream(resident)
    assert s.resident is resident
    assert s.local_rows == 4500 and s.local_steps == 35  # last partial batch dropped
    epoch1 = list(s.epoch(1, s.local_steps))
    assert len(epoch1) == 35
    b = epoch1[0]
    assert b.pixels.dtype == torch.uint8 and b.pixels.shape == (128, 1, 28, 28)
    assert int(b.pixels.min()) >= 0 and int(b.pixels.max()) == 255 and b.labels.max() <= 9
    ids1 = torch.cat([b.ids for b in epoch1])
    assert len(set(ids1.tolist())) == 35 * 128
    ids2 = torch.cat(epoch_ids(s, 2))
    assert not torch.equal(ids1, ids2)  # a new order each epoch
    assert torch.equal(ids1, torch.cat(epoch_ids(s, 1)))  # and a reproducible one
    assert [len(b) for b in epoch_ids(s, 2, skip=30)] == [128] * 5  # a resumed epoch continues where it was


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resident_split_is_decoded_once_per_machine_in_file_order(monkeypatch, tmp_path, workers):
    from cvae_dist import data

    monkeypatch.setenv("CVAE_DIST_CACHE", str(tmp_path / "cache"))
    decoded = []
    monkeypatch.setattr(data, "decode_image", lambda b, _real=data.decode_image: decoded.append(1) or _real(b))
    resident = stream(workers=workers)
    assert len(decoded) == (4500 if workers == 0 else 0)  # the whole split, once, at start (or in the workers)
    pixels, labels = load_split("shipped", "train")  # the stream's digits, in file order
    assert torch.equal(resident.table.pixels, pixels) and torch.equal(resident.table.labels, labels)
    before = len(decoded)
    list(resident.epoch(4, resident.local_steps))
    again = stream(workers=workers)  # another rank on this machine, or a later run: it reads the cache
    assert len(decoded) == before  # later epochs and the cache's readers decode nothing
    assert torch.equal(again.table.pixels, pixels) and torch.equal(again.table.ids, resident.table.ids)
    assert (resident.table.source, again.table.source) == ("decoded", "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.decoded_cache(resident.files, "error").name]
    first = next(iter(resident.epoch(5, 1)))
    first.pixels.zero_()  # batches are the caller's own: writing to one leaves the table alone
    assert torch.equal(resident.table.pixels, pixels)


def test_the_decode_cache_is_keyed_by_the_shards_bytes_and_a_damaged_one_is_replaced(monkeypatch, tmp_path):
    from cvae_dist import data

    monkeypatch.setenv("CVAE_DIST_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "src"
    source.mkdir()
    shard = source / "train-00000-of-00001.parquet"
    table = pq.read_table(data.parquet_files("shipped", "test")[0])
    pq.write_table(table, shard)
    first = RankStream(DataConfig(source=str(source)), 0, 1, seed=0)
    cache = data.decoded_cache([str(shard)], "error")
    assert cache.is_file() and first.local_rows == 500
    cache.write_bytes(b"damaged")  # a foreign or half-copied file: decoded again and replaced
    assert torch.equal(RankStream(DataConfig(source=str(source)), 0, 1, seed=0).table.pixels, first.table.pixels)
    assert cache.stat().st_size > 500 * 28 * 28
    pq.write_table(table.slice(0, 300), shard)  # the shard changed: another key, decoded anew
    assert data.decoded_cache([str(shard)], "error") != cache
    assert RankStream(DataConfig(source=str(source)), 0, 1, seed=0).local_rows == 300
    assert data.decoded_cache([str(shard)], "skip") != data.decoded_cache([str(shard)], "error")


def flip_a_pixel(cache) -> None:
    """One byte of the cached pixels flipped (bit rot, a bad copy): the file still parses, its digest does not fit."""
    raw = bytearray(cache.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8 : 8 + header])["pixels"]["data_offsets"]
    raw[8 + header + start + 1000] ^= 0xFF
    cache.write_bytes(bytes(raw))


# Files of the cache's name that are not this split's decode, each with what the one warning line says of it
FOREIGN = {
    "not-safetensors": (lambda t: b"damaged", "unreadable"),
    "all-zero-digits": (lambda t: {**t, "pixels": torch.zeros_like(t["pixels"])}, "it has no content digest"),
    "non-scalar-bad": (lambda t: {**t, "bad": torch.zeros(2, dtype=torch.int64)}, "'bad' is torch.int64 (2,)"),
    "3-d-pixels": (lambda t: {**t, "pixels": t["pixels"][:, 0]}, "'pixels' is torch.uint8 (500, 28, 28)"),
    "float-pixels": (lambda t: {**t, "pixels": t["pixels"].float()}, "'pixels' is torch.float32"),
    "fewer-rows": (lambda t: {k: v[:300] if v.dim() else v for k, v in t.items()}, "holds 300 digits"),
    "another-key": (lambda t: {**t, "extra": torch.zeros(1)}, "expected ['bad', 'ids', 'labels', 'pixels']"),
    "flipped-pixel": (None, "its content does not match its digest"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_a_cache_file_that_is_not_this_splits_decode_is_decoded_again_saying_so(monkeypatch, tmp_path, caplog, case):
    # A file of the cache's name is trusted only for its layout, row count and a digest of its content: anything
    # else (all-zero digits once trained silently; a non-scalar `bad` or 3-D pixels ended in a traceback) is decoded
    # again and replaced, with one line saying so.
    from cvae_dist import data

    monkeypatch.setenv("CVAE_DIST_CACHE", str(tmp_path / "cache"))
    first = stream(train_split="test")
    cache = data.decoded_cache(first.files, "error")
    make, problem = FOREIGN[case]
    if make is None:
        flip_a_pixel(cache)
    elif isinstance(foreign := make(load_file(cache)), bytes):
        cache.write_bytes(foreign)
    else:
        save_file(foreign, cache)
    caplog.set_level(logging.WARNING, logger="cvae_dist.data")
    again = stream(train_split="test")
    assert again.table.source == "decoded" and again.local_rows == 500 and again.bad_rows == 0
    for name in ("pixels", "labels", "ids"):
        assert torch.equal(getattr(again.table, name), getattr(first.table, name))
    warnings = [r.getMessage() for r in caplog.records if r.name == "cvae_dist.data"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{cache}: ") and problem in warnings[0], warnings[0]
    assert warnings[0].endswith("decoding the split again and replacing it")
    assert stream(train_split="test").table.source == "cache"  # replaced by a good decode, read as it is


@pytest.mark.parametrize("world", [2, 3])
def test_every_world_size_trains_on_the_same_global_batches(world):
    """Each epoch's order is the same permutation at any world size, and rank r's batch is its share of the global
    one: concatenated in rank order, the ranks' batches are the one-process run's (128 over 3: 43/43/42)."""
    alone = stream()
    ranks = [stream(rank=r, world=world) for r in range(world)]
    assert {s.local_steps for s in ranks} == {alone.local_steps} == {35}
    assert [s.batch_size for s in ranks] == ([64, 64] if world == 2 else [43, 43, 42])
    for epoch, skip in ((1, 0), (2, 33)):
        whole = list(alone.epoch(epoch, 35, skip))
        shares = zip(*(s.epoch(epoch, 35, skip) for s in ranks), strict=True)
        for one, parts in zip(whole, shares, strict=True):
            for field in range(3):  # pixels, labels, ids
                assert torch.equal(torch.cat([p[field] for p in parts]), one[field])
    assert not torch.equal(alone.order(1), alone.order(2))  # a new order each epoch
    assert torch.equal(alone.order(1).sort().values, torch.arange(4500))  # every row once
    assert not torch.equal(RankStream(DataConfig(), 0, 1, seed=1).order(1), alone.order(1))  # the seed's


def test_a_resident_epochs_order_goes_to_the_tables_device_once():
    """A step slices the epoch's order where the table is: copying each batch's row numbers from host memory
    would make the host wait for the GPU's previous step every step. (A 'meta' device stands in for a GPU: every
    copy to it shows as an operator.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiesToTheTable(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "meta":
                CopiesToTheTable.count += 1
            return func(*args, **kwargs)

    s = RankStream(DataConfig(), 0, 1, seed=0, device=torch.device("meta"))
    assert s.resident and s.table.pixels.device.type == "meta"
    with CopiesToTheTable():
        batches = list(s.epoch(1, s.local_steps))
    assert len(batches) == 35 and all(b.pixels.device.type == "meta" and b.pixels.shape[0] == 128 for b in batches)
    assert CopiesToTheTable.count == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_give_the_same_full_batches_every_epoch(workers):
    # Workers each get some shards, and each shard set ends in a partial batch: joined, they still make 35.
    s = stream(resident=False, workers=workers)
    epochs = {e: epoch_ids(s, e) for e in (1, 2)}
    for batches in epochs.values():
        assert [len(ids) for ids in batches] == [128] * 35
        assert len(set(torch.cat(batches).tolist())) == 35 * 128
    assert not torch.equal(torch.cat(epochs[1]), torch.cat(epochs[2]))  # the epoch reaches the persistent workers
    assert torch.equal(torch.cat(epochs[1]), torch.cat(epoch_ids(s, 1)))
    resumed = epoch_ids(s, 2, skip=30)
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, b in zip(resumed, epochs[2][30:], strict=True))


def test_data_workers_are_sized_to_the_device_and_cores(monkeypatch):
    from cvae_dist.distributed import data_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data_workers(3, torch.device("cpu")) == 3  # as configured
    assert data_workers(None, torch.device("cpu")) == 0
    assert data_workers(None, torch.device("cuda")) == 4  # 8 cores per rank, capped at 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data_workers(None, torch.device("cuda")) == 1  # 2 cores per rank, one kept for the training process


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_ranks_get_disjoint_shards_covering_the_data(world):
    cfg = DataConfig(train_split="train+test", shuffle_buffer=0, resident_mb=0, batch_size=16 * world)
    streams = [RankStream(cfg, r, world, seed=0) for r in range(world)]
    seen = [set(torch.cat([b.ids for b in s.epoch(0, s.local_steps)]).tolist()) for s in streams]
    full = [{i for rows in s.dataset.iter(1000) for i in rows["id"]} for s in streams]
    assert sum(len(f) for f in full) == 5000 and len(set().union(*full)) == 5000  # disjoint, complete
    for s, ids in zip(streams, seen, strict=True):
        assert len(ids) == s.local_steps * 16
        assert s.local_steps == (1624 if world == 3 else 5000 // world) // 16  # the fewest rows any epoch deals a rank


def test_unknown_source_and_split_are_named():
    with pytest.raises(DataError, match="no such directory"):
        open_stream("/nowhere/at/all", "train")
    with pytest.raises(DataError, match="no 'valid-\\*.parquet' files"):
        open_stream("shipped", "valid")


def chunk(ids: list[int]) -> _Decoded:
    """A decoded chunk of rows `ids`: each row's label and pixels derived from its id, so rows can be followed."""
    t = torch.tensor(ids, dtype=torch.int64)
    pixels = (t % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()
    return _Decoded(Batch(pixels, t % 10, t), 0)


@pytest.mark.parametrize("sizes", [[3, 5, 2, 4, 4, 1], [4, 3, 4, 1, 4], [1, 1, 1], [9]], ids=str)
def test_full_batches_regroup_uneven_chunks_and_drop_the_remainder(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = [chunk(list(range(s, s + n))) for s, n in zip(starts, sizes, strict=True)]
    batches = [d.batch for d in full_batches(iter(chunks), 4)]
    total = sum(sizes)
    assert [b.ids.tolist() for b in batches] == [list(range(i, i + 4)) for i in range(0, total - total % 4, 4)]
    for b in batches:  # every row's pixels and label stay with its id
        assert torch.equal(b.labels, b.ids % 10) and torch.equal(b.pixels[:, 0, 0, 0].long(), b.ids % 256)
        assert b.pixels.shape == (4, 1, 28, 28)


def png(side: int = 28, value: int = 0) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(np.full((side, side), value, dtype=np.uint8) + np.eye(side, dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def bad_rows() -> dict:
    """Rows 0, 3 and 5 are good; 1 is not a PNG, 2 has no bytes, 4 is 32x32, 6 has label 12, 7 no label."""
    images = [png(value=10), b"not a png", None, png(value=30), png(side=32), png(value=50), png(), png()]
    return {
        "image": [None if b is None else {"bytes": b, "path": None} for b in images],
        "label": [1, 2, 3, 4, 5, 6, 12, None],
        "id": [100 + i for i in range(8)],
    }


def test_decode_batch_skip_drops_bad_records_and_keeps_the_good_ones():
    decoded = decode_batch(bad_rows(), on_bad="skip")
    assert decoded.bad == 5
    b = decoded.batch
    assert b.ids.tolist() == [100, 103, 105] and b.labels.tolist() == [1, 4, 6]
    assert b.pixels.dtype == torch.uint8 and b.pixels.shape == (3, 1, 28, 28)
    expected = [np.full((28, 28), v, dtype=np.uint8) + np.eye(28, dtype=np.uint8) for v in (10, 30, 50)]
    assert torch.equal(b.pixels[:, 0], torch.from_numpy(np.stack(expected)))


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (1, "undecodable image"),
        (2, "no image bytes"),
        (4, "image is 32x32, expected 28x28"),
        (6, "label 12 outside 0..9"),
        (7, "missing label"),
    ],
)
def test_decode_batch_error_names_the_first_bad_record_and_its_problem(row, problem):
    rows = bad_rows()
    keep = [0, 3, row, 5, 6 if row == 7 else 7]  # good rows, the bad one, a good one and another bad one
    rows = {k: [v[i] for i in keep] for k, v in rows.items()}
    with pytest.raises(DataError) as err:
        decode_batch(rows, on_bad="error")
    message = str(err.value)
    assert message.startswith(f"record id {100 + row}: {problem}")
    assert message.endswith("(data.on_bad_record=skip drops such records)")


def test_a_label_that_is_not_an_integer_is_a_bad_record_not_a_traceback():
    rows = {"image": [{"bytes": png(), "path": None}] * 3, "label": [1, "7", 2.0], "id": [0, 1, 2]}
    with pytest.raises(DataError, match="^record id 1: label '7' is not an integer"):
        decode_batch(rows, on_bad="error")
    assert decode_batch(rows, on_bad="skip").batch.labels.tolist() == [1]


def test_decode_batch_error_names_the_file_and_row_it_came_from(tmp_path):
    rows = bad_rows()
    shard = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), shard)
    with pytest.raises(DataError, match=f"^{shard}: row 1: undecodable image"):
        decode_batch(rows, on_bad="error", files=[str(shard)])


def test_decode_batch_without_an_id_column_gives_id_minus_one():
    rows = {k: v for k, v in bad_rows().items() if k != "id"}
    decoded = decode_batch(rows, on_bad="skip")
    assert decoded.batch.ids.tolist() == [-1, -1, -1]


def shards(tmp_path, sizes: list[int]) -> list[str]:
    files = []
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"train-{i:05d}.parquet"))
        pq.write_table(pa.table({"label": [0] * n}), files[-1])
    return files


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_fewest_rows_is_the_worst_deal_any_rank_can_get(tmp_path, world):
    sizes = [40, 10, 30, 20]
    files = shards(tmp_path, sizes)
    if len(sizes) % world == 0:  # whole shards, len / world to each rank: the worst is the lightest such hand
        per_rank = len(sizes) // world
        worst = min(sum(hand) for hand in itertools.combinations(sizes, per_rank))
    else:  # every world-th row of the whole split
        worst = sum(sizes) // world
    assert fewest_rows(files, world) == worst
    assert fewest_rows(None, world) is None  # a hub dataset: unknown before reading it


def test_model_input_is_in_unit_range_at_the_models_size():
    pixels = torch.tensor([0, 255, 51, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(3, 1, 14, 14)
    same = to_model_input(pixels, 28, channels_last=False)
    assert same.dtype == torch.float32 and torch.equal(same, pixels.float() / 255)  # no resize: exact
    assert same.min() == 0 and same.max() == 1
    resized = to_model_input(pixels, 40, channels_last=True)
    assert resized.shape == (3, 1, 40, 40) and resized.dtype == torch.float32
    assert resized.min() >= 0 and resized.max() <= 1
    # bilinear: a flat image stays flat
    flat = to_model_input(torch.full((2, 1, 28, 28), 51, dtype=torch.uint8), 64, channels_last=False)
    assert torch.allclose(flat, torch.full((2, 1, 64, 64), 0.2))


@pytest.mark.parametrize(("batch", "world"), [(128, 3), (128, 1), (128, 8), (100, 7), (5, 5), (64, 6)])
def test_the_global_batch_is_shared_out_over_the_ranks(batch, world):
    slices = [batch_share(batch, world, r) for r in range(world)]
    shares = [s.stop - s.start for s in slices]
    assert sum(shares) == batch and max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the first ranks take the extra images
    assert [s.start for s in slices] == [0, *itertools.accumulate(shares)][:-1]  # in rank order, back to back
    if (batch, world) == (128, 3):
        assert shares == [43, 43, 42]


def test_a_global_batch_smaller_than_the_world_is_refused():
    with pytest.raises(ConfigError, match="data.batch_size=3 is smaller than the world size 4"):
        batch_share(3, 4, 0)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("resident", [True, False])
def test_ids_that_restart_in_every_shard_still_train_on_every_row_once_an_epoch(tmp_path, resident, world):
    # A converter that numbers each shard's rows from 0: ids repeat eight times over the shipped split's shards.
    # They are labels for audits, never keys: every row is trained on once an epoch, on every world size.
    from cvae_dist.data import SHIPPED_DIR

    source = tmp_path / "renumbered"
    source.mkdir()
    digits = []
    for shard in sorted(SHIPPED_DIR.glob("*.parquet")):
        table = pq.read_table(shard)
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(range(len(table)), pa.int64()))
        pq.write_table(table, source / shard.name)
        digits += [row["bytes"] for row in table["image"].to_pylist()] if shard.name.startswith("train") else []
    cfg = DataConfig(source=str(source), resident_mb=DataConfig.resident_mb if resident else 0)
    ranks = [RankStream(cfg, rank=r, world_size=world, seed=0) for r in range(world)]
    trained = []
    for shares in zip(*(s.epoch(1, s.local_steps) for s in ranks), strict=True):
        trained += [bytes(p.numpy().tobytes()) for share in shares for p in share.pixels]
    source_pixels = [decode_batch({"image": [{"bytes": d}], "label": [0]}).batch.pixels[0] for d in digits]
    counts = collections.Counter(p.numpy().tobytes() for p in source_pixels)
    assert len(trained) == ranks[0].local_steps * 128 >= 4480 - 128
    too_often = collections.Counter(trained) - counts
    assert not too_often, f"{len(too_often)} digits trained more often an epoch than they are stored"
