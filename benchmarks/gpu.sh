#!/usr/bin/env bash
# Device benchmark of the Triton kernels (issue 16) on a CUDA GPU: the sparse prefill kernel vs
# SDPA (and flash_attn when installed) at 32k and 128k keys, alpha = 0.9 patterns, and decode over
# a Phase 2 view; one JSON object (docs/benchmarks.md, "GPU kernels"). Needs torch with CUDA and
# the gpu extra (pip install -e '.[gpu]'). Extra arguments go to benchmarks/gpu_kernels.py.
#   bash benchmarks/gpu.sh                      # -> docs/results/gpu-kernels.json
#   OUT=runs/h200.json bash benchmarks/gpu.sh --N 131072 --repeat 10
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/results/gpu-kernels.json}
"$PY" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("no CUDA device: torch.cuda.is_available() is False (a CPU-only torch build, or no GPU)")'
"$PY" -c 'import triton' 2>/dev/null || { echo "Triton is not installed: pip install -e '.[gpu]'" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
mkdir -p "$(dirname "$OUT")"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_kernels.py --out "$OUT" "$@"
echo "wrote $OUT" >&2
