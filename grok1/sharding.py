"""Device meshes and the one table that says how every array is split over them.

Each parameter declares its *logical* axes once (`PARAM_AXES`), and so do the KV cache and the
step inputs/outputs (`ACTIVATION_AXES`); `LOGICAL_TO_MESH` maps logical axes to mesh axes. To try
another sharding strategy, change that mapping; the rest of the code turns it into
`NamedSharding`s. Activations inside the model are not annotated: XLA propagates shardings from
the weights and the step inputs. No regexes over parameter paths.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grok1.layout import EmbeddingTable, LinearWeight
from grok1.model import KVCache
from grok1.quant import QuantizedWeight8bit
from grok1.stacking import is_stacked

MESH_AXES = ("data", "expert", "model")

# Logical axes of each parameter, keyed by the last part of its module path.
PARAM_AXES: dict[str, tuple[Optional[str], ...]] = {
    "in_out_embed": ("vocab", "embed"),
    "rms_norm": ("norm",),
    "query": ("embed_in", "heads"),
    "key": ("embed_in", "kv_heads"),
    "value": ("embed_in", "kv_heads"),
    "linear@attention": ("heads", "embed_out"),
    "router": ("embed_in", "router_experts"),
    "linear@moe": ("experts", "embed_in", "ffn"),
    "linear_v@moe": ("experts", "embed_in", "ffn"),
    "linear_1@moe": ("experts", "ffn", "embed_out"),
}

# Logical axes of the KV cache and of the arrays that enter and leave a forward step.
ACTIVATION_AXES: dict[str, tuple[Optional[str], ...]] = {
    "tokens": ("batch", "seq"),                          # [B, T]
    "logits": ("batch", "seq", "vocab"),                 # [B, T, V]
    "last_logits": ("batch", "vocab"),                   # [B, V]
    "cache_kv": ("layers", "batch", "seq", "cache_heads", None),  # [L, B, S, N, K]
    "cache_valid": ("batch", "seq"),                     # [B, S]
    "cache_length": ("batch",),                          # [B]
}

# Logical axis -> the mesh axes it is split over, jointly and in this order (None: replicated).
# Every large weight is split over ALL mesh axes together, so each of n devices holds 1/n of it:
# Grok-1's 314 GB of int8 only fits when nothing big is replicated. A mesh axis splits at most one
# axis of an array (the first that claims it), and only where the sizes divide (see partition_spec).
LOGICAL_TO_MESH: dict[str, Any] = {
    # Attention heads and the expert hidden (ffn) axis: Megatron-style column-parallel in and
    # row-parallel out, one all-reduce per sublayer. They are also split over "data" (ZeRO-3 /
    # FSDP style): data-parallel replicas share one copy of the weights, which XLA gathers per layer.
    "heads": ("data", "expert", "model"),
    # The key and value projections are the exception: split over data too, their few heads get
    # cut within a head once the devices outnumber them (bench-1b's 4 x 64 on 2x4: 32 columns
    # each; Grok-1's 8 x 128 on 2x8), and every decode step then reshards each row's new keys for
    # RoPE and the cache write (about 30 collectives per layer on 2x4, measured 15 % of a step).
    # They are small (Grok-1: 0.8 GB in all), so data-parallel replicas each hold them. (The
    # model axis alone still cuts heads where it outnumbers them: bench-1b's 4 on 1x8.)
    "kv_heads": ("expert", "model"),
    "ffn": ("data", "model"),
    # Experts go to the expert axis (expert parallelism); with no expert axis it has size 1.
    "experts": "expert",
    # The embedding table is split by vocabulary (the official code splits it along d): each
    # device's share of the output projection is whole rows of the table, the product's fast
    # case, and the logits come out split by vocabulary; the input lookup costs an all-reduce of
    # the looked-up rows. Along d, a device's rows were 1/n of d long (bench-1b on 1x8: 128), and
    # the logits were summed over devices: bench-1b's decode step on 1x8 took 29 / 93 ms at
    # batch 1 / 8 that way against 26 / 88 split by vocabulary (2x4 batch 8: 81 -> 66 ms).
    "vocab": ("data", "expert", "model"),
    "embed": None,
    # Norm scales and the router are tiny ([d] and [d, 8]): replicated everywhere.
    "norm": None,
    "router_experts": None,
    # The d axis of a weight that is already split along its other axis stays whole.
    "embed_in": None,
    "embed_out": None,
    # Rows of a batch are independent: data parallelism. The KV cache is split by rows first and
    # then by kv heads over whatever mesh axes remain, so even batch 1 spreads its cache over all
    # devices (Grok-1 has 8 kv heads: one per device on an 8-way model axis).
    "batch": "data",
    "cache_heads": ("data", "expert", "model"),
    "seq": None,
    # The leading axis of the stacked decoder layers (grok1/stacking.py) and of the KV cache: never
    # split, each device holds its part of every layer, and the layer loop runs on all of them.
    "layers": None,
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"1x8" -> data=1, model=8; "1x2x4" -> data=1, expert=2, model=4; "data=2,model=4" too."""
    text = spec.strip()
    if re.fullmatch(r"\d+(x\d+){1,2}", text):
        sizes = [int(n) for n in text.split("x")]
        names = ("data", "model") if len(sizes) == 2 else MESH_AXES
        shape = dict(zip(names, sizes))
    elif re.fullmatch(r"\s*\w+\s*=\s*\d+(\s*,\s*\w+\s*=\s*\d+)*\s*", text):
        shape = {}
        for part in text.split(","):
            name, value = (s.strip() for s in part.split("="))
            if name not in MESH_AXES:
                raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; allowed: {', '.join(MESH_AXES)}")
            if name in shape:
                raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
            shape[name] = int(value)
    else:
        raise ValueError(f"mesh spec {spec!r} is not DATAxMODEL, DATAxEXPERTxMODEL or "
                         f"axis=size,... (axes: {', '.join(MESH_AXES)})")
    if any(n < 1 for n in shape.values()):
        raise ValueError(f"mesh axis sizes must be positive, got {spec!r}")
    return {name: shape.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "1x1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, expert, model) from a spec such as "1x8" or "data=2,model=4".

    With several processes, `jax.devices()` lists every process's devices, so the mesh spans
    them all; the model axis varies fastest, keeping tensor-parallel groups on one host.
    """
    shape = parse_mesh_spec(spec) if isinstance(spec, str) else {n: spec.get(n, 1) for n in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(shape.values())
    if needed != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {needed} devices but {len(devices)} are available "
            f"({jax.default_backend()}); choose a mesh whose sizes multiply to {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape([shape[n] for n in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def param_kind(module: str) -> str:
    """The PARAM_AXES key of a module path: its last part, "@moe"/"@attention" for the linears
    (the same names occur in both sublayers), and "rms_norm" for every numbered norm."""
    parts = module.split("/")
    key = re.sub(r"^rms_norm(_\d+)?$", "rms_norm", parts[-1])
    if key in ("linear", "linear_v", "linear_1"):
        key = f"{key}@{'moe' if len(parts) > 1 and parts[-2] == 'moe' else 'attention'}"
    return key


def logical_axes(module: str, param: str) -> tuple[Optional[str], ...]:
    """Logical axes of a parameter from its module path, official or stacked (whose leading
    axis is "layers")."""
    key = param_kind(module)
    if key not in PARAM_AXES:
        raise KeyError(f"no partition rule for parameter {module}/{param}; rules: {sorted(PARAM_AXES)}")
    return ("layers",) + PARAM_AXES[key] if is_stacked(module) else PARAM_AXES[key]


def partition_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for `shape` with logical `axes`.

    Each array axis takes, in order, the mesh axes its logical axis maps to, skipping mesh axes
    of size 1, those an earlier array axis already took, and those that would not divide it.
    """
    used: set[str] = set()
    out = []
    for axis, size in zip(axes, shape):
        rule = LOGICAL_TO_MESH.get(axis) if axis else None
        wanted = (rule,) if isinstance(rule, str) else tuple(rule or ())
        taken: list[str] = []
        for mesh_axis in wanted:
            n = mesh.shape[mesh_axis]
            if n > 1 and mesh_axis not in used and size % (math.prod(mesh.shape[a] for a in taken) * n) == 0:
                taken.append(mesh_axis)
        used.update(taken)
        out.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return P(*out)


def param_sharding(mesh: Mesh, module: str, param: str, value: Any) -> Any:
    """NamedSharding of a parameter (a QuantizedWeight8bit or LinearWeight of shardings for
    linear weights).

    Block scales [..., blocks, out] follow the weight: same split of the leading and output axes,
    and the blocks axis split like the weight's input axis when the block count allows it. A
    LinearWeight (the compute layout, [..., out, in]) is split as the stored weight is, its last
    two axes swapped: each device transposes its own shard while loading.
    """
    axes = logical_axes(module, param)
    if isinstance(value, LinearWeight):
        table = isinstance(value, EmbeddingTable)  # stored [V, d] = [out, in]; others [..., in, out]
        spec = partition_spec(axes, value.shape, mesh)
        split_in, split_out = (spec[1], spec[0]) if table else (spec[-2], spec[-1])
        # values [..., chunks, out, chunk]: each chunk holds a run of every device's share of the
        # stored input axis, in device order, so the input split is the same split of every chunk.
        values = NamedSharding(mesh, P(*spec[:-2], None, split_out, split_in))
        scales = (None if value.scales is None
                  else NamedSharding(mesh, partition_spec(axes, value.scales.shape, mesh)))
        return type(value)(values=values, scales=scales, groups=value.groups)
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(
            weight=NamedSharding(mesh, partition_spec(axes, value.weight.shape, mesh)),
            scales=NamedSharding(mesh, partition_spec(axes, value.scales.shape, mesh)))
    return NamedSharding(mesh, partition_spec(axes, value.shape, mesh))


def record_splits(params: dict) -> dict:
    """`params` (placed on a mesh) with each LinearWeight's `mesh_split` set from its arrays'
    shardings, so that kernels.py can run the native kernel on each device's shard."""
    def spec(array: jax.Array) -> tuple:
        entries = tuple(array.sharding.spec) if isinstance(array.sharding, NamedSharding) else ()
        return entries + (None,) * (array.ndim - len(entries))

    def record(leaf: Any) -> Any:
        if not isinstance(leaf, LinearWeight) or not isinstance(leaf.values, jax.Array):
            return leaf
        return dataclasses.replace(leaf, mesh_split=(
            spec(leaf.values), None if leaf.scales is None else spec(leaf.scales)))
    return jax.tree_util.tree_map(record, params, is_leaf=lambda leaf: isinstance(leaf, LinearWeight))


def input_shards(mesh: Mesh, module: str, param: str, stored_shape: Sequence[int]) -> int:
    """Over how many devices the table splits the input axis of a stored weight (the second to
    last axis, or the last of the [V, d] embedding table): each chunk of the compute layout is
    split as that axis is."""
    spec = partition_spec(logical_axes(module, param), stored_shape, mesh)
    split = spec[-1] if param == "embeddings" else spec[-2]
    names = () if split is None else (split,) if isinstance(split, str) else tuple(split)
    return math.prod(mesh.shape[name] for name in names)


def params_sharding(mesh: Mesh, params: dict) -> dict:
    """The sharding tree of a whole Haiku params dict {module: {param: value}}."""
    return {module: {name: param_sharding(mesh, module, name, value) for name, value in group.items()}
            for module, group in params.items()}


def activation_sharding(mesh: Mesh, kind: str, shape: Sequence[int]) -> NamedSharding:
    """NamedSharding of a step input/output or cache array named in ACTIVATION_AXES."""
    if kind not in ACTIVATION_AXES:
        raise KeyError(f"unknown activation {kind!r}; known: {sorted(ACTIVATION_AXES)}")
    return NamedSharding(mesh, partition_spec(ACTIVATION_AXES[kind], shape, mesh))


def kv_cache_sharding(mesh: Mesh, cache: KVCache) -> KVCache:
    """A KVCache of NamedShardings: rows over data, then kv heads over the remaining mesh axes."""
    return KVCache(keys=activation_sharding(mesh, "cache_kv", cache.keys.shape),
                   values=activation_sharding(mesh, "cache_kv", cache.values.shape),
                   valid=activation_sharding(mesh, "cache_valid", cache.valid.shape),
                   length=activation_sharding(mesh, "cache_length", cache.length.shape))


def from_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.sharding.is_fully_replicated:  # every process holds it all: no communication
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
