"""Bad data and data sources met by training: one line naming the file, nothing left behind."""

import io
import json
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.checks import SHARD, corrupt_source, leftovers, one_line, run_cli, status, train_argv
from support.launching import DEBUG, free_port

from cvae_dist.config import load_config
from cvae_dist.data import SHIPPED_DIR, DataError
from cvae_dist.train import train


def png(size):
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def broken_source(tmp_path):
    """The 500 held-out digits as a training shard with four broken records, and a clean eval split."""
    src = tmp_path / "broken"
    src.mkdir()
    shutil.copy(SHIPPED_DIR / "test-00000-of-00001.parquet", src / "test-00000-of-00001.parquet")
    table = pq.read_table(SHIPPED_DIR / "test-00000-of-00001.parquet")
    rows = table.to_pylist()
    rows[3]["image"] = {"bytes": b"not a png", "path": None}
    rows[50]["image"] = {"bytes": png(20), "path": None}
    rows[100]["label"] = 12
    rows[200]["label"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), src / "train-00000-of-00001.parquet")
    return src


def run(source, tmp_path, mode):
    return train(
        load_config(
            DEBUG,
            [
                "train.epochs=2",
                f"data.source={source}",
                "log.wandb=disabled",
                "data.shuffle_buffer=0",
                f"data.on_bad_record={mode}",
                f"output_dir={tmp_path}",
                f"run_name={mode}",
            ],
        )
    )


def test_error_names_file_and_row(broken_source, tmp_path):
    with pytest.raises(DataError) as err:
        run(broken_source, tmp_path, "error")
    message = str(err.value)
    assert message.startswith(f"{broken_source / 'train-00000-of-00001.parquet'}: row 3: undecodable image")
    assert "\n" not in message


def test_skip_drops_counts_and_keeps_full_batches(broken_source, tmp_path):
    result = run(broken_source, tmp_path, "skip")
    epochs = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "train/loss" in r]
    assert [r["data/bad_records_skipped"] for r in epochs] == [4, 4]
    assert result.steps == 2 * (496 // 128)  # 3 full batches of the 496 good records per epoch


def test_hub_source_without_network_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    # A hub dataset id on a compute node without internet: seconds, not half a minute of retries, and the way out.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing answers there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    code, err = run_cli(capsys, train_argv(tmp_path, "run", "data.source=some/hubid"))
    elapsed = time.monotonic() - started
    assert code == 2 and elapsed < 10, f"exit {code} after {elapsed:.1f} s"
    one_line(err, "data.source=some/hubid", "prepare-data", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
@pytest.mark.parametrize("how", ["half", "overwritten"])
def test_a_corrupt_shard_is_one_line_naming_it(tmp_path, capsys, how, on_bad_record):
    # A shard cut short by an interrupted copy, or with 100 bytes overwritten: named, whatever on_bad_record says
    # (skip drops bad records, not unreadable files).
    source = corrupt_source(tmp_path / "data", how)
    argv = train_argv(
        tmp_path, "run", f"data.source={source}", "data.train_split=train", f"data.on_bad_record={on_bad_record}"
    )
    code, err = run_cli(capsys, argv)
    assert code == 2
    line = one_line(err, "replace or re-create it")
    assert line.startswith(f"cvae-dist train: error: {source / 'train-00000-of-00001.parquet'}: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("no-rows", "holds no rows"),
        ("string-labels", "column 'label' is string, expected integers 0..9"),
        ("no-label", "lacks column(s) ['label']"),
        ("float-ids", "column 'id' is double, expected integers"),
    ],
)
def test_a_shard_of_the_wrong_shape_is_named_with_its_cause(tmp_path, capsys, case, problem):
    # A converter wrote an empty last shard, labels as text, no labels or float ids: the shard and the cause are
    # named before anything is written (not "unreadable", not a traceback from the decoder).
    source = tmp_path / "data"
    source.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, source / SHARD)
    table = pq.read_table(SHIPPED_DIR / "train-00000-of-00008.parquet")
    shard = source / "train-00001-of-00002.parquet"
    pq.write_table(table, source / "train-00000-of-00002.parquet")
    column = {"string-labels": "label", "float-ids": "id"}.get(case)
    if case == "no-rows":
        table = table.slice(0, 0)
    elif case == "no-label":
        table = table.drop_columns(["label"])
    else:
        cast = pa.string() if column == "label" else pa.float64()
        table = table.set_column(table.schema.get_field_index(column), column, table[column].cast(cast))
    pq.write_table(table, shard)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", f"data.source={source}", "data.train_split=train"))
    assert code == 2
    one_line(err, f"cvae-dist train: error: {shard}: {problem}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "case", ["missing-source", "empty-source", "unknown-train-split", "unknown-eval-split", "corrupt-shard"]
)
def test_a_config_error_leaves_no_run_directory_and_the_name_free(tmp_path, capsys, case):
    # The user gets the data settings wrong, reads the error, fixes them and reruns with the same run_name.
    good = tmp_path / "data"
    good.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, good / SHARD)
    bad = {
        "missing-source": [f"data.source={tmp_path / 'nosuch'}"],
        "empty-source": [f"data.source={tmp_path / 'empty'}"],
        "unknown-train-split": [f"data.source={good}", "data.train_split=nosuch"],
        "unknown-eval-split": [f"data.source={good}", "data.eval_split=nosuch"],
        "corrupt-shard": [f"data.source={corrupt_source(tmp_path / 'corrupt', 'half')}", "data.train_split=train"],
    }[case]
    (tmp_path / "empty").mkdir()
    runs = tmp_path / "runs"
    code, err = run_cli(capsys, train_argv(runs, "run", *bad))
    assert code == 2
    one_line(err)
    assert not (runs / "run").exists() and not leftovers(tmp_path)
    if case == "corrupt-shard":  # no directory means a free name; shown once, with a real rerun
        code, err = run_cli(capsys, train_argv(runs, "run", f"data.source={good}", "train.max_steps=1"))  # fixed
        assert code == 0, err
        assert status(runs / "run")["state"] == "completed"
