#!/usr/bin/env bash
# grok1 on one GPU (H100 / H200): Grok-1 width (d 6144, ffn 32768, 48/8 heads, vocab 131072),
# 2 layers instead of 64, bfloat16; prints MBU (decode) and MFU (prefill) among the other figures.
#
#   benchmarks/gpu.sh              # on the GPU machine (first run writes an ~11 GB checkpoint)
#   benchmarks/gpu.sh --dry-run    # anywhere: the same pipeline at tiny width, on whatever device
#
# Results go to benchmarks/.cache/gpu.json; copy the printed table into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

args=(--preset grok-1 --layers 2 --dtype bfloat16 --prefill 128 512 --batch 1 8 32
      --first-token 128 --context 128 --repeat 5)
if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    exec python benchmarks/bench.py "${args[@]}" --tiny --repeat 2 --json benchmarks/.cache/gpu-dry-run.json "$@"
fi

python - <<'PY'
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"gpu.sh needs a GPU, jax sees {jax.devices()} (use --dry-run to check the pipeline here)")
print("device:", jax.devices()[0].device_kind)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
exec python benchmarks/bench.py "${args[@]}" --json benchmarks/.cache/gpu.json "$@"
