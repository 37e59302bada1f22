"""The one place that maps the official parameter tree to the stacked one the model reads.

Checkpoints (and everything that shows or writes parameter names) use the official tree, one
module per layer: `transformer/decoder_layer_{i}/moe/linear`. The model runs one layer body over
all layers (grok1/model.py), so it reads each such module once, stacked along a new leading
layer axis: `transformer/decoder_layers/moe/linear` holds all L layers' tensors as [L, ...].

`grok1.load` holds the stacked form (in the compute layout of grok1/layout.py, whose int8
weights XLA streams straight out of the stacked arrays); `grok1.model.transformed` runs
whichever form it is given, the official one unrolled.

Both directions are generic pytree operations on a module's group of parameters: each leaf is
stacked (or indexed) on its own, whatever dataclass holds it (`QuantizedWeight8bit`, a layout's
own registered dataclass, ...), so a new parameter layout needs nothing here. Inside the layer
loop, `layer_of` picks one layer: a LinearWeight only records the layer (grok1/layout.py), so the
kernel that multiplies by it reads the layer out of the stack where it lies.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grok1.layout import LinearWeight

LAYERS_MODULE = "decoder_layers"                  # the model's module name for all layers at once
STACKED_PREFIX = f"transformer/{LAYERS_MODULE}/"
_OFFICIAL_LAYER = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")


def layer_module(layer: int) -> str:
    """The official module name of decoder layer `layer` (inside `transformer`)."""
    return f"decoder_layer_{layer}"


def official_module(layer: int, inner: str) -> str:
    """The official module path of `inner` (e.g. "moe/linear") in decoder layer `layer`."""
    return f"transformer/{layer_module(layer)}/{inner}"


def stacked_module(inner: str) -> str:
    """The stacked module path of `inner` (e.g. "moe/linear"), all layers at once."""
    return STACKED_PREFIX + inner


def is_stacked(module: str) -> bool:
    """Whether `module` is a stacked path, whose tensors have a leading layer axis."""
    return module.startswith(STACKED_PREFIX)


def has_stacked_layers(params: dict) -> bool:
    """Whether a params dict holds its decoder layers stacked (else one module per layer)."""
    return any(is_stacked(module) for module in params)


def stack_layers(params: dict) -> dict:
    """The stacked tree of an official params dict {module: {param: value}}: every
    `transformer/decoder_layer_{i}/X` group becomes `transformer/decoder_layers/X` with each
    leaf [L, ...]; other modules pass unchanged. Empties `params` as it goes (one module's
    layers at a time), so peak memory stays one module above the tree's size. A sharded leaf
    keeps its layer's sharding, unsplit along the layer axis."""
    layers: dict[str, dict[int, str]] = {}
    for module in params:
        match = _OFFICIAL_LAYER.match(module)
        if match:
            layers.setdefault(match.group(2), {})[int(match.group(1))] = module
    stacked: dict[str, Any] = {}
    for module in list(params):
        match = _OFFICIAL_LAYER.match(module)
        if not match:
            stacked[module] = params.pop(module)
            continue
        inner = match.group(2)
        if stacked_module(inner) in stacked or inner not in layers:
            continue
        found = layers.pop(inner)
        if sorted(found) != list(range(len(found))):
            missing = sorted(set(range(max(found) + 1)) - set(found))
            raise ValueError(f"params hold {inner!r} for layers {sorted(found)}, missing layers "
                             f"{missing}: decoder layers must be numbered 0..L-1")
        groups = [params.pop(found[i]) for i in range(len(found))]
        stacked[stacked_module(inner)] = jax.tree_util.tree_map(lambda *xs: _stack(xs), *groups)
    return stacked


def unstack_layers(params: dict) -> dict:
    """The official tree of a stacked params dict (the inverse of `stack_layers`): layer i of
    each `transformer/decoder_layers/X` leaf becomes `transformer/decoder_layer_{i}/X`."""
    official: dict[str, Any] = {}
    for module, group in params.items():
        if not is_stacked(module):
            official[module] = group
            continue
        inner = module[len(STACKED_PREFIX):]
        num_layers = jax.tree_util.tree_leaves(group)[0].shape[0]
        for i in range(num_layers):
            official[official_module(i, inner)] = jax.tree_util.tree_map(lambda x: x[i], group)
    return official


def layer_of(params: dict, index: jax.Array) -> dict:
    """Layer `index` (traced, inside the layer loop) of a stacked module group's params: each
    array's entry, and each LinearWeight with the layer recorded rather than sliced out."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], params,
                                  is_leaf=lambda leaf: isinstance(leaf, LinearWeight))


def _stack(xs: tuple[Any, ...]) -> Any:
    """One leaf of every layer stacked along a new leading axis: numpy stays numpy; a jax array
    sharded by a NamedSharding keeps its split, the layer axis whole."""
    if not any(isinstance(x, jax.Array) for x in xs):
        return np.stack([np.asarray(x) for x in xs])
    concrete = not any(isinstance(x, jax.core.Tracer) for x in xs)
    if concrete and isinstance(xs[0].sharding, NamedSharding):
        sharding = xs[0].sharding
        out = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out)(*xs)
    return jnp.stack(xs)
