"""The full-size dry run: will a config fit a mesh of accelerators, without any weights?

`make_plan` builds the parameter tree as abstract shapes in the release's storage (int8 weights
with block scales, bfloat16 embeddings and norms), shards it with the table in `sharding.py`,
and lowers and compiles the sharded prefill and decode steps with XLA on forced CPU devices
(`--xla_force_host_platform_device_count`). It reports per-device bytes of

- weights and KV cache: exact, from the shard shapes of their shardings;
- temporaries: `compiled.memory_analysis()` of each step, i.e. XLA:CPU's buffer assignment for the
  same partitioned program (accelerator compilers fuse differently; treat it as an estimate).

Decoder layers are identical and run one after another, so their temporaries are never live
together: the steps are compiled for a model of ONE decoder layer (plus embedding and head) and
its temporaries stand for the whole stack. Compiling all layers unrolled is slower and, on
XLA:CPU, grows by about 2.5 GB per grok-1 layer per device (measured on 1x8): its schedule keeps
every layer's int8 expert weights converted to float32 (CPU dots upcast bfloat16) live at once,
an artifact of that compiler rather than something the program needs.

    python -m grok1.plan --preset grok-1 --mesh 1x8 [--batch 1] [--context 8192] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Optional, Sequence

from jax.sharding import Mesh

from grok1.config import ModelConfig

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

# int8 scale blocks per weight in the release: one block per shard of its 8-way model axis for
# the row-parallel weights (attention output, moe linear_1), one block elsewhere.
RELEASE_SCALE_BLOCKS = {"linear@attention": 8, "linear_1@moe": 8}
QUANTIZED_PARAMS = ("query", "key", "value", "linear@attention", "linear@moe", "linear_v@moe", "linear_1@moe")


def release_param_structs(config: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs stored like the release: int8 + bf16 scales for the
    linear weights, bf16 embeddings and norm scales, float32 router."""
    import jax
    import jax.numpy as jnp
    from grok1.model import param_shapes
    from grok1.quant import QuantizedWeight8bit
    from grok1.sharding import param_kind

    out: dict = {}
    for module, group in param_shapes(config).items():
        key = param_kind(module)
        for name, struct in group.items():
            shape = tuple(struct.shape)
            if key in QUANTIZED_PARAMS:
                blocks = RELEASE_SCALE_BLOCKS.get(key, 1)
                blocks = blocks if shape[-2] % blocks == 0 else 1
                value = QuantizedWeight8bit(
                    weight=jax.ShapeDtypeStruct(shape, jnp.int8),
                    scales=jax.ShapeDtypeStruct(shape[:-2] + (blocks, shape[-1]), jnp.bfloat16))
            elif key == "router":
                value = jax.ShapeDtypeStruct(shape, jnp.float32)
            else:
                value = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
            out.setdefault(module, {})[name] = value
    return out


def bytes_per_device(structs: Any, shardings: Any) -> int:
    """Bytes the largest-loaded device holds of a tree of ShapeDtypeStructs under `shardings`."""
    import jax
    import numpy as np
    total: dict[Any, int] = {}
    for struct, sharding in zip(jax.tree_util.tree_leaves(structs), jax.tree_util.tree_leaves(shardings)):
        itemsize = np.dtype(struct.dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(struct.shape)).items():
            n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, struct.shape))
            total[device] = total.get(device, 0) + n * itemsize
    return max(total.values(), default=0)


def weight_bytes_per_device(config: ModelConfig, mesh: Mesh) -> int:
    """Bytes of the release-format parameters that each device holds under the sharding table."""
    from grok1 import sharding as sh
    params = release_param_structs(config)
    return bytes_per_device(params, sh.params_sharding(mesh, params))


def _with_sharding(structs: Any, shardings: Any) -> Any:
    import jax
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  structs, shardings)


def compile_steps(config: ModelConfig, mesh: Mesh, *, batch: int, context: int, dtype) -> dict[str, dict[str, int]]:
    """Lower and compile the prefill ([B, context] prompt into an empty cache) and decode (one token
    per row against a full cache) steps; memory_analysis of each, in bytes per device."""
    import jax
    import jax.numpy as jnp
    from grok1 import sharding as sh
    from grok1.model import KVCache, transformed

    params = release_param_structs(config)
    param_sh = sh.params_sharding(mesh, params)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context, dtype))
    cache_sh = sh.kv_cache_sharding(mesh, cache)
    apply = transformed(config, dtype).apply

    def step(params, tokens, cache, logits_at):
        return apply(params, tokens, cache, logits_at)

    rows = sh.activation_sharding(mesh, "cache_length", (batch,))
    out_sh = (sh.activation_sharding(mesh, "last_logits", (batch, config.vocab_size)), cache_sh)
    jitted = jax.jit(step, out_shardings=out_sh, donate_argnums=(2,))
    figures = {}
    for name, length in (("prefill", context), ("decode", 1)):
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                      sharding=sh.activation_sharding(mesh, "tokens", (batch, length)))
        logits_at = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
        compiled = jitted.lower(_with_sharding(params, param_sh), tokens, _with_sharding(cache, cache_sh),
                                logits_at).compile()
        stats = compiled.memory_analysis()
        figures[name] = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
                         "output": int(stats.output_size_in_bytes), "alias": int(stats.alias_size_in_bytes)}
    return figures


def make_plan(config: ModelConfig, mesh_spec: str, *, batch: int = 1, context: Optional[int] = None,
              dtype: Any = "bfloat16") -> dict:
    """Per-device memory of running `config` on mesh `mesh_spec` (see the module docstring).

    Needs as many devices as the mesh has: on a machine without them, call
    `force_cpu_devices(N)` (or set XLA_FLAGS=--xla_force_host_platform_device_count=N) before
    JAX's first computation.
    """
    import jax
    import jax.numpy as jnp
    from grok1 import sharding as sh
    from grok1.inference import resolve_dtype
    from grok1.model import KVCache

    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    context = config.sequence_len if context is None else context
    if context < 1:
        raise ValueError(f"context must be a positive integer, got {context}")
    compute = resolve_dtype(dtype)
    shape = sh.parse_mesh_spec(mesh_spec)
    size = math.prod(shape.values())
    if jax.device_count() < size:
        raise ValueError(f"mesh {mesh_spec!r} needs {size} devices but {jax.device_count()} are available; "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={size} before importing jax "
                         f"(run.py --plan and python -m grok1.plan do)")
    mesh = sh.make_mesh(shape, jax.devices()[:size])
    start = time.perf_counter()

    weights = weight_bytes_per_device(config, mesh)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context, compute))
    kv_cache = bytes_per_device(cache, sh.kv_cache_sharding(mesh, cache))
    one_layer = config.replace(num_layers=1)
    steps = compile_steps(one_layer, mesh, batch=batch, context=context, dtype=compute)
    temporaries = {name: figures["temp"] for name, figures in steps.items()}
    # Cross-check of the byte accounting: XLA's own size of the compiled program's inputs.
    one_cache = jax.eval_shape(lambda: KVCache.zeros(one_layer, batch, context, compute))
    check = {"compiled_argument_bytes": steps["decode"]["argument"],
             "weights_and_cache_bytes": weight_bytes_per_device(one_layer, mesh) +
             bytes_per_device(one_cache, sh.kv_cache_sharding(mesh, one_cache))}

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
        "one_layer_program": check,
        "method": (f"weights and KV cache from the shardings of all {config.num_layers} layers; "
                   f"temporaries from XLA:CPU memory_analysis of the sharded steps compiled with one "
                   f"decoder layer (layers run in turn, so their temporaries are not live together)"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_plan(plan: dict) -> str:
    """A short human-readable report of `make_plan`'s result."""
    b = plan["bytes_per_device"]
    c = plan["config"]
    lines = [
        f"Plan: {c['num_layers']} layers, d={c['emb_size']}, {c['num_experts']} experts, "
        f"{plan['param_count'] / 1e9:.1f}B parameters on mesh {plan['mesh']} "
        f"({', '.join(f'{k}={v}' for k, v in plan['mesh_shape'].items())}; {plan['devices']} devices)",
        f"batch {plan['batch']}, context {plan['context']}, compute {plan['dtype']}",
        "per device:",
        f"  weights (int8 + scales, bf16 embeddings) {_gb(b['weights'])}",
        f"  KV cache                                 {_gb(b['kv_cache'])}",
        f"  temporaries, prefill                     {_gb(b['temporaries_prefill'])}",
        f"  temporaries, decode                      {_gb(b['temporaries_decode'])}",
        f"  total (weights + cache + larger step)    {_gb(b['total'])}",
        "fits:",
    ]
    lines += [f"  {'yes' if ok else 'no ':3}  {name}" for name, ok in plan["fits"].items()]
    lines.append(f"({plan['method']}; {plan['seconds']} s)")
    return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:10.3f} GB"


def force_cpu_devices(n: int) -> None:
    """Run on n CPU devices; only possible before JAX creates its backends (before any computation)."""
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grok1.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="grok-1", help="config preset (default grok-1)")
    parser.add_argument("--config", help="config.json instead of a preset")
    parser.add_argument("--mesh", default="1x8", help="DATAxMODEL, DATAxEXPERTxMODEL or axis=size,...")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, help="positions per row (default: the config's sequence_len)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)

    from grok1 import sharding
    try:
        size = math.prod(sharding.parse_mesh_spec(args.mesh).values())
    except ValueError as e:
        parser.error(str(e))
    force_cpu_devices(size)
    from grok1.config import PRESETS, ModelConfig
    if args.config:
        config = ModelConfig.from_json(args.config)
    elif args.preset in PRESETS:
        config = PRESETS[args.preset]
    else:
        parser.error(f"unknown preset {args.preset!r}; presets: {', '.join(sorted(PRESETS))}")
    try:
        plan = make_plan(config, args.mesh, batch=args.batch, context=args.context, dtype=args.dtype)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
