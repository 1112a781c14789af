"""`cvae-dist prepare-data`: CSV and IDX (MNIST) files to parquet shards (prepare_data.py)."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Features
from support.mnist_full import column

from cvae_dist.data import FEATURES, load_split, open_stream, parquet_files
from cvae_dist.prepare_data import MNIST_FILES, DataFormatError, convert_mnist, read_csv, read_idx, write_shards


def _digits(n=30):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10


def test_csv_round_trip(tmp_path):
    pixels, labels = _digits()
    rows = np.concatenate([pixels.reshape(len(labels), -1), labels[:, None]], axis=1)
    with gzip.open(tmp_path / "d.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    x, y = read_csv(tmp_path / "d.csv.gz")
    assert np.array_equal(x, pixels) and np.array_equal(y, labels)
    # label-first with a header (the Kaggle layout)
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    np.savetxt(
        tmp_path / "k.csv",
        np.concatenate([labels[:, None], rows[:, :-1]], 1),
        fmt="%d",
        delimiter=",",
        header=header,
        comments="",
    )
    x, y = read_csv(tmp_path / "k.csv")
    assert np.array_equal(x, pixels) and np.array_equal(y, labels)
    sizes = write_shards(x, y, tmp_path / "out", shards=2, heldout_per_class=1)
    assert sizes == {"train": 20, "test": 10}
    back_x, back_y = load_split(str(tmp_path / "out"), "train+test")
    ids = [i for rows in open_stream(str(tmp_path / "out"), "train+test").iter(100) for i in rows["id"]]
    assert np.array_equal(back_x[:, 0].numpy(), pixels[ids]) and np.array_equal(back_y.numpy(), labels[ids])
    with pytest.raises(FileExistsError):
        write_shards(x, y, tmp_path / "out")


def test_idx_round_trip(tmp_path):
    pixels, labels = _digits()
    (tmp_path / "img.idx").write_bytes(struct.pack(">IIII", 0x803, len(labels), 28, 28) + pixels.tobytes())
    (tmp_path / "lbl.idx.gz").write_bytes(
        gzip.compress(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())
    )
    x, y = read_idx(tmp_path / "img.idx", tmp_path / "lbl.idx.gz")
    assert np.array_equal(x, pixels) and np.array_equal(y, labels)
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(DataFormatError, match="not MNIST IDX"):
        read_idx(tmp_path / "junk", tmp_path / "lbl.idx.gz")


def test_prepare_data_cli(tmp_path, capsys):
    from cvae_dist.cli import main

    pixels, labels = _digits(40)
    rows = np.concatenate([pixels.reshape(40, -1), labels[:, None]], axis=1)
    np.savetxt(tmp_path / "d.csv", rows, fmt="%d", delimiter=",")
    assert (
        main(
            [
                "prepare-data",
                "--csv",
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "o"),
                "--shards",
                "4",
                "--heldout-per-class",
                "1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir())[0] == "test-00000-of-00001.parquet"
    assert len(list((tmp_path / "o").glob("train-*-of-00004.parquet"))) == 4


"""`prepare-data --mnist`: the official split (60,000 train / 10,000 test) in the `ylecun/mnist` layout.

Unit tests convert tiny synthetic IDX files (80 train / 20 test digits); the tests on the real files use the
session's one conversion (`mnist_full`) and skip where the shared IDX folder is absent.
"""


N_TRAIN, N_TEST = 80, 20


convert = functools.partial(convert_mnist, n_train=N_TRAIN, n_test=N_TEST)


FOUR_NAMES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


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
