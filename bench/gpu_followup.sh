#!/usr/bin/env bash
# The second prepared GPU run of a loan (after bench/gpu_suite.sh): the launch-configuration sweep of the
# decode kernels and the transient-dense prefill paths (bench/gpu_decode_sweep.py), then the training
# kernels at Llama-7B MLP shapes (bench/gpu_training.py --shapes 7b). About 6 minutes on an H200.
# Writes into $OUT (the device tool's folder) or bench/results/gpu_run/:
#   gpu_decode_sweep.json, gpu_training_7b.json, followup.log
#
#   device run:  bash bench/gpu_followup.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_step.sh
log="$OUT/followup.log"
step sweep 330 "$PY" bench/gpu_decode_sweep.py --out "$OUT/gpu_decode_sweep.json"
step train_7b 90 env GPU_TRAINING_OUT="$OUT/gpu_training_7b.json" "$PY" bench/gpu_training.py --shapes 7b --skip-check
echo "done $(date -u +%T)" | tee -a "$log"
