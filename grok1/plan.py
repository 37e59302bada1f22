"""The full-size dry run: will a config fit a mesh of accelerators, without any weights?

`make_plan` builds the parameter tree as abstract shapes in the release's storage (int8 weights
with block scales, bfloat16 embeddings and norms), shards it with the table of `grok1/mesh.py`,
and lowers and compiles the sharded prefill and decode steps with XLA on forced CPU devices
(`--xla_force_host_platform_device_count`). It reports per-device bytes of

- weights and KV cache: exact, from the shard shapes of their shardings;
- temporaries: `compiled.memory_analysis()` of each step, i.e. XLA:CPU's buffer assignment for the
  same partitioned program (accelerator compilers fuse differently; treat it as an estimate).

The steps are compiled at the config's full depth: the model runs one layer body over its stacked
layers (`jax.lax.scan`, grok1/model.py), so the program holds one layer whatever the depth, its
compile time barely grows with it, and its temporaries are those of one layer at a time plus the
loop's. FLOPs and bytes per decode step come from two small per-layer (unrolled) programs, since
XLA's cost analysis counts a loop's body once rather than once per layer.

    python -m grok1.plan --preset grok-1 --mesh 1x8 [--batch 1] [--context 8192] [--layers N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grok1 import mesh as mesh_rules
from grok1.config import PRESETS, ModelConfig
from grok1.inference import resolve_dtype
from grok1.inspect import describe
from grok1.model import KVCache, param_shapes, transformed
from grok1.params import PARAM_AXES
from grok1.runtime.devices import force_cpu_devices
from grok1.weights.layout import compute_layout_structs
from grok1.weights.placement import bytes_per_device, params_sharding, release_structs
from grok1.weights.stacking import stack_layers

# Named accelerators and their memory per device in bytes (vendor figures, decimal units).
ACCELERATORS: dict[str, int] = {
    "TPU v5e (16 GB)": 16 * 10**9,
    "TPU v4 (32 GB)": 32 * 10**9,
    "A100 (40 GB)": 40 * 10**9,
    "A100 / H100 (80 GB)": 80 * 10**9,
    "TPU v5p (95 GB)": 95 * 10**9,
    "H200 (141 GB)": 141 * 10**9,
    "B200 (192 GB) / MI300X (192 GB)": 192 * 10**9,
}


def release_param_structs(config: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs stored like the release: int8 + bf16 scales for the
    linear weights, bf16 embeddings and norm scales, float32 router (grok1/params.py)."""
    return release_structs(param_shapes(config))


def weight_bytes_per_device(config: ModelConfig, mesh: Mesh) -> int:
    """Bytes of the release-format parameters that each device holds under the sharding table."""
    params = release_param_structs(config)
    return bytes_per_device(params, params_sharding(mesh, params))


def _with_sharding(structs: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  structs, shardings)


def compile_steps(config: ModelConfig, mesh: Mesh, *, batch: int, context: int, dtype,
                  steps: Sequence[str] = ("prefill", "decode"), stacked: bool = True
                  ) -> dict[str, dict[str, float]]:
    """Lower and compile the prefill ([B, context] prompt into an empty cache) and decode (one token
    per row against a full cache) steps, over the layers stacked (one scanned layer body) or, with
    `stacked=False`, one module per layer (unrolled). Per step: memory_analysis in bytes per
    device, the compiled program's cost_analysis (FLOPs and bytes accessed, per device: the
    program XLA compiles is one device's part of the partitioned step) and the compile time in
    seconds."""
    # As grok1.load lays them out: the compute layout (grok1/weights/layout.py), layers stacked.
    params = compute_layout_structs(release_param_structs(config), mesh)
    if stacked:
        params = jax.eval_shape(stack_layers, params)
    param_sh = params_sharding(mesh, params)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context, dtype))
    cache_sh = cache.sharding(mesh)
    apply = mesh_rules.on_mesh(transformed(config, dtype).apply, mesh)

    def step(params, tokens, cache, logits_at):
        return apply(params, tokens, cache, logits_at)

    rows = mesh_rules.activation_sharding(mesh, "cache_length", (batch,))
    out_sh = (mesh_rules.activation_sharding(mesh, "last_logits", (batch, config.vocab_size)), cache_sh)
    jitted = jax.jit(step, out_shardings=out_sh, donate_argnums=(2,))
    figures = {}
    for name, length in (("prefill", context), ("decode", 1)):
        if name not in steps:
            continue
        start = time.perf_counter()
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                      sharding=mesh_rules.activation_sharding(mesh, "tokens", (batch, length)))
        logits_at = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
        compiled = jitted.lower(_with_sharding(params, param_sh), tokens, _with_sharding(cache, cache_sh),
                                logits_at).compile()
        seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        figures[name] = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
                         "output": int(stats.output_size_in_bytes), "alias": int(stats.alias_size_in_bytes),
                         "flops": float(cost.get("flops", 0.0)),
                         "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                         "product_flops": float(product_flops(compiled.as_text())),
                         "compile_seconds": round(seconds, 2)}
    return figures


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)$")


def product_flops(hlo_text: str) -> int:
    """2 x (output elements) x (contracted elements) summed over the dot instructions of a
    compiled program's HLO text: the matrix products alone. XLA's cost analysis also counts one
    FLOP per element of every elementwise op, each int8/bfloat16 weight element's convert to the
    compute type included, which for a decode step is as much again as the products."""
    shapes: dict[str, list[int]] = {}
    total = 0
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dims, opcode, rest = match.groups()
        shapes[name] = [int(d) for d in dims.split(",") if d]
        if opcode != "dot":
            continue
        lhs = shapes[re.match(r"\s*%([\w.\-]+)", rest).group(1)]  # defined above it (SSA)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        contracted = math.prod(lhs[int(d)] for d in contracting.split(",") if d)
        total += 2 * math.prod(shapes[name]) * contracted
    return total


def decode_step_cost(config: ModelConfig, mesh: Mesh, *, batch: int, context: int,
                     dtype) -> dict[str, float]:
    """FLOPs and bytes accessed per device by one decode step of all layers.

    XLA's cost analysis counts the body of the scanned layer loop once, not once per layer, so
    the cost comes from per-layer (unrolled) programs: layers are identical, so it is linear in
    their number, the one-layer program's cost plus (layers - 1) times the difference to a
    two-layer program (decode only: they compile in seconds). From XLA's cost_analysis of the
    compiled, partitioned programs.
    """
    def cost(layers: int) -> dict[str, float]:
        figures = compile_steps(config.replace(num_layers=layers), mesh, batch=batch, context=context,
                                dtype=dtype, steps=("decode",), stacked=False)["decode"]
        return {key: figures[key] for key in ("flops", "product_flops", "bytes_accessed")}

    one = cost(1)
    if config.num_layers == 1:
        return one
    two = cost(2)
    return {key: float(one[key] + (config.num_layers - 1) * (two[key] - one[key])) for key in one}


def expert_replication(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """How many devices hold the same slice of the expert weights, and over which mesh axes.

    Expert weights are split over the `expert` axis (by expert) and over `data` and `model` (by
    the ffn axis), each only where the sizes divide; a mesh axis that splits none of their axes
    holds a full copy per position along it, i.e. memory spent on copies rather than capacity.
    """
    shape = (config.num_experts, config.emb_size, config.ffn_size)
    spec = mesh_rules.partition_spec(PARAM_AXES["linear@moe"], shape, mesh)
    used = {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}
    replicated = {axis: size for axis, size in mesh.shape.items() if size > 1 and axis not in used}
    copies = math.prod(replicated.values())
    if not replicated:
        why = "every mesh axis splits them: each device holds a different slice"
    else:
        why = "; ".join(
            f"mesh axis {axis}={size} splits none of their axes"
            + (f" ({config.num_experts} experts do not divide into {size})" if axis == "expert" else
               f" (ffn {config.ffn_size} is not divisible by the other axes times {size})")
            for axis, size in replicated.items())
        why += f": {copies} devices hold each slice"
    return {"copies": copies, "replicated_over": replicated, "spec": str(spec), "explanation": why}


def make_plan(config: ModelConfig, mesh_spec: str, *, batch: int = 1, context: Optional[int] = None,
              dtype: Any = "bfloat16") -> dict:
    """Per-device memory of running `config` on mesh `mesh_spec` (see the module docstring).

    Needs as many devices as the mesh has: on a machine without them, call
    `force_cpu_devices(N)` (or set XLA_FLAGS=--xla_force_host_platform_device_count=N) before
    JAX's first computation.
    """
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    context = config.sequence_len if context is None else context
    if context < 1:
        raise ValueError(f"context must be a positive integer, got {context}")
    compute = resolve_dtype(dtype)
    shape = mesh_rules.parse_mesh_spec(mesh_spec)
    size = math.prod(shape.values())
    if jax.device_count() < size:
        raise ValueError(f"mesh {mesh_spec!r} needs {size} devices but {jax.device_count()} are available; "
                         f"call grok1.runtime.devices.force_cpu_devices({size}) (or set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={size}) before JAX starts "
                         f"(run.py --plan and python -m grok1.plan do)")
    mesh = mesh_rules.make_mesh(shape, jax.devices()[:size])
    start = time.perf_counter()

    weights = weight_bytes_per_device(config, mesh)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context, compute))
    kv_cache = bytes_per_device(cache, cache.sharding(mesh))
    steps = compile_steps(config, mesh, batch=batch, context=context, dtype=compute)
    temporaries = {name: figures["temp"] for name, figures in steps.items()}
    decode_cost = decode_step_cost(config, mesh, batch=batch, context=context, dtype=compute)
    # The products a decode step needs at least: every active weight once per row (2 FLOPs per
    # multiply-add), split over the devices: only the chosen experts computed.
    decode_cost["ideal_product_flops"] = describe(config)["flops_per_token"]["matmul"] * batch / size
    # Cross-check of the byte accounting: XLA's own size of the compiled program's inputs.
    check = {"compiled_argument_bytes": steps["decode"]["argument"],
             "weights_and_cache_bytes": weights + kv_cache}

    total = weights + kv_cache + max(temporaries.values())
    return {
        "config": config.to_dict(),
        "mesh": mesh_spec,
        "mesh_shape": shape,
        "devices": size,
        "batch": batch,
        "context": context,
        "dtype": str(jnp.dtype(compute)),
        "param_count": config.param_count,
        "bytes_per_device": {"weights": weights, "kv_cache": kv_cache,
                             "temporaries_prefill": temporaries["prefill"],
                             "temporaries_decode": temporaries["decode"], "total": total},
        "fits": {name: total <= capacity for name, capacity in ACCELERATORS.items()},
        "decode_step_per_device": decode_cost,
        "compile_seconds": {name: figures["compile_seconds"] for name, figures in steps.items()},
        "expert_replication": expert_replication(config, mesh),
        "compiled_program": check,
        "method": (f"weights and KV cache from the shardings of all {config.num_layers} layers; "
                   f"temporaries from XLA:CPU memory_analysis of the sharded steps compiled with all "
                   f"{config.num_layers} layers (one scanned layer body); decode cost from one- and "
                   f"two-layer unrolled programs"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_plan(plan: dict) -> str:
    """A short human-readable report of `make_plan`'s result (bytes in GiB, as `--describe`)."""
    b = plan["bytes_per_device"]
    c = plan["config"]
    cost = plan["decode_step_per_device"]
    compile_seconds = plan["compile_seconds"]
    replication = plan["expert_replication"]
    lines = [
        f"Plan: {c['num_layers']} layers, d={c['emb_size']}, {c['num_experts']} experts, "
        f"{_count(plan['param_count'])} parameters on mesh {plan['mesh']} "
        f"({', '.join(f'{k}={v}' for k, v in plan['mesh_shape'].items())}; {plan['devices']} devices)",
        f"batch {plan['batch']}, context {plan['context']}, compute {plan['dtype']}",
        "per device:",
        f"  weights (int8 + scales, bf16 embeddings) {_gib(b['weights'])}",
        f"  KV cache                                 {_gib(b['kv_cache'])}",
        f"  temporaries, prefill                     {_gib(b['temporaries_prefill'])}",
        f"  temporaries, decode                      {_gib(b['temporaries_decode'])}",
        f"  total (weights + cache + larger step)    {_gib(b['total'])}",
        f"  decode step: {cost['flops'] / 1e9:.3f} GFLOP, {_gib(cost['bytes_accessed']).strip()} accessed "
        f"(XLA cost analysis, all {c['num_layers']} layers); products {cost['product_flops'] / 1e9:.3f} "
        f"GFLOP = {cost['product_flops'] / cost['ideal_product_flops']:.2f} x 2 x active weights x batch "
        f"/ devices (the rest is elementwise: XLA counts each weight element's convert as a FLOP)",
        f"expert weights: {replication['explanation']}",
        f"compile time (all {c['num_layers']} layers, one scanned layer body): "
        f"prefill {compile_seconds['prefill']:.1f} s, decode {compile_seconds['decode']:.1f} s",
        "fits:",
    ]
    lines += [f"  {'yes' if ok else 'no ':3}  {name}" for name, ok in plan["fits"].items()]
    lines.append(f"({plan['method']}; {plan['seconds']} s)")
    return "\n".join(lines)


def _count(n: int) -> str:
    """10.2M, 314.0B: parameter counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / 2**30:10.3f} GiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grok1.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="grok-1", help="config preset (default grok-1)")
    parser.add_argument("--config", help="config.json instead of a preset")
    parser.add_argument("--mesh", default="1x8", help="DATAxMODEL, DATAxEXPERTxMODEL or axis=size,...")
    parser.add_argument("--batch", type=int, default=1,
                        help="rows prefilled and decoded together, each with its --context positions "
                             "of KV cache (default 1)")
    parser.add_argument("--context", type=int, help="positions per row (default: the config's sequence_len)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="compute dtype of activations and the KV cache; the weights stay as the "
                             "release stores them (default bfloat16, what grok1.load picks on accelerators)")
    parser.add_argument("--layers", type=int, metavar="N",
                        help="decoder layers (default: the config's num_layers), e.g. to time 8 against 64")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="CPU devices to lay the mesh out on (default: as many as the mesh has)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)

    try:
        size = math.prod(mesh_rules.parse_mesh_spec(args.mesh).values())
    except ValueError as e:
        parser.error(str(e))
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    force_cpu_devices(args.cpu_devices or size)
    if args.config:
        config = ModelConfig.from_json(args.config)
    elif args.preset in PRESETS:
        config = PRESETS[args.preset]
    else:
        parser.error(f"unknown preset {args.preset!r}; presets: {', '.join(sorted(PRESETS))}")
    if args.layers is not None:
        config = config.replace(num_layers=args.layers)
    try:
        plan = make_plan(config, args.mesh, batch=args.batch, context=args.context, dtype=args.dtype)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
