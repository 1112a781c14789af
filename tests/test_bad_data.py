"""Shards with broken records: `data.on_bad_record=error` names file and row, `skip` drops and counts them."""

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cvae_dist.config import load_config
from cvae_dist.data import SHIPPED_DIR, DataError
from cvae_dist.trainer import train
from launch import DEBUG


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
