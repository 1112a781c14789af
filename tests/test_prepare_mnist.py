"""`prepare-data --mnist`: the official split (60,000 train / 10,000 test) in the `ylecun/mnist` layout.

Unit tests convert tiny synthetic IDX files (80 train / 20 test digits); the tests on the real files use the
session's one conversion (`mnist_full`) and skip where the shared IDX folder is absent.
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Features
from mnist_full import CLI_LINE, MNIST_IDX

from cvae_dist.data import FEATURES, load_split, parquet_files
from cvae_dist.prepare_data import MNIST_FILES, DataFormatError, convert_mnist, read_idx

N_TRAIN, N_TEST = 80, 20
convert = functools.partial(convert_mnist, n_train=N_TRAIN, n_test=N_TEST)
FOUR_NAMES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # official, checked against the files
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path: Path, array: np.ndarray) -> None:
    """uint8 images (N, 28, 28) or labels (N,) as an IDX file, gzipped when the name ends in .gz."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_mnist(folder: Path, gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Synthetic official-split files (N_TRAIN / N_TEST random digits) in `folder`; returns what they hold."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    data = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
        images, labels = (folder / (name + ".gz" * gz) for name in MNIST_FILES[split])
        write_idx(images, x)
        write_idx(labels, y)
        data[split] = x, y
    return data


def column(files: list[str], name: str) -> np.ndarray:
    return np.concatenate([pq.read_table(f, columns=[name]).column(name).to_numpy() for f in files])


@pytest.mark.parametrize("gz", [True, False])
def test_layout_ids_and_features(tmp_path, gz):
    data = make_mnist(tmp_path / "idx", gz)
    (tmp_path / "out").mkdir()  # an empty directory is fine
    assert convert(tmp_path / "idx", tmp_path / "out") == {"train": N_TRAIN, "test": N_TEST}
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["test-00000-of-00001.parquet"] + [f"train-{i:05d}-of-00008.parquet" for i in range(8)]
    for f in (tmp_path / "out").iterdir():
        assert Features.from_arrow_schema(pq.read_schema(f)) == FEATURES
        assert pq.read_schema(f).names == ["image", "label", "id"]
    train, test = (parquet_files(str(tmp_path / "out"), s) for s in ("train", "test"))
    assert [pq.read_metadata(f).num_rows for f in train] == [N_TRAIN // 8] * 8
    ids = column(train, "id")
    assert sorted(ids) == list(range(N_TRAIN)) and list(ids) != list(range(N_TRAIN))  # shuffled
    assert column(test, "id").tolist() == list(range(N_TEST))  # file order
    for split, index in (("train", ids), ("test", np.arange(N_TEST))):
        pixels, labels = load_split(str(tmp_path / "out"), split)
        x, y = data[split]
        assert np.array_equal(pixels[:, 0].numpy(), x[index]) and np.array_equal(labels.numpy(), y[index])


def test_the_seed_fixes_the_train_order(tmp_path):
    make_mnist(tmp_path / "idx")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert(tmp_path / "idx", tmp_path / name, seed=seed)
    a, b, c = (column(parquet_files(str(tmp_path / n), "train"), "id").tolist() for n in "abc")
    assert a == b and a != c


def swap_in_test_labels(folder: Path) -> None:
    (folder / "train-labels-idx1-ubyte.gz").write_bytes((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())


def swap_in_test_files(folder: Path) -> None:
    for train, test in zip(MNIST_FILES["train"], MNIST_FILES["test"], strict=True):
        (folder / f"{train}.gz").write_bytes((folder / f"{test}.gz").read_bytes())


def remove_test_labels(folder: Path) -> None:
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()


def labels_as_images(folder: Path) -> None:
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (swap_in_test_labels, r"train-images-idx3-ubyte.gz: 80 images but \S*train-labels-idx1-ubyte.gz: 20 labels$"),
        (swap_in_test_files, r"train-images-idx3-ubyte.gz: 20 images; expected 80 training images$"),
        (remove_test_labels, f"no t10k-labels-idx1-ubyte; --mnist expects {FOUR_NAMES}"),
        (
            labels_as_images,
            r"t10k-images-idx3-ubyte.gz: not MNIST IDX images \(magic number 0x00000801; expected 0x00000803\)$",
        ),
    ],
    ids=["wrong-pairing", "test-files-in-train-place", "missing-file", "wrong-magic"],
)
def test_wrong_input_is_refused_in_one_line_leaving_nothing(tmp_path, damage, message):
    make_mnist(tmp_path / "idx")
    damage(tmp_path / "idx")
    with pytest.raises(DataFormatError, match=message) as e:
        convert(tmp_path / "idx", tmp_path / "sub" / "out")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_non_empty_output_is_never_touched(tmp_path):
    make_mnist(tmp_path / "idx")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "out", tmp_path / "file"):
        with pytest.raises(FileExistsError, match="not an empty directory"):
            convert(tmp_path / "idx", out)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"] and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "idx", "out"]


def test_an_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import cvae_dist.prepare_data as prepare_data

    make_mnist(tmp_path / "idx")
    calls, encode = [], prepare_data.encode_png

    def interrupt_in_the_test_split(pixels):
        calls.append(1)
        if len(calls) > N_TRAIN + 5:  # the train shards are on disk by now
            raise KeyboardInterrupt
        return encode(pixels)

    monkeypatch.setattr(prepare_data, "encode_png", interrupt_in_the_test_split)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "idx", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_cli_refusals_are_one_line_exit_2(tmp_path, capsys):
    from cvae_dist.cli import main

    make_mnist(tmp_path / "idx")  # 80 training digits, not 60,000
    out = str(tmp_path / "out")
    for extra, message in (
        ([], "expected 60,000 training images"),
        (["--heldout-per-class", "5"], "--heldout-per-class applies to --csv / --idx"),
    ):
        assert main(["prepare-data", "--mnist", str(tmp_path / "idx"), "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cvae-dist prepare-data: error: ") and message in err and err.count("\n") == 1
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").unlink()
    assert main(["prepare-data", "--mnist", str(tmp_path / "idx"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no train-images-idx3-ubyte;" in err and FOUR_NAMES in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# The real files: one conversion per session, through the CLI (see mnist_full.py).


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
