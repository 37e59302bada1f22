"""Stacking: the official parameter tree as the stacked one the model reads, and back.

Checkpoints (and everything that shows or writes parameter names) use the official tree, one
module per layer: `transformer/decoder_layer_{i}/moe/linear` (the names: grok1/params.py). The model runs one layer body over
all layers (grok1/model.py), so it reads each such module once, stacked along a new leading
layer axis: `transformer/decoder_layers/moe/linear` holds all L layers' tensors as [L, ...].

`grok1.load` holds the stacked form (in the compute layout of grok1/weights/layout.py, whose int8
weights XLA streams straight out of the stacked arrays); `grok1.model.transformed` runs
whichever form it is given, the official one unrolled. Onto one device, `HostStack` assembles
that form on the host as the checkpoint is read, each tensor written once into its layer's slot;
over a mesh each tensor is placed where it belongs, laid out there, then stacked
(`stack_layers`).

Both directions are generic pytree operations on a module's group of parameters: each leaf is
stacked (or indexed) on its own, whatever dataclass holds it (`QuantizedWeight8bit`, a layout's
own registered dataclass, ...), so a new parameter layout needs nothing here. Inside the layer
loop, `layer_of` picks one layer: a LinearWeight only records the layer (grok1/weights/layout.py), so the
kernel that multiplies by it reads the layer out of the stack where it lies.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grok1.params import STACKED_PREFIX, is_stacked, official_layer, official_module, stacked_module
from grok1.runtime.buffers import aligned_empty
from grok1.weights.layout import (EmbeddingTable, LinearWeight, compute_layout_structs,
                                  write_compute_layout)


def stack_layers(params: dict) -> dict:
    """The stacked tree of an official params dict {module: {param: value}}: every
    `transformer/decoder_layer_{i}/X` group becomes `transformer/decoder_layers/X` with each
    leaf [L, ...]; other modules pass unchanged. Empties `params` as it goes (one module's
    layers at a time), so peak memory stays one module above the tree's size. A sharded leaf
    keeps its layer's sharding, unsplit along the layer axis."""
    layers: dict[str, dict[int, str]] = {}
    for module in params:
        where = official_layer(module)
        if where:
            layers.setdefault(where[1], {})[where[0]] = module
    stacked: dict[str, Any] = {}
    for module in list(params):
        where = official_layer(module)
        if not where:
            stacked[module] = params.pop(module)
            continue
        inner = where[1]
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


class HostStack:
    """The `place` of `grok1.checkpoint.load_params` for one device: each tensor is read in pieces
    (an expert, a band of the embedding table) and each piece written, in its compute layout,
    into its layer's slot of host buffers already shaped as the stacked tree; `placed` then puts
    them on the device, which on CPU takes the buffers over without a copy. So the weights are
    held once, never copied to be stacked, and nothing is compiled to load
    (`stack_layers(to_compute_layout(...))` holds a module's layers twice)."""

    PIECE_BYTES = 8 << 20  # at most this much of a tensor is in host memory besides its slot

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.buffers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # load_params calls from several threads

    def __call__(self, spec: Any, read: Callable[[Optional[slice]], Any]) -> None:
        found = official_layer(spec.module)
        module = stacked_module(found[1]) if found else spec.module
        # Expert stacks [E, in, out] and the embedding table [V, d] are read a band of their
        # first axis at a time (the rows of weight and scales alike); anything else whole.
        banded = len(spec.shape) == 3 or spec.param == "embeddings"
        rows = spec.shape[0]
        first = read(slice(0, 1) if banded else None)
        slot = self._slot(module, spec, first, rows if banded else None)
        if found:
            slot = jax.tree_util.tree_map(lambda buffer: buffer[found[0]], slot)
        if not banded:
            write_compute_layout(first, slot)
            return
        row_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(first))
        step = max(1, self.PIECE_BYTES // row_bytes)
        for start in range(0, rows, step):
            band = slice(start, min(rows, start + step))
            if isinstance(slot, EmbeddingTable):                  # [chunks, V, run]: V is axis 1
                part = dataclasses.replace(slot, values=slot.values[:, band])
            elif isinstance(slot, LinearWeight):
                part = dataclasses.replace(slot, values=slot.values[band], scales=None
                                           if slot.scales is None else slot.scales[band])
            else:
                part = slot[band]
            write_compute_layout(first if band.stop - band.start == 1 and start == 0 else read(band), part)

    def _slot(self, module: str, spec: Any, first: Any, rows: Optional[int]) -> Any:
        """The host buffers of params[module][spec.param] (all layers), made on first use from
        `first`: the tensor, or (`rows` given) its first row along the first axis."""
        with self._lock:
            group = self.buffers.setdefault(module, {})
            if spec.param not in group:
                whole = jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(a.shape if rows is None else (rows, *a.shape[1:]), a.dtype),
                    first)
                struct = compute_layout_structs({spec.module: {spec.param: whole}})[spec.module][spec.param]
                lead = (self.num_layers,) if is_stacked(module) else ()
                group[spec.param] = jax.tree_util.tree_map(
                    lambda s: aligned_empty(lead + tuple(s.shape), s.dtype), struct)
            return group[spec.param]

    def placed(self, device: Any) -> dict:
        """The stacked params dict on `device` (the buffers are handed over: use it once)."""
        params = jax.tree_util.tree_map(lambda buffer: jax.device_put(buffer, device), self.buffers)
        self.buffers = {}
        return jax.block_until_ready(params)


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
