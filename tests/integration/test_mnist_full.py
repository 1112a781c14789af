"""The full MNIST set converted from IDX files, and a local clone of the hub repository."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features, Image
from support.launching import REPO
from support.mnist_full import CLI_LINE, MNIST_IDX, TEST_COUNTS, TRAIN_COUNTS, column

from cvae_dist.config import load_config
from cvae_dist.data import load_split, parquet_files
from cvae_dist.prepare_data import MNIST_FILES, read_idx
from cvae_dist.train import train

MNIST = "configs/mnist.yaml"


def test_official_split_counts_ids_and_shards(mnist_full):
    train, test = parquet_files(str(mnist_full), "train"), parquet_files(str(mnist_full), "test")
    assert [Path(f).name for f in train] == [f"train-{i:05d}-of-00008.parquet" for i in range(8)]
    assert [pq.read_metadata(f).num_rows for f in train] == [7500] * 8
    ids, labels = column(train, "id"), column(train, "label")
    assert len(ids) == 60_000 and np.array_equal(np.sort(ids), np.arange(60_000))
    assert np.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
    assert labels[np.argsort(ids)][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert column(test, "id").tolist() == list(range(10_000))
    assert np.bincount(column(test, "label"), minlength=10).tolist() == TEST_COUNTS


def test_official_digits_read_back_unchanged(mnist_full):
    for split, index in (("test", None), ("train", column(parquet_files(str(mnist_full), "train"), "id"))):
        images, labels = (MNIST_IDX / f"{name}.gz" for name in MNIST_FILES[split])
        x, y = read_idx(images, labels)
        if index is not None:
            x, y = x[index], y[index]
        pixels, back = load_split(str(mnist_full), split)  # the test split in its file order
        assert np.array_equal(back.numpy(), y) and np.array_equal(pixels[:, 0].numpy(), x)


def test_cli_prints_counts_size_and_time(mnist_full):
    line = (mnist_full.parent / CLI_LINE).read_text()
    assert line.count("\n") == 1
    assert line.startswith(f"wrote {mnist_full}: train 60,000 digits, test 10,000 digits; ")
    mb = float(line.split("; ")[1].split(" MB")[0])
    assert mb == pytest.approx(sum(f.stat().st_size for f in mnist_full.iterdir()) / 1e6, abs=0.06)
    assert line.rstrip().endswith(" s")


def write_hub_clone(mnist_full: Path, root: Path, n_train: int = 384, n_test: int = 200) -> None:
    """A small copy of the hub repository ylecun/mnist in its own layout: `mnist/<split>-00000-of-00001.parquet`,
    columns image + label only (no `id`), with the hub's features, from the first digits of the converted set."""
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    (root / "mnist").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        table = pq.read_table(parquet_files(str(mnist_full), split)[0], columns=["image", "label"]).slice(0, n)
        rows = {"image": table.column("image").to_pylist(), "label": table.column("label").to_pylist()}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "mnist" / f"{split}-00000-of-00001.parquet"))


@pytest.mark.auto_precision
def test_a_local_clone_of_the_hub_repository_trains(tmp_path, mnist_full):
    clone = tmp_path / "ylecun-mnist"
    write_hub_clone(mnist_full, clone)
    for split in ("train", "test"):
        (file,) = parquet_files(str(clone), split)
        assert Path(file).relative_to(clone).as_posix() == f"mnist/{split}-00000-of-00001.parquet"
        assert pq.read_schema(file).names == ["image", "label"]
    overrides = [
        f"data.source={clone}",
        "train.epochs=1",
        "log.every_steps=1",
        "log.sample_ids=true",
        "train.precision=fp32",
        "log.wandb=disabled",
        f"output_dir={tmp_path}",
        "run_name=clone",
    ]
    result = train(load_config(REPO / MNIST, overrides))
    assert result.steps == 384 // 128 and len(result.epoch_losses) == 1 and math.isfinite(result.epoch_losses[0])
    (rank,) = [json.loads(p.read_text()) for p in (result.run_dir / "ranks").glob("rank*.json")]
    assert rank["ids"]["1"] == [-1] * 384  # the hub's files carry no id column
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in lines if "train/loss" in r]
    assert math.isfinite(epoch["eval/loss_per_image"]) and epoch["train/epoch_steps"] == 3
    assert (result.run_dir / "model" / "model.safetensors").is_file()
