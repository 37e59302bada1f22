"""The native kernel (grok1/kernels/native.py) against XLA's forms, timed back to back in one process.

    python benchmarks/native_products.py              # the tables (a few minutes)
    python benchmarks/native_products.py --json out.json

Each figure is the median of several warm calls of one jitted function; the native form and the
XLA forms of one case are called in turn (A, B, A, B, ...), so a change in the machine's load
touches both. G params/s counts each weight element once per call, whatever the row count.

(a) rows x 16 int8 weights [5464, 1024] (one bench-1b expert matrix each: C=1, B=1)
(b) rows x 16 int8 down projections [1024, 5464] (C=8 chunks of R=683, B=1)
(c) rows x the bfloat16 embedding table [131072, 1024] (the output projection)
(d) a decode step of batch 8, top-2: 16 (token, expert) pairs over 8 experts, each through
    gelu(x @ w) * (x @ v) @ w1 with int8 weights [5464, 1024] and [1024, 5464]
(e) a copy check: one expert's matrix of a stack (closed over, or a jit argument) passed as
    a slice vs the whole stack plus an index

XLA forms: "XLA one-row products" is grok1/kernels/products.py's `linear` today (each row its own
matrix-vector product, fenced by barriers, each reading the weight again); "XLA one product"
is benchmarks/products.py's form with all rows in one product. Timings move with other
processes: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grok1.kernels import experts as grok_experts  # noqa: E402
from grok1.kernels import native  # noqa: E402
from grok1.kernels import linear  # noqa: E402
from grok1.weights.layout import LinearWeight  # noqa: E402
from bench import write_atomically  # noqa: E402 - benchmarks/bench.py, beside this script

barrier = jax.lax.optimization_barrier


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def time_in_turn(calls: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, called in turn `repeat` times
    after one warm-up call each."""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def int8_stack(rng: np.random.Generator, stack: int, n_out: int, n_in: int, run: int,
               scale_dtype=jnp.bfloat16) -> LinearWeight:
    """A LinearWeight [stack, n_in / run, n_out, run] of random int8 with one scale block."""
    values = rng.integers(-127, 128, (stack, n_in // run, n_out, run), dtype=np.int8)
    scales = rng.uniform(0.5, 1.5, (stack, 1, n_out)).astype(np.float32) / 127
    return LinearWeight(jnp.asarray(values), jnp.asarray(scales, scale_dtype))


def check(a: jax.Array, b: jax.Array, what: str) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(1e-30, np.abs(b).max())
    if err > 1e-4:
        raise AssertionError(f"{what}: native and XLA differ (max relative error {err:.2e})")


def stack_case(w: LinearWeight, rows: int, repeat: int, one_product: bool) -> dict:
    """`rows` rows (the same rows for every weight, as products.py) times every weight of the
    stack `w`: native (one call, all weights) vs XLA per weight."""
    stack, chunks, n_out, run = w.values.shape
    n_in = chunks * run
    x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, n_in)), jnp.float32)
    x_all = jnp.tile(x, (stack, 1))                                       # [stack * rows, n_in]
    index = jnp.repeat(jnp.arange(stack, dtype=jnp.int32), rows)
    nat = jax.jit(native.rows_times)
    xla_rows = jax.jit(lambda x, w: [linear(x, w[s], jnp.float32) for s in range(stack)])
    calls = {"native": lambda: nat(x_all, index, w.values, w.scales),
             "XLA one-row products": lambda: xla_rows(x, w)}
    if one_product:
        dense = [w.values[s, 0] for s in range(stack)]                    # products.py's [O, in]
        xla_one = jax.jit(lambda x, ws: [barrier(jnp.dot(x, v.astype(jnp.float32).T)) for v in ws])
        calls["XLA one product"] = lambda: xla_one(x, dense)
    check(calls["native"](), jnp.concatenate(calls["XLA one-row products"]()), "stack case")
    seconds = time_in_turn(calls, repeat)
    return {name: {"ms": round(s * 1e3, 3), "g_params_per_s": round(stack * n_out * n_in / s / 1e9, 2)}
            for name, s in seconds.items()}


def table_case(rows: int, repeat: int, table: jax.Array) -> dict:
    """`rows` rows times the bfloat16 table [V, d] (values [1, 1, V, d])."""
    _, _, vocab, d = table.shape
    x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, d)), jnp.float32)
    index = jnp.zeros((rows,), jnp.int32)
    nat = jax.jit(native.rows_times)
    xla = jax.jit(lambda x, t: linear(x, LinearWeight(t[0]), jnp.float32))
    calls = {"native": lambda: nat(x, index, table), "XLA one-row products": lambda: xla(x, table)}
    check(calls["native"](), calls["XLA one-row products"](), "table case")
    seconds = time_in_turn(calls, repeat)
    return {name: {"ms": round(s * 1e3, 3), "g_params_per_s": round(vocab * d / s / 1e9, 2)}
            for name, s in seconds.items()}


def native_pairs(x: jax.Array, gates: jax.Array, chosen: jax.Array,
                 weights: tuple[LinearWeight, LinearWeight, LinearWeight]) -> jax.Array:
    """experts.chosen_pairs' sum with the native kernel: all pairs in one call per matrix."""
    n, k = chosen.shape
    index = chosen.reshape(-1).astype(jnp.int32)
    rows = jnp.repeat(x, k, axis=0)
    w, v, w1 = weights
    h = (jax.nn.gelu(native.rows_times(rows, index, w.values, w.scales))
         * native.rows_times(rows, index, v.values, v.scales))
    y = native.rows_times(h, index, w1.values, w1.scales)
    return (y * gates.reshape(-1, 1)).reshape(n, k, -1).sum(axis=1)


def decode_case(repeat: int) -> dict:
    """A decode step's experts: batch 8, top-2 of 8 experts (16 pairs)."""
    rng = np.random.default_rng(3)
    d, ffn, experts, batch, k = 1024, 5464, 8, 8, 2
    weights = (int8_stack(rng, experts, ffn, d, d), int8_stack(rng, experts, ffn, d, d),
               int8_stack(rng, experts, d, ffn, 683))
    x = jnp.asarray(rng.standard_normal((batch, d)), jnp.float32)
    gates = jnp.asarray(rng.uniform(0.2, 0.8, (batch, k)), jnp.float32)
    chosen = jnp.asarray(np.stack([rng.choice(experts, k, replace=False) for _ in range(batch)]),
                         jnp.int32)
    nat = jax.jit(native_pairs)
    xla = jax.jit(lambda x, g, c, ws: grok_experts.chosen_pairs(x, g, c, ws, jnp.float32))
    calls = {"native": lambda: nat(x, gates, chosen, weights),
             "XLA one-row products": lambda: xla(x, gates, chosen, weights)}
    check(calls["native"](), calls["XLA one-row products"](), "decode case")
    seconds = time_in_turn(calls, repeat)
    params = batch * k * 3 * d * ffn          # weight elements each pair reads (counted per pair)
    return {name: {"ms": round(s * 1e3, 3), "g_params_per_s_per_pair": round(params / s / 1e9, 2)}
            for name, s in seconds.items()}


def copy_case(repeat: int) -> dict:
    """One row times expert e of an int8 stack [8, 1, 5464, 1024] (45 MB), closed over or passed
    as an argument: given to the kernel as a slice values[e:e+1] (XLA materialises the slice as
    the custom call's operand: a 5.6 MB copy per call) vs the whole stack plus index e."""
    w = int8_stack(np.random.default_rng(4), 8, 5464, 1024, 1024)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 1024)), jnp.float32)
    e = jnp.int32(5)

    def sliced(x, e, w):
        values = jax.lax.dynamic_slice_in_dim(w.values, e, 1)
        scales = jax.lax.dynamic_slice_in_dim(w.scales, e, 1)
        return native.rows_times(x, jnp.zeros((1,), jnp.int32), values, scales)

    def indexed(x, e, w):
        return native.rows_times(x, jnp.full((1,), e, jnp.int32), w.values, w.scales)

    functions = {"closed over, slice": (jax.jit(lambda x, e: sliced(x, e, w)), (x, e)),
                 "closed over, whole stack + index": (jax.jit(lambda x, e: indexed(x, e, w)), (x, e)),
                 "argument, slice": (jax.jit(sliced), (x, e, w)),
                 "argument, whole stack + index": (jax.jit(indexed), (x, e, w))}
    calls = {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in functions.items()}
    for name in calls:
        check(calls[name](), calls["argument, whole stack + index"](), "copy case")
    out: dict = {}
    for name, (f, a) in functions.items():
        hlo = f.lower(*a).compile().as_text()
        call = next(line for line in hlo.splitlines() if "custom_call_target" in line)
        out[name] = {"custom call operand from a dynamic-slice": "dynamic-slice" in call
                     or "dynamic_slice" in call}
    for name, seconds in time_in_turn(calls, repeat).items():
        out[name]["ms"] = round(seconds * 1e3, 3)
    return out


def run(repeat: int) -> dict:
    if not native.available():
        raise SystemExit(f"native kernel unavailable: {native.unavailable_reason()}")
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "jax": jax.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_average_start": loadavg()}
    rng = np.random.default_rng(0)
    gate = int8_stack(rng, 16, 5464, 1024, 1024)
    result["a: 16 x int8 [5464, 1024]"] = {r: stack_case(gate, r, repeat, True) for r in (1, 2, 8, 16)}
    del gate
    down = int8_stack(rng, 16, 1024, 5464, 683)
    result["b: 16 x int8 [1024, 5464], C=8 R=683"] = {r: stack_case(down, r, repeat, False)
                                                       for r in (1, 2, 8, 16)}
    del down
    table = jnp.asarray(rng.standard_normal((1, 1, 131072, 1024), np.float32), jnp.bfloat16)
    result["c: bf16 table [131072, 1024]"] = {r: table_case(r, repeat, table) for r in (1, 8)}
    del table
    result["d: decode step, batch 8, 16 pairs over 8 experts"] = decode_case(repeat)
    result["e: copy check, 1 row x one expert of an [8, 5464, 1024] int8 stack"] = copy_case(repeat)
    result["load_average_end"] = loadavg()
    return result


def format_result(result: dict) -> str:
    lines = [f"native vs XLA ({result['machine']}, jax {result['jax']}, {result['date_utc']}, "
             f"load average {result['load_average_start']} -> {result['load_average_end']})"]
    for case, body in result.items():
        if not case[:2] in ("a:", "b:", "c:", "d:", "e:"):
            continue
        lines += ["", f"{case}", ""]
        if case.startswith(("a:", "b:", "c:")):
            forms = list(next(iter(body.values())))
            lines += ["| rows | " + " | ".join(f"{f}: ms, G params/s" for f in forms) + " |",
                      "|---|" + "---|" * len(forms)]
            for rows, figures in body.items():
                lines.append(f"| {rows} | " + " | ".join(
                    f"{figures[f]['ms']} ms, {figures[f]['g_params_per_s']}" for f in forms) + " |")
        else:
            for name, value in body.items():
                lines.append(f"- {name}: {value}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="calls timed per figure (median)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    result = run(args.repeat)
    print(format_result(result))
    if args.json:
        write_atomically(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
