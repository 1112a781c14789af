"""The run directory's checks before a run starts, and writes that never leave half a file (files.py)."""

from pathlib import Path

import pytest

from cvae_dist import files
from cvae_dist.config import ConfigError
from cvae_dist.files import DiskError, check_new_run_dir, check_writable, write_safely


def test_a_new_run_refuses_a_directory_with_something_in_it(tmp_path):
    check_new_run_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_new_run_dir(tmp_path / "empty")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError) as err:
        check_new_run_dir(tmp_path / "used")
    message = str(err.value)
    assert message.startswith(f"run directory {tmp_path / 'used'} already exists") and "resume=auto" in message
    assert "\n" not in message


@pytest.fixture
def unwritable(monkeypatch):
    """Paths made unwritable (os.access says so; root would write anyway, so permission bits cannot show it)."""
    denied: set[Path] = set()
    real = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: Path(p) not in denied and real(p, mode))
    return denied


def test_check_writable_asks_the_checkpoints_the_run_or_the_nearest_existing_parent(tmp_path, unwritable):
    run = tmp_path / "out" / "deeper" / "run"
    check_writable(run)  # nothing exists below tmp_path yet: tmp_path is asked, and is writable
    unwritable.add(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_writable(run)
    assert str(err.value) == f"output directory {tmp_path} is not writable (output_dir={run.parent})"
    (run / "checkpoints").mkdir(parents=True)  # a resumed run: its checkpoints/ is what must take new files
    check_writable(run)
    unwritable.add(run / "checkpoints")
    with pytest.raises(ConfigError) as err:
        check_writable(run)
    assert str(err.value).startswith(f"{run / 'checkpoints'} is not writable; the run could not save")


def test_check_writable_asks_an_existing_run_directory(tmp_path, unwritable):
    (tmp_path / "run").mkdir()
    unwritable.add(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        check_writable(tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 'run'} is not writable")


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError) as err:
        check_writable(tmp_path / "out" / "run")
    assert (
        str(err.value) == f"{tmp_path / 'out'} is a file, not a directory: output_dir and run_name must name a "
        "directory"
    )


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "status.json"
    write_safely(lambda tmp: tmp.write_text("old"), path)

    def fails(tmp: Path, error: Exception):
        tmp.write_text("half")
        raise error

    with pytest.raises(DiskError, match=f"could not write {path}: No space left on device; .* MB free there"):
        write_safely(lambda tmp: fails(tmp, OSError(28, "No space left on device")), path)
    with pytest.raises(RuntimeError, match="not a disk error"):  # any other error: itself, and no half file either
        write_safely(lambda tmp: fails(tmp, RuntimeError("not a disk error")), path)
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"] and path.read_text() == "old"
