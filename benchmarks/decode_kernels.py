"""The native kernel on a bench-1b batch-1 decode step's shapes: the int8 experts and the table.

    python benchmarks/decode_kernels.py                          # this checkout's kernels
    python benchmarks/decode_kernels.py --flags=-DGROK1_ROW_PREFETCH=8192   # a compile-time variant
    python benchmarks/decode_kernels.py --sources /tmp/old/grok1/kernels    # another tree's sources

One process times one build of the kernels' sources (grok1.kernels.native builds it on first
use, its library named by a hash of the sources and flags, so variants do not overwrite each
other). Compare variants by alternating processes (A, B, A, B, ...): this VM's memory bandwidth
moves from one process to the next.

- experts: 4 layers, each through `rows_times` as a batch-1 step runs them: gate and up
  [8 experts, 1 chunk, 5464, 1024] and down [8, 8 chunks, 1024, 683], int8 with bfloat16 block
  scales, 2 rows (one token's top-2 experts). Every layer has weights of its own (4 x 134 MB in
  all), so no call finds its weight in the 32 MiB L3 the previous call left behind.
- table: one row times the bfloat16 table [131072, 1024] (the output projection), 268 MB.

Printed: milliseconds per call (median of `--repeat` calls, best of `--rounds` rounds) and the
bytes read per second.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import median_seconds  # noqa: E402 - benchmarks/bench.py, beside this script

LAYERS = 4
EXPERTS, EMB, FFN, DOWN_CHUNKS = 8, 1024, 5464, 8
VOCAB = 131072


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flags", default="", help="extra compiler flags, space-separated")
    parser.add_argument("--sources", default=None,
                        help="a folder holding cpu_products.cc, cpu_attention.cc and cpu_common.h")
    parser.add_argument("--repeat", type=int, default=15, help="calls timed per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the best is printed)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from grok1.kernels import native

    native.FLAGS = native.FLAGS + tuple(args.flags.split())
    if args.sources:
        folder = pathlib.Path(args.sources)
        missing = [name for name in ("cpu_products.cc", "cpu_attention.cc", "cpu_common.h")
                   if not (folder / name).is_file()]
        if missing:
            sys.exit(f"decode_kernels.py: {folder} lacks {', '.join(missing)}")
        native.SOURCES = (folder / "cpu_products.cc", folder / "cpu_attention.cc")
        native.HEADERS = (folder / "cpu_common.h",)
    if not native.available():
        sys.exit(f"decode_kernels.py: the native kernels are unavailable: {native.unavailable_reason()}")

    rng = np.random.default_rng(0)

    def int8(shape):
        return jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8))

    gate = [int8((EXPERTS, 1, FFN, EMB)) for _ in range(LAYERS)]
    up = [int8((EXPERTS, 1, FFN, EMB)) for _ in range(LAYERS)]
    down = [int8((EXPERTS, DOWN_CHUNKS, EMB, FFN // DOWN_CHUNKS)) for _ in range(LAYERS)]
    gate_scales = jnp.ones((EXPERTS, 1, FFN), jnp.bfloat16)
    down_scales = jnp.ones((EXPERTS, 1, EMB), jnp.bfloat16)
    table = jnp.asarray(rng.standard_normal((1, 1, VOCAB, EMB), dtype=np.float32)).astype(jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, EMB), dtype=np.float32))
    hidden = jnp.asarray(rng.standard_normal((2, FFN), dtype=np.float32))
    chosen = jnp.array([1, 5], jnp.int32)  # one token's two experts

    @jax.jit
    def experts(x, hidden, gate, up, down):
        for layer in range(LAYERS):  # each call depends on the last, as in a step
            g = native.rows_times(x, chosen, gate[layer], gate_scales)
            u = native.rows_times(x + g[:, :1], chosen, up[layer], gate_scales)
            x = x + native.rows_times(hidden + u[:, :1], chosen, down[layer], down_scales)
        return x

    @jax.jit
    def output_projection(x, table):
        return native.rows_times(x[:1], jnp.zeros((1,), jnp.int32), table, None)

    expert_bytes = LAYERS * 2 * 3 * FFN * EMB
    table_bytes = VOCAB * EMB * 2
    def run_experts():
        jax.block_until_ready(experts(x, hidden, gate, up, down))

    def run_table():
        jax.block_until_ready(output_projection(x, table))

    rounds = [(median_seconds(run_experts, args.repeat), median_seconds(run_table, args.repeat))
              for _ in range(args.rounds)]
    experts_s = min(r[0] for r in rounds)
    table_s = min(r[1] for r in rounds)
    label = (args.sources or "this checkout") + (f" {args.flags}" if args.flags else "")
    print(f"{label}: experts {experts_s * 1e3:.2f} ms ({expert_bytes / experts_s / 1e9:.1f} GB/s), "
          f"table {table_s * 1e3:.2f} ms ({table_bytes / table_s / 1e9:.1f} GB/s), "
          f"load {os.getloadavg()[0]:.2f}")
    return {"experts_s": experts_s, "table_s": table_s}


if __name__ == "__main__":
    main()
