"""A test-only `cvae-dist` that injects one fault into a real run, then runs the real command line:

    python tests/support/fault_entry.py nan STEP RANK  <cvae-dist args>   the loss of step STEP on rank RANK is NaN
    python tests/support/fault_entry.py slow RANK SECONDS <cvae-dist args>   rank RANK sleeps SECONDS in every step
    python tests/support/fault_entry.py die STEP RANK  <cvae-dist args>   rank RANK kills itself (SIGKILL, as `kill -9`)
                                                                          in step STEP, on the first attempt only

Under `accelerate launch` pass this file as the script (`accelerate launch ... tests/support/fault_entry.py nan 12 1
train ...`). The faults patch the loss the training step computes (`cvae_dist.step.vae_loss`), so the shipped config
and loop carry none of them.

`die` fires only where torchrun's TORCHELASTIC_RESTART_COUNT (set in every worker's environment) is "0" or unset:
under `--max_restarts N` the restarted group is the same command line, and it must run through.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

from cvae_dist import cli, step
from cvae_dist.model import LossParts, vae_loss


def main(argv: list[str]) -> int:
    fault, a, b, *rest = argv
    rank = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    calls = 0

    def faulty_loss(out, x) -> LossParts:
        nonlocal calls
        calls += 1
        parts = vae_loss(out, x)
        if fault == "nan" and calls == int(a) and rank == int(b):
            # (the loss and the objective the gradient comes from, as a NaN in the model's output makes them)
            return LossParts(parts.total * math.nan, parts.reconstruction * math.nan, parts.kl)
        if fault == "die" and calls == int(a) and rank == int(b) and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: what `kill -9` or the OOM killer does
        if fault == "slow" and rank == int(a):
            time.sleep(float(b))
        return parts

    if fault not in ("nan", "slow", "die"):
        raise SystemExit(f"unknown fault {fault!r}; accepted: nan, slow, die")
    step.vae_loss = faulty_loss
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
