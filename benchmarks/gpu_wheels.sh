#!/usr/bin/env bash
# Fill .gpu/whl with the wheels a lent GPU machine lacks, so the project runs there from source (no network there):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# That machine (Python 3.12) already has torch 2.11.0+cu130, torchvision 0.26.0, accelerate, transformers,
# huggingface-hub, pyarrow, pandas, pillow, numpy, pyyaml, packaging, psutil, tqdm, safetensors, filelock, jinja2,
# sympy, networkx. It lacks datasets, omegaconf and DeepSpeed; this set is those plus their dependency closure minus
# what is there. wandb and pytest are left out on purpose: the GPU check runs with log.wandb=disabled and without
# pytest.
# Run from the repo root on a machine that reaches PyPI, after scripts/setup.sh (DeepSpeed, an sdist, is built into a
# pure-Python wheel, no compiled ops, with .venv's pip and torch). Pins are the versions in .venv.
#   GPU_WHEELS_PYTHON  target Python version (default 3.12; 3.11 makes a twin set to test on this machine)
#   GPU_WHEELS_DIR     output folder (default .gpu/whl); its *.whl are replaced whenever the set is (re)built
# Idempotent: a stamp in the folder (this script's hash + the Python version) skips a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
pyv=${GPU_WHEELS_PYTHON:-3.12}
dest=${GPU_WHEELS_DIR:-.gpu/whl}
pip=(python3 -m pip)

# name==version, as pip download takes them. Keep one version of each.
wheels=(
    datasets==5.2.0          # needs dill, multiprocess, xxhash, fsspec (+ pyarrow, pandas, numpy, hub ... already there)
    dill==0.4.1
    multiprocess==0.70.19    # a per-Python wheel (py311 / py312)
    xxhash==4.1.0
    fsspec==2026.9.0         # datasets pins fsspec<=2026.9.0: carried so the machine's own version does not matter
    omegaconf==2.4.0         # vendors its antlr4 runtime: needs only PyYAML
    hjson==3.1.0             # from here on: DeepSpeed's dependencies
    py-cpuinfo==9.0.0
    einops==0.8.2
    msgpack==1.2.4
    ninja==1.13.2            # DeepSpeed's JIT op builds (e.g. the CPU shm op)
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic needs >=4.16.0; the machine's may be older
)
deepspeed=deepspeed==0.19.8

want=$( (cat "$0"; echo "$pyv") | sha256sum | cut -c1-16)
stamp=$dest/.stamp
size() { du -ch "$dest"/*.whl | tail -1 | cut -f1; }
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && compgen -G "$dest/deepspeed-*.whl" >/dev/null; then
    echo "gpu_wheels: $dest is up to date for Python $pyv ($(ls "$dest"/*.whl | wc -l) wheels, $(size))"
    exit 0
fi
if [[ ! -x .venv/bin/pip ]] || ! .venv/bin/python -c 'import torch, setuptools' 2>/dev/null; then
    echo "gpu_wheels: error: needs .venv with torch to build DeepSpeed's wheel: run scripts/setup.sh first" >&2
    exit 2
fi

mkdir -p "$dest"
rm -f "$dest"/*.whl "$stamp"
echo "gpu_wheels: downloading ${#wheels[@]} wheels for CPython $pyv manylinux x86_64 into $dest"
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
echo "gpu_wheels: building $deepspeed (pure Python, no compiled ops)"
env -u DS_BUILD_OPS .venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$dest" "$deepspeed"

# One wheel per package, and nothing else.
n=$(ls "$dest"/*.whl | wc -l)
if (( n != ${#wheels[@]} + 1 )); then
    echo "gpu_wheels: error: expected $(( ${#wheels[@]} + 1 )) wheels in $dest, found $n:" >&2
    ls "$dest" >&2
    exit 1
fi
echo "$want" > "$stamp"
ls -1 "$dest"/*.whl | sed 's|.*/|  |'
echo "gpu_wheels: $n wheels for Python $pyv in $dest, $(size) in all"
