"""A disk that fills up while training writes: one line, exit 1, nothing half-written."""

import pytest
from support.checks import leftovers, lines, one_line, run_cli, small_disk, status, train_argv

from cvae_dist.checkpoint import verify_checkpoint


@pytest.mark.parametrize("what", ["epoch-image", "metrics-line", "final-export"])
def test_disk_full_while_writing(tmp_path, capsys, caplog, what):
    # The disk fills up as the epoch's figure (~580 KB) is written, as a step line is appended to metrics.jsonl,
    # or as the final model (~600 KB) is exported after the last checkpoint (~1.8 MB).
    kib, overrides, file = {
        "epoch-image": (256, [], "images/epoch_001.png"),
        "metrics-line": (12, ["data.batch_size=32"], "metrics.jsonl"),  # 4 KiB pages: full after a few lines
        "final-export": (2700, [], "model"),
    }[what]
    with small_disk(tmp_path / "disk", kib) as disk:
        run = disk / "run"
        code, err = run_cli(capsys, train_argv(disk, "run", *overrides))
        assert code == 1
        line = one_line(err, f"could not write {run / file}: No space left on device;", "MB free there")
        assert not leftovers(disk)
        if what == "final-export":  # no half export; the weights are safe in the last checkpoint
            assert not (run / "model").exists() and not list((run / "checkpoints").glob(".*"))
            assert verify_checkpoint(run / "checkpoints" / "step-000000003").step == 3
        else:
            assert not list((run / "images").iterdir())
        assert all(isinstance(r, dict) for r in lines(run))  # whole lines only: no half line at the end
        st = status(run)
        if what != "metrics-line":  # the partial file gone, status.json had room to say what happened
            assert st["state"] == "failed" and line.split("error: ", 1)[1] in st["error"]
        else:  # not even status.json's few bytes fit: it keeps its previous content, and a warning says so
            assert st["state"] == "running"
            assert f"could not write {run / 'status.json'}" in caplog.text
            assert "it still says what it said before" in caplog.text
