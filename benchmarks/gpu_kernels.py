"""Products and MoE kernels at Grok-1's shapes on an accelerator: which weight form runs fastest,
and whether the grouped matmul (`jax.lax.ragged_dot`) computes only the chosen experts.

    python benchmarks/gpu_kernels.py                  # on a GPU (about a minute)
    python benchmarks/gpu_kernels.py --small          # anywhere: the same probe at a small width
    python benchmarks/gpu_kernels.py --json out.json

Ceilings first, measured here: device copy bandwidth (bytes read + written) and the bfloat16
matmul rate (8192^3). Then, in bfloat16 compute (float32 accumulation):

- Products of n rows (1, 8, 32, 2048) by one int8 weight with its scales, for Grok-1's expert
  matrices [6144 -> 32768] and [32768 -> 6144], each form named by how the weight is stored and
  what it is converted to inside the product: chunks of 1024 [out, chunk] converted to float32
  (grok1 before on every backend), `kernels.linear` on the layout grok1 loads here (one chunk on
  accelerators, converted to bfloat16: `kernels.product_dtype`), a row reduction instead of a
  product (up to 8 rows), the checkpoint's [in, out], and a bfloat16 weight (twice the bytes,
  no convert), and the Pallas grouped kernel (grok1/kernels/ragged.py) with all rows on one
  expert. Figures: ms, weight bytes read per second (GB/s, each weight once per product) and
  TFLOP/s.
- One MoE layer for n tokens (1, 8, 32, 512; 8 experts, top 2), layer 1 of a 2-layer stack
  picked by a traced index as the layer loop does: `experts.moe` (the path it chooses: the
  Pallas kernel on one GPU) and each of its paths forced, XLA's and the Pallas kernel's
  (`pallas_pairs`), and `ragged_dot` over the official [E, in, out] stack; GB/s counts the
  chosen experts' int8 bytes once per layer. Is the grouped
  matmul sparse? At decode sizes its time routed to 2 experts against all 8 says whether it
  reads only the chosen experts; at prompt sizes its time against the chosen experts'
  arithmetic and all experts' says whether it computes only the chosen ones (routing is no test
  there: the chosen arithmetic is the same either way).

Every figure is the median of several calls after a warm-up (`block_until_ready`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import median_seconds, random_int8, write_atomically  # noqa: E402  (benchmarks/bench.py, beside this script)
from grok1 import kernels  # noqa: E402
from grok1.kernels import experts, ragged  # noqa: E402
from grok1.weights import layout  # noqa: E402
from grok1.weights.quant import QuantizedWeight8bit  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of `fn()` after one warm-up call, waiting for its results."""
    return 1e3 * median_seconds(lambda: jax.block_until_ready(fn()), repeat)


def ceilings(small: bool, repeat: int) -> dict[str, float]:
    n = 2 ** 28 if not small else 2 ** 22                     # 1 GiB of float32
    x = jnp.arange(n, dtype=F32)
    copy = jax.jit(lambda x: x * 1.0001)
    copy_ms = median_ms(lambda: copy(x), repeat)
    m = 8192 if not small else 512
    a = jax.random.normal(jax.random.key(0), (m, m), BF16)
    b = jax.random.normal(jax.random.key(1), (m, m), BF16)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
    dot_ms = median_ms(lambda: dot(a, b), repeat)
    return {"copy_GBps": 2 * 4 * n / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * m ** 3 / dot_ms / 1e9}


def int8_weight(shape: tuple[int, ...], seed: int) -> QuantizedWeight8bit:
    """A random int8 weight [..., in, out] with one scale block, on the device (the compute
    layout is then made there, as on a mesh: quicker than on the host at these sizes)."""
    weight = random_int8(np.random.default_rng(seed), shape)
    scales = np.full((*shape[:-2], 1, shape[-1]), 0.01, np.float32).astype(jnp.bfloat16)
    return jax.device_put(QuantizedWeight8bit(weight=weight, scales=scales))


def product_forms(n_in: int, n_out: int, seed: int) -> dict[str, tuple[Callable, tuple, int]]:
    """name -> (f(x, *weights), weights, most rows) for x [n, n_in] @ w [n_in, n_out]."""
    stored = int8_weight((n_in, n_out), seed)
    chunked = layout.to_linear_weight(stored, n_in // min(n_in, layout.MAX_CHUNK))
    whole = layout.to_linear_weight(stored, 1)
    scale = stored.scales[0].astype(F32)
    w_in_out = stored.weight
    w_bf16 = (w_in_out.astype(F32) * scale).astype(BF16)

    def layout_product(to):
        def f(x, w):
            total = None
            for j in range(w.chunks):
                part = jnp.dot(x.astype(BF16)[:, j * w.chunk_size:(j + 1) * w.chunk_size],
                               w.values[j].astype(to).T, preferred_element_type=F32)
                total = part if total is None else total + part
            return total * w.scales[0].astype(F32)
        return f

    def multiply_and_sum(x, w):  # a row reduction per output instead of a product
        rows = x.astype(BF16).astype(F32)
        return jnp.sum(rows[:, None, :] * w.values[0].astype(F32)[None], axis=-1) * w.scales[0].astype(F32)

    many = 1 << 30
    one_expert = layout.to_linear_weight(jax.tree.map(lambda a: a[None], stored), layout.chunk_count(n_in))

    def pallas_kernel(x, w):  # all rows in expert 0's group of a 1-expert stack
        return ragged.pallas_ragged_linear(x, w, jnp.asarray([x.shape[0]], jnp.int32), None, BF16)

    return {
        "chunks of 1024 [out, chunk], int8 -> float32 (before)": (layout_product(F32), (chunked,), many),
        "kernels.linear on grok1's layout (one chunk here)": (
            lambda x, w: kernels.linear(x, w, BF16), (layout.to_linear_weight(stored, layout.chunk_count(n_in)),), many),
        "one chunk [out, in], multiply and sum": (multiply_and_sum, (whole,), 8),
        "stored [in, out], int8 -> bfloat16": (
            lambda x, w, s: jnp.dot(x.astype(BF16), w.astype(BF16), preferred_element_type=F32) * s,
            (w_in_out, scale), many),
        "bfloat16 weight [in, out] (2 bytes)": (
            lambda x, w: jnp.dot(x.astype(BF16), w, preferred_element_type=F32), (w_bf16,), many),
        "Pallas grouped kernel, one expert": (pallas_kernel, (one_expert,), many),
    }


def products(small: bool, rows: list[int], repeat: int) -> list[dict]:
    d, f = (6144, 32768) if not small else (256, 1024)
    results = []
    for name_shape, (n_in, n_out) in {f"gate [{d} -> {f}]": (d, f), f"down [{f} -> {d}]": (f, d)}.items():
        forms = product_forms(n_in, n_out, seed=n_in)
        reference = None
        for n in rows:
            x = jax.random.normal(jax.random.key(n), (n, n_in), F32)
            for name, (fn, weights, most_rows) in forms.items():
                if n > most_rows:
                    continue
                run = jax.jit(fn)
                y = run(x, *weights)
                if reference is None or reference[0] != n:
                    reference = (n, np.asarray(y, np.float64))
                err = float(np.linalg.norm(np.asarray(y, np.float64) - reference[1])
                            / np.linalg.norm(reference[1]))
                ms = median_ms(lambda: run(x, *weights), repeat)
                nbytes = n_in * n_out * (2 if "2 bytes" in name else 1)
                results.append({"matrix": name_shape, "rows": n, "form": name, "ms": ms,
                                "GBps": nbytes / ms / 1e6, "TFLOPs": 2 * n * n_in * n_out / ms / 1e9,
                                "rel_err_vs_first": err})
                print(f"{name_shape:<22}{n:>6}  {name:<50}{ms:>9.3f} ms {nbytes / ms / 1e6:>8.0f} GB/s "
                      f"{2 * n * n_in * n_out / ms / 1e9:>7.1f} TFLOP/s  err {err:.1e}", flush=True)
    return results


def moe_layers(small: bool, tokens: list[int], repeat: int) -> list[dict]:
    """The MoE layer as the model runs it: layer 1 of a 2-layer stack, picked by a traced index
    (the layer loop's), through `experts.moe` and through each of its paths forced; and
    `ragged_dot` over the official [E, in, out] stack, routed over all 8 experts and over 2."""
    d, f, E, k, L = (6144, 32768, 8, 2, 2) if not small else (256, 1024, 8, 2, 2)
    shapes = {"linear": (L, E, d, f), "linear_v": (L, E, d, f), "linear_1": (L, E, f, d)}
    official, stacks = [], []
    for i, (name, shape) in enumerate(shapes.items()):
        q = int8_weight(shape, 100 + i)
        stacks.append(layout.to_linear_weight(q, layout.chunk_count(shape[-2])))
        official.append(QuantizedWeight8bit(weight=q.weight[1], scales=q.scales[1]))
    ffn = lambda ws: lambda rows, e: experts.expert_ffn(rows, *(w[e] for w in ws), dtype=BF16)  # noqa: E731
    paths = {
        "experts.moe (the model's choice)": lambda x, g, c, ws: experts.moe(x, g, c, ws, BF16),
        "sorted_ragged (grouped products)": lambda x, g, c, ws: experts.sorted_ragged(x, g, c, ws, BF16),
        "pallas_pairs (Pallas grouped kernel)": lambda x, g, c, ws: experts.pallas_pairs(x, g, c, ws, BF16),
        "chosen_experts_dense (one expert at a time)": lambda x, g, c, ws: experts.chosen_experts_dense(
            x, g, c, ffn(ws), E),
        "grouped_experts (windows per expert)": lambda x, g, c, ws: experts.grouped_experts(
            x, g, c, ffn(ws), E, experts.group_capacity(x.shape[0], E, k)),
    }
    results = []
    layer = jnp.int32(1)
    for n in tokens:
        x = jax.random.normal(jax.random.key(n), (n, d), F32)
        gates = jnp.full((n, k), 0.5, F32)
        routing = {"uniform over 8": jax.random.randint(jax.random.key(7), (n, k), 0, E),
                   "only experts 0 and 1": jnp.tile(jnp.arange(k), (n, 1))}
        runs = [(path, jax.jit(lambda x, g, c, ws, i, fn=fn: fn(x, g, c, tuple(w[i] for w in ws))),
                 (stacks, layer), ["uniform over 8"]) for path, fn in paths.items()]
        runs.append(("ragged_dot (official [E, in, out])",
                     jax.jit(lambda x, g, c, ws: experts.sorted_ragged(x, g, c, tuple(ws), BF16)),
                     (official,), list(routing)))
        for path, run, weights, hows in runs:
            for how in hows:
                chosen = routing[how]
                ms = median_ms(lambda: run(x, gates, chosen, *weights), repeat)
                nbytes = len(np.unique(np.asarray(chosen))) * 3 * d * f        # chosen experts, int8
                results.append({"tokens": n, "path": path, "routing": how, "ms": ms,
                                "GBps_chosen": nbytes / ms / 1e6})
                print(f"moe {n:>6} tokens  {path:<46}{how:<24}{ms:>9.3f} ms "
                      f"{nbytes / ms / 1e6:>8.0f} GB/s", flush=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small width (checks the probe anywhere)")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 2048])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 32, 512])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    limits = ceilings(args.small, args.repeat)
    print(f"copy {limits['copy_GBps']:.0f} GB/s, bf16 matmul {limits['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
           "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ceilings": limits,
           "moe": moe_layers(args.small, args.tokens, args.repeat),
           "products": products(args.small, args.rows, args.repeat)}
    if args.json:
        write_atomically(args.json, json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
