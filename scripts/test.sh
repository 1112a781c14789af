#!/usr/bin/env bash
# Set up (idempotent) and run the tests.
#   bash scripts/test.sh           everything, what CI runs: real multi-process launches, DeepSpeed, and (as root)
#                                  a local Slurm cluster that the tests install (apt) and start
#   bash scripts/test.sh --quick   the in-process tests only: no launches, no Slurm (for everyday work)
# Further arguments go to pytest, e.g. bash scripts/test.sh tests/test_data.py -k resident
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ ${1:-} == --quick ]]; then
    shift
    set -- -m "not multiprocess and not slurm and not gpu" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
