#!/usr/bin/env bash
# grok1 on one GPU (H100 / H200), everything the accelerator path must show, in one run:
#   1. the golden, sampler, layout and quantisation tests on the GPU;
#   2. benchmarks/gpu_kernels.py: product forms and MoE kernels at Grok-1's shapes, the Pallas
#      grouped expert kernel (grok1/kernels/ragged.py) beside XLA's products and paths;
#   3. benchmarks/bench.py at Grok-1 width (d 6144, ffn 32768, 48/8 heads, vocab 131072) with
#      2 layers instead of 64, bfloat16, int8 weights resident: MBU (decode), MFU (prefill),
#      peak device memory, first-call (compile) times; the MoE layers through the Pallas kernel
#      (GROK1_PALLAS=1; opt-in until this run shows it ahead). With GPU_XLA_BENCH=1, then again
#      through XLA's paths (the default), decode batch 1 and 8 and prefill 2048 (gpu-bench-xla.json).
#
#   benchmarks/gpu.sh              # on the GPU machine (the first run writes an ~11 GB checkpoint)
#   benchmarks/gpu.sh --dry-run    # anywhere: the same pipeline at a small width, on any device
#
# Results: benchmarks/.cache/gpu-{tests.log,kernels.json,bench.json} (GPU_OUT=folder: there).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${GPU_OUT:-benchmarks/.cache}"
mkdir -p "$out" benchmarks/.cache
# bench.py measures the machine's limits in a second process: each must not take 75% of the
# GPU's memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

bench=(--preset grok-1 --layers 2 --dtype bfloat16 --prefill 128 512 2048 --batch 1 8 32
       --first-token 128 --context 128 --repeat 5)
xla_bench=(--preset grok-1 --layers 2 --dtype bfloat16 --prefill 2048 --batch 1 8 --sampled --first-token
           --context 128 --repeat 5)
if [[ "${1:-}" == "--dry-run" ]]; then
    "$py" benchmarks/gpu_kernels.py --small --repeat 2 --json "$out/gpu-kernels-dry-run.json" || exit 1
    if [[ "${GPU_XLA_BENCH:-0}" == 1 ]]; then
        GROK1_PALLAS=0 "$py" benchmarks/bench.py "${xla_bench[@]}" --tiny --repeat 2 \
            --json "$out/gpu-xla-dry-run.json" || exit 1
    fi
    GROK1_PALLAS=1 exec "$py" benchmarks/bench.py "${bench[@]}" --tiny --repeat 2 --json "$out/gpu-dry-run.json"
fi

"$py" - <<'PY' || exit 1
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"gpu.sh needs a GPU, jax sees {jax.devices()} (use --dry-run to check the pipeline here)")
print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
status=0
# The benchmark's checkpoint (~11 GB, a minute or two of host work) is written meanwhile.
"$py" - "${bench[@]}" <<'PY' > "$out/gpu-checkpoint.log" 2>&1 &
import sys
sys.path.insert(0, "benchmarks")
import bench
bench.bench_checkpoint(*bench.bench_config(bench.parse_args(sys.argv[1:])))
PY
writer=$!
echo "== 1. tests on the GPU"
# Compilation dominates these tests: several workers where pytest-xdist is installed.
workers=(); "$py" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-6}")
timeout "${GPU_TESTS_S:-200}" "$py" -m pytest -v -rf --tb=line -p no:cacheprovider "${workers[@]}" \
    tests/test_model.py tests/test_sampler.py tests/test_layout.py tests/test_quant.py tests/test_ragged.py 2>&1 \
    | tee "$out/gpu-tests.log" | grep -v -e PASSED -e PytestBenchmarkWarning -e "warner(" | tail -25
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
echo "== 2. product forms and MoE kernels"
timeout "${GPU_KERNELS_S:-200}" "$py" benchmarks/gpu_kernels.py --json "$out/gpu-kernels.json" || status=1
echo "== 3. the model at Grok-1 width, 2 layers"
wait $writer || { cat "$out/gpu-checkpoint.log"; status=1; }
GROK1_PALLAS=1 timeout "${GPU_BENCH_S:-300}" "$py" benchmarks/bench.py "${bench[@]}" --json "$out/gpu-bench.json" \
    | sed -n '1,/^{/p' || status=1
if [[ "${GPU_XLA_BENCH:-0}" == 1 ]]; then
    echo "== 3b. the same model through XLA's MoE paths (the default, GROK1_PALLAS=0)"
    GROK1_PALLAS=0 timeout "${GPU_XLA_BENCH_S:-200}" "$py" benchmarks/bench.py "${xla_bench[@]}" \
        --json "$out/gpu-bench-xla.json" | sed -n '1,/^{/p' || status=1
fi
exit $status
