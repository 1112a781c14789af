#!/usr/bin/env bash
# Set up (idempotent) and run the tests.
#   bash scripts/test.sh           everything, what CI runs: ruff (lint and format), the GPU check's CPU dry run, the
#                                  tests of `auto` precision with `auto` answered the other way (as on a CPU with /
#                                  without fast bf16);
#                                  then the whole suite: real multi-process launches, DeepSpeed, and (as root) a local
#                                  Slurm cluster that the tests install (apt) and start
#   bash scripts/test.sh --quick   tests/unit and tests/integration: in process, no launches, no Slurm (everyday work)
# Further arguments go to pytest alone, e.g. bash scripts/test.sh tests/unit/test_data.py -k resident
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ ${1:-} == --quick ]]; then
    shift
    exec .venv/bin/python -m pytest -q tests/unit tests/integration "$@"
fi
if [[ $# -eq 0 ]]; then
    .venv/bin/ruff check . && .venv/bin/ruff format --check .
    OUT=$(mktemp -d) bash benchmarks/gpu_check.sh --dry-run
    other=$(.venv/bin/python -c 'from cvae_dist.distributed import hardware_bf16; print(0 if hardware_bf16("cpu") else 1)')
    echo "test.sh: the auto_precision tests as on a CPU $([[ $other == 1 ]] && echo with || echo without) fast bf16"
    CVAE_DIST_FAST_BF16=$other .venv/bin/python -m pytest -q -p no:cacheprovider -m auto_precision
fi
exec .venv/bin/python -m pytest -q "$@"
