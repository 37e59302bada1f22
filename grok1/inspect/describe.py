"""What the parameters weigh: `describe` walks the parameter tree of `grok1.model`, stored as
the release stores it (grok1/params.py) and split by the mesh's table (grok1/mesh.py). Needs no
weights."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AbstractMesh

from grok1.config import ModelConfig, resolve_config
from grok1.mesh import MESH_AXES, parse_mesh_spec
from grok1.model import param_shapes
from grok1.params import LAYER_ORDER, component, layer_index, layer_module, official_layer, release_storage
from grok1.weights.placement import param_sharding, release_structs

BYTES = {"int8": 1, "bfloat16": 2, "float32": 4}

def _forward_order(module: str) -> tuple:
    """Embedding first, then the layers in numeric order (modules in forward order), final norm last."""
    layer = official_layer(module)
    if layer is not None:
        index, inner = layer
        return (1, index, LAYER_ORDER.index(inner) if inner in LAYER_ORDER else len(LAYER_ORDER), module)
    return (0 if module.endswith("in_out_embed") else 2, 0, 0, module)


def _tensor(module: str, param: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """One parameter with its storage in the release (grok1/params.py, `release_storage`)."""
    storage = release_storage(module, param, shape)
    count = math.prod(shape)
    entry: dict[str, Any] = {"module": module, "param": param, "shape": list(shape),
                             "component": component(module), "count": count, "dtype": storage.dtype.name}
    nbytes = count * storage.dtype.itemsize
    if storage.quantized:
        entry.update(scales_shape=list(storage.scales_shape), scales_dtype=storage.scales_dtype.name)
        nbytes += math.prod(storage.scales_shape) * storage.scales_dtype.itemsize
    entry["bytes"] = nbytes
    return entry


def _bytes_per_device(shapes: dict, tensors: list[dict[str, Any]], mesh_spec: str) -> dict[str, Any]:
    """Bytes each device holds of the release-stored parameters, from the shard shapes their
    shardings give (grok1/weights/placement.py). An abstract mesh (axis sizes only): no devices
    needed."""
    sizes = parse_mesh_spec(mesh_spec)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    per_device = 0
    by_component: dict[str, int] = {}
    structs = release_structs(shapes)
    for t in tensors:
        struct = structs[t["module"]][t["param"]]
        sharding = param_sharding(mesh, t["module"], t["param"], struct)
        nbytes = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                     for a, s in zip(jax.tree_util.tree_leaves(struct), jax.tree_util.tree_leaves(sharding)))
        per_device += nbytes
        by_component[t["component"]] = by_component.get(t["component"], 0) + nbytes
    return {"spec": mesh_spec, "axes": sizes, "devices": math.prod(sizes.values()),
            "param_bytes_per_device": per_device, "by_component": by_component}


def describe(config: ModelConfig | str, mesh_spec: Optional[str] = None) -> dict[str, Any]:
    """Every parameter of `config`'s model (a ModelConfig or a preset name such as "grok-1") with
    shape, count and bytes (release storage), totals per layer and overall, active parameters and
    FLOPs per token, KV-cache bytes per token and, for `mesh_spec` (e.g. "1x8"), the parameter
    bytes each device holds. Needs no weights."""
    config = resolve_config(config)
    shapes = param_shapes(config)
    tensors = [_tensor(module, param, tuple(shapes[module][param].shape))
               for module in sorted(shapes, key=_forward_order) for param in sorted(shapes[module])]

    def totals(selected: list[dict[str, Any]]) -> dict[str, Any]:
        by_component: dict[str, int] = {}
        for t in selected:
            by_component[t["component"]] = by_component.get(t["component"], 0) + t["count"]
        return {"params": sum(t["count"] for t in selected),
                "bytes": sum(t["bytes"] for t in selected), "params_by_component": by_component}

    c = config
    layer_0 = [t for t in tensors if layer_index(t["module"]) == 0]
    per_layer = totals(layer_0)
    total = totals(tensors)
    active = dict(total["params_by_component"])
    active["experts"] = active["experts"] * c.num_selected_experts // c.num_experts
    # FLOPs: 2 per multiply-add of every weight a token multiplies through (its active parameters
    # but the norm scales; the embeddings once, as the tied output projection; the input lookup is
    # free), plus q.k and the weighted sum of v: 2 * H * K each, per visible key and layer.
    matmul_weights = sum(n for component, n in active.items() if component != "norms")
    per_key = 4 * c.num_layers * c.num_q_heads * c.key_size

    def flops(visible_keys: float) -> int:
        return int(2 * matmul_weights + per_key * visible_keys)

    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.key_size
    contexts = sorted({1, min(1024, c.sequence_len), c.sequence_len})
    return {
        "config": c.to_dict(),
        "ffn_size": c.ffn_size,
        "tensors": tensors,
        "num_tensors": len(tensors),
        "per_layer": per_layer,
        "total": total,
        "active_per_token": {"params": sum(active.values()), "params_by_component": active,
                             "note": f"{c.num_selected_experts} of {c.num_experts} experts per layer; "
                                     "all embeddings, which the tied output projection reads"},
        "flops_per_token": {
            "counted": "2 x weights multiplied (attention, router, chosen experts, unembedding) "
                       "+ 4 x H x K x layers per visible key (scores and weighted values)",
            "matmul": flops(0),
            "per_visible_key": per_key,
            # context n: prefill of an n-token prompt, where token t sees t+1 keys (causal), (n+1)/2
            # on average; decode of the n-th token, which sees all n.
            "by_context": [{"context": n, "prefill": flops((n + 1) / 2),
                            "decode": flops(n)} for n in contexts],
        },
        "kv_cache": {"bytes_per_token": {dtype: kv_per_token * BYTES[dtype]
                                         for dtype in ("bfloat16", "float32")},
                     "bytes_per_sequence_bfloat16": kv_per_token * BYTES["bfloat16"] * c.sequence_len,
                     "counted": "keys and values of every layer (2 x layers x kv heads x key size)"},
        "mesh": _bytes_per_device(shapes, tensors, mesh_spec or "1x1"),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_description(d: dict[str, Any]) -> str:
    """`describe`'s dict as readable tables: the non-layer tensors, one decoder layer (the same
    for every layer), totals, per-token costs and the mesh."""
    c = d["config"]
    layers = c["num_layers"]
    rows = [("module / param", "shape", "params", "storage", "bytes")]

    def row(t: dict[str, Any], module: str) -> tuple[str, ...]:
        storage = t["dtype"]
        if "scales_shape" in t:
            storage = f"int8 + bf16 scales {tuple(t['scales_shape'])}"
        return (f"{module}/{t['param']}", str(tuple(t["shape"])), f"{t['count']:,}", storage,
                f"{t['bytes']:,}")

    for t in d["tensors"]:
        layer = layer_index(t["module"])
        if layer is None:
            rows.append(row(t, t["module"]))
        elif layer == 0:
            rows.append(row(t, t["module"].replace(layer_module(0), layer_module("{i}"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Grok-1 architecture: {layers} layers, d={c['emb_size']}, {c['num_q_heads']} query / "
             f"{c['num_kv_heads']} kv heads of {c['key_size']}, {c['num_experts']} experts "
             f"(top {c['num_selected_experts']}), ffn {d['ffn_size']}, vocab {c['vocab_size']}",
             f"Storage as in the release: int8 linear weights with bf16 block scales, bf16 embeddings "
             f"and norms, f32 router. decoder_layer_{{i}} rows repeat for i = 0..{layers - 1}.", ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) if j < 2 or j == 3 else r[j].rjust(widths[j])
                               for j in range(len(r))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    per_layer, total, active = d["per_layer"], d["total"], d["active_per_token"]
    lines += ["",
              f"{'per layer':<13}{per_layer['params']:>20,} params  {_human_bytes(per_layer['bytes']):>11}",
              f"{'total':<13}{total['params']:>20,} params  {_human_bytes(total['bytes']):>11}  "
              f"({d['num_tensors']} tensors)",
              f"{'':<13}by component: " + ", ".join(
                  f"{k} {_human_count(v)}" for k, v in total["params_by_component"].items()),
              f"{'active/token':<13}{active['params']:>20,} params  ({active['note']})",
              f"{'':<13}by component: " + ", ".join(
                  f"{k} {_human_count(v)}" for k, v in active["params_by_component"].items()),
              ""]
    flops = d["flops_per_token"]
    lines.append(f"FLOPs per token = {flops['matmul']:,} (matmuls) + {flops['per_visible_key']:,} "
                 f"x visible keys")
    lines.append(f"  counted: {flops['counted']}")
    for entry in flops["by_context"]:
        n = entry["context"]
        lines.append(f"  prompt of {n:>5} tokens: prefill {_human_count(entry['prefill'])}FLOP per token "
                     f"(mean); decoding token {n}: {_human_count(entry['decode'])}FLOP")
    kv = d["kv_cache"]
    lines += ["",
              f"KV cache per token: {_human_bytes(kv['bytes_per_token']['bfloat16'])} in bf16 "
              f"({_human_bytes(kv['bytes_per_token']['float32'])} in f32); "
              f"{_human_bytes(kv['bytes_per_sequence_bfloat16'])} for {c['sequence_len']} tokens in bf16"]
    mesh = d["mesh"]
    axes = " x ".join(f"{k}={v}" for k, v in mesh["axes"].items())
    lines.append(f"Mesh {mesh['spec']} ({axes}, {mesh['devices']} devices): "
                 f"{_human_bytes(mesh['param_bytes_per_device'])} of parameters per device")
    return "\n".join(lines)
