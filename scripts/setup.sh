#!/usr/bin/env bash
# Build .venv with cvae-dist and everything it needs (torch, accelerate, DeepSpeed, W&B, datasets, test tools).
# Idempotent: a second run only checks a stamp and returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first (a CUDA build that also runs on CPU), then DeepSpeed, which compiles against it
# (--no-build-isolation, or its build may fetch another torch).
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -m pip install -q --no-build-isolation -e '.[deepspeed,dev]'
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
