"""`cvae-dist eval` under a real 2-process `accelerate launch`."""

import json
import os
import subprocess

import pytest
from support.launching import ACCELERATE_LAUNCH, REPO, free_port

from cvae_dist import inference


def test_eval_under_accelerate_launch_two_ranks(finished, tmp_path):
    run = finished  # a tiny finished run (the session's)
    out = tmp_path / "eval2.json"
    cmd = [
        *ACCELERATE_LAUNCH,
        "--config_file",
        "launch/ddp_cpu.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "cvae_dist.cli",
        "eval",
        "--run",
        str(run),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("held-out loss") == 1  # the main process reports
    two = json.loads(out.read_text())
    one = inference.evaluate(inference.load_model(run=run))
    assert two["processes"] == 2 and two["images"] == 500
    assert two["kl_per_image"] == pytest.approx(one["kl_per_image"], rel=1e-5)
    # each digit's noise is its place's in the held-out set, whichever rank evaluates it
    assert two["recon_per_image"] == pytest.approx(one["recon_per_image"], rel=1e-5)
