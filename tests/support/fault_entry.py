"""A test-only `cvae-dist` that injects one fault into a real run, then runs the real command line:

    python tests/support/fault_entry.py nan STEP RANK  <cvae-dist args>   the loss of step STEP on rank RANK is NaN
    python tests/support/fault_entry.py slow RANK SECONDS <cvae-dist args>   rank RANK sleeps SECONDS in every step

Under `accelerate launch` pass this file as the script (`accelerate launch ... tests/support/fault_entry.py nan 12 1
train ...`). The faults patch the loss the training step computes (`cvae_dist.step.vae_loss`), so the shipped config
and loop carry none of them.
"""

from __future__ import annotations

import math
import os
import sys
import time

from cvae_dist import cli, step
from cvae_dist.model import LossParts, vae_loss


def main(argv: list[str]) -> int:
    fault, a, b, *rest = argv
    rank = int(os.environ.get("RANK", "0"))
    calls = 0

    def faulty_loss(out, x) -> LossParts:
        nonlocal calls
        calls += 1
        parts = vae_loss(out, x)
        if fault == "nan" and calls == int(a) and rank == int(b):
            return LossParts(parts.total * math.nan, parts.reconstruction, parts.kl)
        if fault == "slow" and rank == int(a):
            time.sleep(float(b))
        return parts

    if fault not in ("nan", "slow"):
        raise SystemExit(f"unknown fault {fault!r}; accepted: nan, slow")
    step.vae_loss = faulty_loss
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
