#!/usr/bin/env bash
# Build .venv with cvae-dist and everything it needs (torch, accelerate, DeepSpeed, W&B, datasets, test tools).
# Idempotent: a second run only checks a stamp and returns in well under a second. A .venv left half-built (no pip)
# is rebuilt. DeepSpeed is built from source; if that fails the rest still works (its launches refuse, saying so).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [[ -z $python ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: error: needs Python 3.11 or newer (found: ${python:-no python3}$([[ -n $python ]] && "$python" -V 2>&1 | sed 's/^/, /')); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
stamp=.venv/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    exit 0
fi
if [[ -d .venv ]] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv is incomplete (no working pip): rebuilding it"
    rm -rf .venv
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first (a CUDA build that also runs on CPU), then DeepSpeed, which compiles against it
# (--no-build-isolation, or its build may fetch another torch).
.venv/bin/python -m pip install -q -e '.[dev]'
if ! .venv/bin/python -m pip install -q --no-build-isolation -e '.[deepspeed,dev]'; then
    echo "setup: warning: DeepSpeed did not install (see above); everything else works, DeepSpeed launches will refuse" >&2
fi
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
