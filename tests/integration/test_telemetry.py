"""MFU a user can trust: a machine busy while the run starts does not inflate it (telemetry.py)."""

import contextlib
import math
import os
import subprocess
import sys
import time

from support.checks import lines
from support.launching import DEBUG

from cvae_dist import telemetry
from cvae_dist.config import load_config
from cvae_dist.trainer import train


@contextlib.contextmanager
def cpu_hogs(n: int):
    """`n` processes that spin on the CPU for as long as the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)  # running, not starting
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_a_machine_busy_while_the_run_starts_does_not_inflate_mfu(tmp_path, monkeypatch):
    # Twice as many spinning processes as cores while the trainer works out the device's peak (at start, once),
    # then a quiet machine for the training: MFU stays what this model reaches on a CPU (about 0.1-0.35), below 0.4,
    # and every figure is a number or null (the autouse strict_json_files check reads every file strictly).
    peak_flops, busy = telemetry.peak_flops, []

    def peak_on_a_busy_machine(*args):
        with cpu_hogs(2 * os.cpu_count()):
            busy.append((args, peak_flops(*args)))
        return busy[-1][1]

    monkeypatch.setattr(telemetry, "peak_flops", peak_on_a_busy_machine)
    result = train(load_config(DEBUG, ["train.epochs=1", "data.train_split=test", "log.every_steps=1",
                                       "log.wandb=disabled", f"output_dir={tmp_path}", "run_name=run"]))  # fmt: skip
    mfu = [r[k] for r in lines(result.run_dir) for k in r if k.endswith("/mfu")]
    assert len(mfu) == 2 * 3 and all(m is not None for m in mfu), mfu  # rank/0/mfu and throughput/mfu per step line
    assert all(0 < m < 0.4 for m in mfu), mfu
    assert all(math.isfinite(m) for m in mfu)
    (args, (peak, source)), *_ = busy
    assert peak_flops(*args) == (peak, source) and source.startswith("cpu:"), source  # the same on a quiet machine
