#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine, or its CPU dry run:
#   bash benchmarks/gpu_check.sh             on the GPU machine: at most 8 minutes; log.txt, results.json and
#                                            logs.tar.gz in $OUT (unset: benchmarks/gpu-<date>-<time>)
#   bash benchmarks/gpu_check.sh --dry-run   on a CPU (CI runs this): every check with tiny sizes
# With the project's .venv it runs there; without one (the lent machine has torch and accelerate, not datasets,
# omegaconf or DeepSpeed) it installs the wheels `bash benchmarks/gpu_wheels.sh` put in .gpu/whl (carry `.gpu`)
# into /tmp/site and runs from source.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}
if [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
elif compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # (PATH: the carried ninja, for DeepSpeed's JIT ops)
    py=python3
else
    echo "gpu_check: error: no .venv and no .gpu/whl: run scripts/setup.sh, or bring the wheels (benchmarks/gpu_wheels.sh)" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L
exec "$py" benchmarks/gpu_check.py --out "$out" "$@"
