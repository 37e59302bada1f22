"""Device meshes and the one table that says how every parameter is split over them.

Each parameter declares its *logical* axes once (`PARAM_AXES`); `LOGICAL_TO_MESH` maps logical
axes to mesh axes. To try another sharding strategy, change that mapping; the rest of the code
turns it into `NamedSharding`s. No regexes over parameter paths.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grok1.quant import QuantizedWeight8bit

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

# Logical axis -> mesh axes it is split over (None: replicated).
LOGICAL_TO_MESH: dict[str, Any] = {
    # The embedding table is split along d over the model axis, like the official code: the input
    # lookup then needs no communication, and the tied output projection reduces over d.
    "embed": "model",
    "vocab": None,
    # Norm scales and the router are tiny: replicate them everywhere.
    "norm": None,
    "router_experts": None,
    "embed_in": None,
    "embed_out": None,
    # Attention heads and the expert hidden (ffn) axis are split over the model axis
    # (Megatron-style: column-parallel in, row-parallel out, one all-reduce per sublayer).
    "heads": "model",
    "kv_heads": "model",
    "ffn": "model",
    # Experts go to the expert axis when the mesh has one (size 1 otherwise: no split).
    "experts": "expert",
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
            shape[name] = int(value)
    else:
        raise ValueError(f"mesh spec {spec!r} is not DATAxMODEL, DATAxEXPERTxMODEL or "
                         f"axis=size,... (axes: {', '.join(MESH_AXES)})")
    if any(n < 1 for n in shape.values()):
        raise ValueError(f"mesh axis sizes must be positive, got {spec!r}")
    return {name: shape.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "1x1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, expert, model) from a spec such as "1x8" or "data=2,model=4"."""
    shape = parse_mesh_spec(spec) if isinstance(spec, str) else {n: spec.get(n, 1) for n in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(shape.values())
    if needed != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {needed} devices but {len(devices)} are available "
            f"({jax.default_backend()}); choose a mesh whose sizes multiply to {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape([shape[n] for n in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_axes(module: str, param: str) -> tuple[Optional[str], ...]:
    """Logical axes of a parameter from its official module path."""
    parts = module.split("/")
    key = re.sub(r"^rms_norm(_\d+)?$", "rms_norm", parts[-1])
    if key in ("linear", "linear_v", "linear_1"):
        key = f"{key}@{'moe' if parts[-2] == 'moe' else 'attention'}"
    return PARAM_AXES[key]


def partition_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for `shape`, splitting an axis only where its mesh axes divide it."""
    out = []
    for axis, size in zip(axes, shape):
        mesh_axis = LOGICAL_TO_MESH.get(axis) if axis else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis] == 0 and mesh.shape[mesh_axis] > 1:
            out.append(mesh_axis)
        else:
            out.append(None)
    return P(*out)


def param_sharding(mesh: Mesh, module: str, param: str, value: Any) -> Any:
    """NamedSharding of a parameter (a QuantizedWeight8bit of shardings for int8 weights).

    Block scales [..., blocks, out] follow the weight: same split of the leading and output axes,
    and the blocks axis split like the weight's input axis when the block count allows it.
    """
    axes = logical_axes(module, param)
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(
            weight=NamedSharding(mesh, partition_spec(axes, value.weight.shape, mesh)),
            scales=NamedSharding(mesh, partition_spec(axes, value.scales.shape, mesh)))
    return NamedSharding(mesh, partition_spec(axes, value.shape, mesh))


def place_sharded(mesh: Mesh, spec: Any, value: Any) -> Any:
    """Put one host tensor onto the mesh; each device receives only its own slice."""
    sharding = param_sharding(mesh, spec.module, spec.param, value)
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=_from_host(value.weight, sharding.weight),
                                   scales=_from_host(value.scales, sharding.scales))
    return _from_host(value, sharding)


def _from_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
