#!/usr/bin/env bash
# The GPU check of issues 13 and 14, as one script for a lent GPU machine (see the README's GPU section): the gpu
# tests, the bench at batch 128 and 2048 (hand eager, hand as one CUDA graph, trainer eager and graph mode), the recipe
# for 10 epochs in fp32 and bf16 with graphs on and off, and DeepSpeed ZeRO 1/2/3 in bf16 for 2 epochs.
# Every step has its own timeout and its full log under $OUT (default benchmarks/gpu-<time>).
#
# On a machine without the project's .venv (the lent machines have torch and accelerate only), carry the missing
# wheels in .gpu/whl (datasets, omegaconf, deepspeed, wandb ...) and this script installs them into /tmp/site.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=python3
if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
elif compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
LAUNCH="$PY -m accelerate.commands.launch"
tag=$(date +%H%M%S)  # fresh run names on a machine still warm from an earlier call
log() { echo "$*" | tee -a "$OUT/log.txt"; }
step() {  # step NAME SECONDS COMMAND...: run with a timeout, full output in $OUT/NAME.txt, its rc in the log
    local name=$1 secs=$2
    shift 2
    log "== $name: $*"
    timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
    log "rc=$? ($name)"
    grep -E "^epoch|error|Error" "$OUT/$name.txt" | tail -12 | tee -a "$OUT/log.txt"
}
nvidia-smi -L | tee "$OUT/log.txt"
TRAIN=(-m cvae_dist.cli train --config configs/mnist_5k.yaml log.wandb=disabled output_dir=/tmp/gpu-runs)
step gpu_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
step bench_b128 200 "$PY" -m cvae_dist.cli bench --trials 3 --seconds 2 --json "$OUT/bench_b128.json"
step bench_b2048 200 "$PY" -m cvae_dist.cli bench --trials 3 --seconds 2 --batch 2048 --precisions bf16 \
    --sections compare,data --json "$OUT/bench_b2048.json"
for p in fp32 bf16; do
    step "train_${p}_graph" 150 $LAUNCH --config_file launch/ddp_gpu.yaml --num_processes 1 "${TRAIN[@]}" \
        train.epochs=10 "train.precision=$p" "run_name=$p-graph-$tag"
done
step train_bf16_eager 150 $LAUNCH --config_file launch/ddp_gpu.yaml --num_processes 1 "${TRAIN[@]}" \
    train.epochs=10 train.precision=bf16 train.cuda_graph=false "run_name=bf16-eager-$tag"
for z in 1 2 3; do
    step "zero${z}_bf16" 150 $LAUNCH --config_file "launch/deepspeed_zero$z.yaml" --num_processes 1 "${TRAIN[@]}" \
        train.epochs=2 train.precision=bf16 "run_name=zero$z-$tag"
done
log "done: $OUT"
