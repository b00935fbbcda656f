#!/usr/bin/env bash
# The one prepared GPU run (issues 12 and 17): correctness on CUDA, then the GEMM and training
# timings, side by side in one process per script. Meant for a short GPU loan (about 8 minutes on
# an H100 / H200). Writes into $OUT (the device tool's folder) or bench/results/gpu_run/:
#   gpu_info.txt        GPU, driver, torch / triton versions
#   check.log           bench/gpu_gemm.py --check (ops vs reference on awkward shapes, 3 dtypes)
#   gpu_gemm_graph.json bench/gpu_gemm.py --graph: cuBLAS, dense Triton, 2:4, bitmap 50/70%,
#                       torch semi-structured, the opt-in semi-structured dispatch; 4096x4096,
#                       11008x4096, 4096x11008; M in {1, 2, 4, 16, 256, 4096}; fp16 and bf16
#   train_step.json     bench/train_step.py on CUDA, fp32 and bf16
#   gpu_training.json   bench/gpu_training.py (training-kernel correctness + timings)
#   op_overhead_cuda.json bench/op_overhead.py: host time of a SmolLM2-size training call through the
#                       eager autograd.Function against the custom op (stop 33), and raw torch
#   suite.log           everything printed
# Afterwards: copy the JSON files to bench/results/, refit the audit on them
# (python bench/sass_audit.py --write-fit-basis, see docs/sass_audit.md) and replace the
# predictions in the README with the measured ratios.
#
#   device run:  bash bench/gpu_suite.sh          (the device tool sets $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_step.sh
log="$OUT/suite.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/gpu_info.txt" 2>&1
step check 90 "$PY" bench/gpu_gemm.py --check
cp "$log" "$OUT/check.log"
step gemm 270 "$PY" bench/gpu_gemm.py --graph --ms 1 2 4 16 256 4096 --out "$OUT/gpu_gemm_graph.json"
step train_step 60 "$PY" bench/train_step.py --devices cuda --dtypes float32 bfloat16 --out "$OUT/train_step.json"
step gpu_training 90 env GPU_TRAINING_OUT="$OUT/gpu_training.json" "$PY" bench/gpu_training.py
step op_overhead 40 "$PY" bench/op_overhead.py --device cuda --m 512 --n 1536 --k 576 --rounds 5 \
    --out "$OUT/op_overhead_cuda.json"
echo "done $(date -u +%T)" | tee -a "$log"
