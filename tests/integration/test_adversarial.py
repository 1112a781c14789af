"""Inputs from an adversarial pass (issue 32): inference seeds, an export onto a dangling link, and the run names of
launches started in the same second."""

import time

import pytest
from support.checks import one_line, run_cli
from support.launching import DEBUG

from cvae_dist.config import load_config

TOO_BIG = 2**64  # torch's seeds end at 2**64 - 1: "ValueError: Overflow when unpacking long long"


@pytest.mark.parametrize("command", [["eval"], ["sample", "--out", "s.png"], ["reconstruct", "--out", "r.png"]])
def test_an_inference_seed_out_of_range_is_refused_in_one_line(finished, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, [*command, "--run", finished, "--seed", TOO_BIG])
    assert code == 2
    one_line(err, f"--seed={TOO_BIG}: must be an integer from 0 to 4294967295")
    assert list(tmp_path.iterdir()) == []


def test_export_onto_a_dangling_symlink_names_the_link(finished, tmp_path, capsys):
    link, target = tmp_path / "export", tmp_path / "gone" / "model"
    link.symlink_to(target)
    code, err = run_cli(capsys, ["export", "--run", finished, "--out", link])
    assert code == 2  # not a full disk, exit 1
    one_line(err, f"export --out {link} is a symbolic link to {target}, which does not exist")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_launches_of_one_recipe_in_the_same_second_get_runs_of_their_own(tmp_path):
    # A sweep started in a loop: each launch of the recipe names its run debug-{time}. The second launch must not
    # land in the first one's directory (and be refused).
    from accelerate import Accelerator

    from cvae_dist.build import _locate_run

    accelerator = Accelerator(cpu=True)
    time.sleep(1.05 - time.time() % 1)  # just after a second began: both launches fall within it
    runs = []
    for _ in range(2):
        run_dir, lock, _ = _locate_run(accelerator, load_config(DEBUG, [f"output_dir={tmp_path}"]))
        (run_dir / "config.yaml").write_text("a run that started\n")
        lock.release()
        runs.append(run_dir)
    assert runs[0] != runs[1] and all(r.name.startswith("debug-") for r in runs), runs
