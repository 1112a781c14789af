"""The data pipeline in process: splits, streams, resident tables, shards, workers (data.py)."""

import pytest
import torch

from cvae_dist.config import DataConfig
from cvae_dist.data import DataError, RankStream, load_split, open_stream


def test_shipped_splits_are_disjoint_and_stratified():
    train_ids = {i for rows in open_stream("shipped", "train").iter(1000) for i in rows["id"]}
    test_pixels, test_labels = load_split("shipped", "test")
    test_ids = {i for rows in open_stream("shipped", "test").iter(1000) for i in rows["id"]}
    assert len(train_ids) == 4500 and len(test_ids) == 500 and not train_ids & test_ids
    assert test_labels.bincount().tolist() == [50] * 10
    assert test_pixels.dtype == torch.uint8 and test_pixels.shape == (500, 1, 28, 28)


def stream(resident: bool = True, workers: int = 0, **data) -> RankStream:
    cfg = DataConfig(resident_mb=DataConfig.resident_mb if resident else 0, **data)
    return RankStream(cfg, rank=0, world_size=1, batch_size=128, seed=0, num_workers=workers)


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
def test_resident_split_is_decoded_once_and_yields_the_streams_ids(monkeypatch, workers):
    from cvae_dist import data

    decoded = []
    monkeypatch.setattr(data, "decode_image", lambda b, _real=data.decode_image: decoded.append(1) or _real(b))
    resident = stream(workers=workers)
    assert len(decoded) == (4500 if workers == 0 else 0)  # the whole split, once, at start (or in the workers)
    streamed = stream(resident=False)
    for epoch in (1, 2, 3):  # the same seeded per-epoch shuffle: the same ids, batch for batch
        assert [t.tolist() for t in epoch_ids(resident, epoch)] == [t.tolist() for t in epoch_ids(streamed, epoch)]
    before = len(decoded)
    list(resident.epoch(4, resident.local_steps))
    assert len(decoded) == before  # later epochs decode nothing
    # the digits themselves are the stream's
    first = next(iter(resident.epoch(5, 1)))
    again = next(iter(streamed.epoch(5, 1)))
    assert torch.equal(first.ids, again.ids) and torch.equal(first.pixels, again.pixels)
    first.pixels.zero_()  # batches are the caller's own: writing to one leaves the table alone
    assert torch.equal(next(iter(resident.epoch(5, 1))).pixels, again.pixels)


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

    s = RankStream(DataConfig(), 0, 1, 128, 0, 0, torch.device("meta"))
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
    cfg = DataConfig(train_split="train+test", shuffle_buffer=0)
    streams = [RankStream(cfg, r, world, 16, seed=0, num_workers=0) for r in range(world)]
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
