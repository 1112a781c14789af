"""The profiler's cost outside its window, in one process (as `cvae-dist bench`'s telemetry section compares
telemetry on and off): two real runs driven by `Trainer.steps`, one with log.profile_steps=2-4 (recorded during its
warm-up trial, so every timed step is outside the window), one without; trials interleaved, the order alternating;
the ratio is the median of the per-trial ratios. Plus the per-step cost of `Profiler.step(n)` outside a window."""

import copy
import json
import statistics
import sys
import tempfile
import time

import torch

from cvae_dist.bench import TrainerLoop, _trainer_run
from cvae_dist.config import load_config

trials, seconds = (int(sys.argv[1]), float(sys.argv[2])) if len(sys.argv) > 2 else (7, 3.0)
with tempfile.TemporaryDirectory() as out:
    cfg = load_config("configs/debug.yaml", [f"output_dir={out}", "log.wandb=disabled", "train.precision=fp32"])
    loops = {}
    for side, steps in (("profiled", "2-4"), ("plain", None)):
        c = copy.deepcopy(cfg)
        c.log.profile_steps = steps
        loops[side] = TrainerLoop(_trainer_run(c, side, None))
    for loop in loops.values():
        loop.trial(3.0)  # warm-up (the profiled run records steps 2-4 here, then drops its profiler)
    assert loops["profiled"].trainer.profiler.prof is None and loops["profiled"].trainer.profiler.window is None
    assert (loops["profiled"].trainer.dir / "profiles" / "rank0-steps2-4.pt.trace.json.gz").is_file()
    rates = {"profiled": [], "plain": []}
    for t in range(trials):
        for side in ("profiled", "plain") if t % 2 == 0 else ("plain", "profiled"):
            rates[side].append(loops[side].trial(seconds)["img_per_s"])
    ratios = [p / q for p, q in zip(rates["profiled"], rates["plain"], strict=True)]
    # the loop's one call per step outside a window
    profiler = loops["profiled"].trainer.profiler
    n, start = 1_000_000, time.perf_counter()
    for i in range(n):
        with profiler.step(10**6 + i):
            pass
    per_call_ns = (time.perf_counter() - start) / n * 1e9
    step_ms = 1e3 * cfg.data.batch_size / statistics.median(rates["plain"])
print(
    json.dumps(
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "trials": trials,
            "seconds": seconds,
            "img_per_s": rates,
            "per_trial_ratio_profiled_over_plain": ratios,
            "median_ratio": statistics.median(ratios),
            "profiler_step_call_ns": per_call_ns,
            "plain_step_ms": step_ms,
            "call_share_of_a_step": per_call_ns / 1e6 / step_ms,
        },
        indent=1,
    )
)
