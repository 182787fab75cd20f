#!/usr/bin/env bash
# Device benchmark of the Triton kernels (issue 16) on a CUDA GPU: the sparse prefill kernel vs
# SDPA (and flash_attn when installed) at 32k and 128k keys, alpha = 0.9 patterns, and decode over
# a Phase 2 view; one JSON object (docs/benchmarks.md, "GPU kernels"). Needs torch with CUDA and
# the gpu extra (pip install -e '.[gpu]'). Extra arguments go to benchmarks/gpu_kernels.py.
#   bash benchmarks/gpu.sh                      # -> docs/results/gpu-kernels.json (+ -e2e-*.json)
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
# End to end on the device (E2E=0 skips): time to first token of a single long prompt and of a
# later turn (history + new input, KV reused), and decode TPOT, dense vs loopserve, on MODEL: a
# local Hugging Face folder, or by default a random-weight model with Llama-3.1-8B's shape
# (no hub is reachable; timings depend on shapes only). bf16 (--dtype auto on CUDA).
if [ "${E2E:-1}" = 1 ]; then
  MODEL=${MODEL:-random-llama3-8b}
  CTX=${CTX:-32768}
  run() { PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m loopserve.cli "$@"; }
  run bench prefill --device cuda --model "$MODEL" --context "$CTX" --history $((CTX * 3 / 4)) --new $((CTX / 4)) \
      --runs 3 --json > "${OUT%.json}-e2e-prefill.json"
  echo "wrote ${OUT%.json}-e2e-prefill.json" >&2
  run bench decode --device cuda --model "$MODEL" --context $((CTX - 256)) --budget 1024 --tokens 64 --runs 3 \
      --json > "${OUT%.json}-e2e-decode.json"
  echo "wrote ${OUT%.json}-e2e-decode.json" >&2
fi
