"""`export --out` inside a run directory is refused before anything loads: the run's checkpoint rotation, resumes
and final export would delete or replace it (issue 32, 12)."""

import pytest
from support.checks import copy_of, one_line, run_cli, snapshot


@pytest.mark.parametrize("inside", ["checkpoints/my-export", "checkpoints/step-000000099", "model", "mine"])
def test_export_into_a_run_directory_is_refused_and_writes_nothing(finished, tmp_path, capsys, inside):
    run = copy_of(finished, tmp_path / "runs")
    other = copy_of(finished, tmp_path / "runs", "other")
    (tmp_path / "link").symlink_to(other / "checkpoints")  # another run's checkpoints/, reached through a link
    before = snapshot(tmp_path)
    for source, out in [("--run", run / inside), ("--checkpoint", tmp_path / "link" / "mine")]:
        code, err = run_cli(
            capsys, ["export", source, run / "model" if source == "--checkpoint" else run, "--out", out]
        )
        assert code == 2
        one_line(err, f"export --out {out} is inside run directory", "accepted: a new or empty directory outside")
    assert snapshot(tmp_path) == before


def test_export_beside_the_runs_is_accepted(finished, tmp_path, capsys):
    code, err = run_cli(capsys, ["export", "--run", finished, "--out", tmp_path / "my-cvae"])
    assert code == 0, err
    assert (tmp_path / "my-cvae" / "model.safetensors").is_file()
