"""The product probe: how fast XLA multiplies a few rows by a weight, per weight layout.

    python benchmarks/products.py              # the table (about a minute)
    python benchmarks/products.py --json out.json

Sixteen weights of [5464, 1024] (one bench-1b expert matrix each) are multiplied in one jitted
call by 1, 2, 8 or 16 rows; the figure is weight parameters read per second (G params/s, each
weight counted once per call, whatever the row count), the median of several calls. Rows:

- `int8 [out, in], one-row products`: grok1/kernels/xla.py's form for up to 16 rows: each row its own
  `row @ dequantise(w).T`, closed by an optimization barrier (the layout grok1 loads).
- `int8 [out, in], one product`: the same weight, all rows in one product.
- `int8 [out, in], product then add`: one row, the product feeding an add in the same fusion
  (no barrier): how XLA:CPU emits a product whose consumer it fuses.
- `bfloat16 [out, in], one-row products`: the embedding table's form for the output projection.
- `float32 [out, in], one product`: the float32 layout grok1 used before (7x the checkpoint).
- `int8 [in, out], one product`: the checkpoint's stored layout used as is.

Timings move with other processes: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import write_atomically  # benchmarks/bench.py, beside this script

OUT, IN, WEIGHTS = 5464, 1024, 16
ROWS = (1, 2, 8, 16)
barrier = jax.lax.optimization_barrier


def one_row_products(rows: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.concatenate([barrier(jnp.dot(rows[i:i + 1], w.astype(jnp.float32).T))
                            for i in range(rows.shape[0])])


FORMS: dict[str, tuple[str, bool, Callable[[jax.Array, jax.Array], jax.Array]]] = {
    # name: (weight dtype, stored transposed as [in, out], product)
    "int8 [out, in], one-row products": ("int8", False, one_row_products),
    "int8 [out, in], one product": ("int8", False, lambda x, w: barrier(jnp.dot(x, w.astype(jnp.float32).T))),
    "int8 [out, in], product then add": ("int8", False, lambda x, w: jnp.dot(x, w.astype(jnp.float32).T) + 1.0),
    "bfloat16 [out, in], one-row products": ("bfloat16", False, one_row_products),
    "float32 [out, in], one product": ("float32", False, lambda x, w: barrier(jnp.dot(x, w.T))),
    "int8 [in, out], one product": ("int8", True, lambda x, w: barrier(jnp.dot(x, w.astype(jnp.float32)))),
}


def weights(dtype: str, stored: bool, seed: int = 0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(WEIGHTS):
        w = rng.integers(-127, 128, (OUT, IN)).astype(np.float32)
        w = w.T.copy() if stored else w
        out.append(jnp.asarray(w, dtype))
    return out


def g_params_per_s(form: Callable, ws: list[jax.Array], rows: int, repeat: int) -> float:
    x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, IN)), jnp.float32)
    call = jax.jit(lambda x, ws: [form(x, w) for w in ws])
    jax.block_until_ready(call(x, ws))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(call(x, ws))
        times.append(time.perf_counter() - start)
    return WEIGHTS * OUT * IN / statistics.median(times) / 1e9


def run(repeat: int) -> dict:
    load_start = os.getloadavg()
    table = {}
    for name, (dtype, stored, form) in FORMS.items():
        ws = weights(dtype, stored)
        counts = (1,) if "then add" in name else ROWS
        table[name] = {str(r): round(g_params_per_s(form, ws, r, repeat), 2) for r in counts}
        del ws
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "jax": jax.__version__, "backend": jax.default_backend(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "g_params_per_s": table}


def format_table(result: dict) -> str:
    lines = [f"products of rows x {WEIGHTS} weights [{OUT}, {IN}], G params/s "
             f"({result['machine']}, jax {result['jax']}, {result['backend']}, {result['date_utc']}, "
             f"load {result['load_average'][0]} -> {result['load_average'][1]})", "",
             "| layout, form | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in ROWS) + " |",
             "|---|" + "---|" * len(ROWS)]
    for name, figures in result["g_params_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(str(figures.get(str(r), "")) for r in ROWS) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="calls timed per figure (median)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    result = run(args.repeat)
    print(format_table(result))
    if args.json:
        write_atomically(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
