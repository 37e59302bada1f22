"""Where every parameter lives on a mesh, whatever its format, and what each device holds.

Each format owns its own split (`QuantizedWeight8bit.sharding`, `LinearWeight.sharding`); a plain
array is split by its logical axes (grok1/params.py) through the mesh's table (grok1/mesh.py).
`release_structs` gives a parameter tree as the release stores it, as abstract arrays, so plans
and `describe` can size a mesh without any weights.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from grok1.mesh import partition_spec
from grok1.params import logical_axes, release_storage
from grok1.weights.layout import LinearWeight
from grok1.weights.quant import QuantizedWeight8bit


def param_sharding(mesh: jax.sharding.Mesh, module: str, param: str, value: Any) -> Any:
    """The sharding of params[module][param] (a NamedSharding, or a QuantizedWeight8bit or
    LinearWeight of them) for `value` or its abstract shape."""
    axes = logical_axes(module, param)
    if isinstance(value, (LinearWeight, QuantizedWeight8bit)):
        return value.sharding(mesh, axes)
    return NamedSharding(mesh, partition_spec(axes, value.shape, mesh))


def params_sharding(mesh: jax.sharding.Mesh, params: dict) -> dict:
    """The sharding tree of a whole Haiku params dict {module: {param: value}}."""
    return {module: {name: param_sharding(mesh, module, name, value) for name, value in group.items()}
            for module, group in params.items()}


def release_structs(shapes: dict) -> dict:
    """An official tree of shapes (`model.param_shapes`) as ShapeDtypeStructs stored like the
    release (grok1/params.py, `release_storage`): int8 linear weights with their block scales as
    QuantizedWeight8bit, bfloat16 embeddings and norm scales, a float32 router."""
    out: dict = {}
    for module, group in shapes.items():
        for name, struct in group.items():
            shape = tuple(struct.shape)
            storage = release_storage(module, name, shape)
            value = jax.ShapeDtypeStruct(shape, storage.dtype)
            if storage.quantized:
                value = QuantizedWeight8bit(
                    weight=value, scales=jax.ShapeDtypeStruct(storage.scales_shape, storage.scales_dtype))
            out.setdefault(module, {})[name] = value
    return out


def bytes_per_device(structs: Any, shardings: Any) -> int:
    """Bytes the largest-loaded device holds of a tree of ShapeDtypeStructs under `shardings`."""
    total: dict[Any, int] = {}
    for struct, sharding in zip(jax.tree_util.tree_leaves(structs), jax.tree_util.tree_leaves(shardings)):
        itemsize = np.dtype(struct.dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(struct.shape)).items():
            n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, struct.shape))
            total[device] = total.get(device, 0) + n * itemsize
    return max(total.values(), default=0)
