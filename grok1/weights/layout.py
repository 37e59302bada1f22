"""The compute layout: how loaded weights sit in memory, one layout for every device and mesh.

Checkpoints hold the official tree: linear weights [..., in, out], int8 `QuantizedWeight8bit` with
block scales in the release (experts stacked as [E, in, out]). `to_compute_layout` keeps every
tensor in its stored dtype (int8 stays int8, bfloat16 stays bfloat16: resident at the
checkpoint's size) and only rearranges each linear weight into a `LinearWeight`
[..., chunks, out, run]: its input axis cut into runs of at most MAX_CHUNK positions, each run
stored transposed. XLA:CPU streams a weight at memory bandwidth, with the int8 -> float convert
fused in, only as a one-row product over a weight contracted on its last axis and no longer than
about 1024 (the stored [in, out] form, or a contraction of 4096, runs 30-50x slower;
benchmarks/products.py). Accelerators keep the input axis whole (`max_chunk`): their products
take a long contraction in one go. Onto one device the rearrangement is done on the host as the
checkpoint is read (`write_compute_layout`, a piece of a tensor at a time); on a mesh it runs per
tensor on the devices that hold it, shard by shard (the partition table of grok1/mesh.py describes
the stored axes; a LinearWeight's split is derived from it, `LinearWeight.sharding`, and recorded
on it once placed, `record_splits`, so a kernel can run on each device's shard). No full-size float copy ever exists.
The embedding table [V, d] is the output projection's [out, in] weight and is cut the same way
(`EmbeddingTable`); the router is tiny and float32.

`to_official` gives the stored tree back exactly (it only rearranges again), which `Model.save`
writes. How rows are multiplied by a LinearWeight is grok1/kernels/.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grok1.mesh import axes_of, partition_spec, to_host
from grok1.params import is_product_weight, logical_axes
from grok1.weights.quant import QuantizedWeight8bit


# On CPU the input axis of a weight is cut into chunks of at most this many elements: XLA:CPU's
# fused int8/bfloat16 matrix-vector product runs at bandwidth only up to about this contraction
# length (1024: 11-15 G params/s; 4096 and more: 0.3, the convert no longer fused;
# benchmarks/products.py). Accelerators keep the whole axis (`max_chunk`).
MAX_CHUNK = 1024


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "picked"],
                   meta_fields=["groups", "mesh_split"])


@dataclasses.dataclass(frozen=True)
class LinearWeight:
    """A weight in the compute layout, for `x @ w` with w [..., in, out] as the checkpoint has it:
    `values` [..., chunks, out, chunk] in the stored dtype (the input axis cut into `chunks` pieces,
    each stored transposed; with `groups` > 1, the devices' shares of the axis each cut so, see
    `chunk_count`), and for int8 weights the stored block `scales`
    [..., blocks, out] (input block b of output column o is scaled by scales[..., b, o]); None
    for float weights. Leading axes (layers, experts) index as usual; an index by a single
    (possibly traced) integer is only recorded in `picked` and applied where the weight is
    multiplied (`resolved`), so a kernel can read the entry straight out of the whole stack
    instead of a copy of it (grok1/kernels/). On a mesh, `mesh_split` records how `values` and
    `scales` are split (a PartitionSpec's entries per axis, `record_splits`), so a kernel can run
    on each device's shard (`device_split`)."""

    values: jax.Array
    scales: Optional[jax.Array] = None
    groups: int = 1
    picked: tuple = ()  # indices into the leading axes of `values`, not yet applied
    mesh_split: tuple = ()  # (values' spec, scales' spec or None), full rank; () unknown

    @property
    def chunks(self) -> int:
        return self.values.shape[-3]

    @property
    def chunk_size(self) -> int:
        return self.values.shape[-1]

    @property
    def run(self) -> int:
        """Positions of one device's share in a chunk (the whole chunk when `groups` is 1)."""
        return self.chunk_size // self.groups

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., in, out] shape (of the picked entry)."""
        *lead, chunks, n_out, size = self.values.shape
        return (*lead[len(self.picked):], chunks * size, n_out)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (0 if self.scales is None else int(self.scales.nbytes))

    def __getitem__(self, index: Any) -> "LinearWeight":
        """The weight of one expert or layer (recorded, see the class docstring), or of a slice
        of them."""
        if isinstance(index, (int, np.integer)) or (hasattr(index, "shape") and index.shape == ()):
            return dataclasses.replace(self, picked=(*self.picked, index))
        whole = self.resolved()
        return dataclasses.replace(whole, values=whole.values[index], mesh_split=(),
                                   scales=None if whole.scales is None else whole.scales[index])

    def resolved(self) -> "LinearWeight":
        """This weight with its picked indices applied (the picked entry on its own)."""
        if not self.picked:
            return self
        pick = lambda a: a[tuple(self.picked)]  # noqa: E731 - integer indices of the leading axes
        return dataclasses.replace(self, values=pick(self.values), picked=(), mesh_split=(),
                                   scales=None if self.scales is None else pick(self.scales))

    def sharding(self, mesh: jax.sharding.Mesh, axes: tuple) -> "LinearWeight":
        """This weight's NamedShardings (of `values` and `scales`) for a parameter with logical
        `axes` (of its stored form): split as the stored weight is, its last two axes swapped,
        so each device lays out its own shard while loading. The embedding table is stored
        [V, d] = [out, in], every other weight [..., in, out]."""
        spec = partition_spec(axes, self.shape, mesh)
        split_in, split_out = (spec[1], spec[0]) if isinstance(self, EmbeddingTable) else (spec[-2], spec[-1])
        # values [..., chunks, out, chunk]: each chunk holds a run of every device's share of the
        # stored input axis, in device order, so the input split is the same split of every chunk.
        values = NamedSharding(mesh, P(*spec[:-2], None, split_out, split_in))
        scales = (None if self.scales is None
                  else NamedSharding(mesh, partition_spec(axes, self.scales.shape, mesh)))
        return type(self)(values=values, scales=scales, groups=self.groups)

    def device_split(self) -> Optional[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(mesh axes splitting the output axis, mesh axes splitting the input axis) when each
        device's shard is a LinearWeight by itself (leading axes and chunks whole, the input
        share's scale blocks its own), as `mesh_split` records; else None."""
        if not self.mesh_split:
            return None
        values_spec, scales_spec = self.mesh_split
        if len(values_spec) != self.values.ndim:
            return None
        *lead, chunks, out_split, in_split = values_spec
        if any(lead) or chunks:
            return None
        out_axes, in_axes = axes_of(out_split), axes_of(in_split)
        if scales_spec is not None:
            if len(scales_spec) != self.scales.ndim:
                return None
            *scale_lead, blocks, scale_out = scales_spec
            whole_block = self.scales.shape[-2] == 1 and not blocks
            if any(scale_lead) or axes_of(scale_out) != out_axes or not (whole_block or axes_of(blocks) == in_axes):
                return None
        return out_axes, in_axes

    def positions(self, j: int) -> np.ndarray:
        """The input positions chunk j holds, in its order (see `chunk_count`)."""
        n_in = self.shape[-2]
        starts = np.arange(self.groups) * (n_in // self.groups) + j * self.run
        return (starts[:, None] + np.arange(self.run)[None, :]).reshape(-1)

    def rows_of_chunk(self, x: jax.Array, j: int) -> jax.Array:
        """x [..., in] restricted to chunk j's input positions, in the chunk's order."""
        if self.chunks == 1:
            return x
        pieces = x.reshape(*x.shape[:-1], self.groups, self.chunks, self.run)[..., :, j, :]
        return pieces.reshape(*x.shape[:-1], self.chunk_size)

    def chunk_scales(self, j: int) -> Optional[jax.Array]:
        """The scales of chunk j's runs as float32 [..., groups, out] (run g of output column o
        is scaled by [..., g, o]), or None for a float weight: each run lies inside one scale
        block, so a run's product can be scaled after it is summed. (Of a resolved weight.)"""
        if self.scales is None:
            return None
        n_in, blocks = self.shape[-2], self.scales.shape[-2]
        block_of_run = self.positions(j)[::self.run] // (n_in // blocks)           # [groups]
        return self.scales.astype(jnp.float32)[..., block_of_run, :]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "picked"],
                   meta_fields=["groups", "mesh_split"])


@dataclasses.dataclass(frozen=True)
class EmbeddingTable(LinearWeight):
    """The [V, d] embedding table in the compute layout: the weight of the output projection
    (d in, V out) in chunks like any LinearWeight, its `shape` the official [V, d]."""

    @property
    def shape(self) -> tuple[int, ...]:
        chunks, vocab, size = self.values.shape
        return (vocab, chunks * size)


def max_chunk(n_in: int) -> int:
    """The longest run of an input axis of `n_in` in one chunk: MAX_CHUNK on CPU; on accelerators
    the whole axis (scale blocks allowing), since their matrix units take a long contraction in
    one product and each extra chunk is another product: on an H200, Grok-1's [6144 -> 32768]
    expert matrix times 1 to 32 rows ran 2.4-3.8x faster in one chunk than in chunks of 1024
    (benchmarks/gpu_kernels.py, BENCHMARKS.md "GPU")."""
    return MAX_CHUNK if jax.default_backend() == "cpu" else n_in


def chunk_count(n_in: int, blocks: int = 1, shards: int = 1) -> int:
    """How many chunks to cut an input axis of `n_in` into: the fewest that leave each of the
    `shards` devices splitting the axis at most `max_chunk` positions of a chunk, each run of a
    chunk inside one of the `blocks` scale blocks. Each device's contiguous share of the stored
    axis is cut into `chunks` contiguous runs, and chunk j is the j-th run of every share (with
    one device: plain contiguous pieces), so each device lays out its own shard."""
    block = n_in // blocks
    limit = max_chunk(n_in)
    for count in range(1, n_in + 1):
        if n_in % (count * shards) == 0:
            run = n_in // (count * shards)
            if run <= limit and block % run == 0:
                return count
    return 1


def _chunked(value: Any, chunks: int, groups: int, stored_transposed: bool) -> Any:
    """[..., in, out] (or [out, in] when `stored_transposed`) -> [..., chunks, out, in / chunks]:
    the input axis as `groups` contiguous shares of `chunks` runs each, chunk j = run j of every
    share. A jax array, or a numpy one (with `groups` 1: a view of it, nothing copied)."""
    if stored_transposed:
        n_out, n_in = value.shape
        split = value.reshape(n_out, groups, chunks, n_in // (groups * chunks))    # [V, g, j, u]
        return split.transpose(2, 0, 1, 3).reshape(chunks, n_out, n_in // chunks)
    *lead, n_in, n_out = value.shape
    run = n_in // (groups * chunks)
    split = value.reshape(*lead, groups, chunks, run, n_out)                       # [..., g, j, u, out]
    k = len(lead)
    order = (*range(k), k + 1, k + 3, k, k + 2)                                    # [..., j, out, g, u]
    return split.transpose(order).reshape(*lead, chunks, n_out, n_in // chunks)


def _unchunked(values: np.ndarray, groups: int, stored_transposed: bool) -> np.ndarray:
    """The inverse of `_chunked`, on host arrays."""
    *lead, chunks, n_out, size = values.shape
    run = size // groups
    if stored_transposed:
        split = values.reshape(chunks, n_out, groups, run)                         # [j, V, g, u]
        return np.ascontiguousarray(np.transpose(split, (1, 2, 0, 3)).reshape(n_out, size * chunks))
    split = values.reshape(*lead, chunks, n_out, groups, run)                      # [..., j, out, g, u]
    k = len(lead)
    order = (*range(k), k + 2, k, k + 3, k + 1)                                    # [..., g, j, u, out]
    return np.ascontiguousarray(np.transpose(split, order).reshape(*lead, size * chunks, n_out))


def to_linear_weight(value: Any, chunks: int, stored_transposed: bool = False,
                     sharding: Any = None, groups: int = 1) -> LinearWeight:
    """A stored weight (QuantizedWeight8bit or float; [..., in, out], or [out, in] for the
    embedding table) as a LinearWeight of `chunks` chunks over `groups` contiguous shares of the
    input axis (the devices splitting it), computed where `value` lies and placed by `sharding`
    (a LinearWeight of shardings) when given."""
    quantized = isinstance(value, QuantizedWeight8bit)
    weight = value.weight if quantized else value
    chunked = lambda w: _chunked(w, chunks, groups, stored_transposed)  # noqa: E731
    if isinstance(weight, np.ndarray):
        values = np.ascontiguousarray(chunked(weight))
    else:
        values = jax.jit(chunked, out_shardings=None if sharding is None else sharding.values)(weight)
    if stored_transposed:
        return EmbeddingTable(values, None, groups)
    return LinearWeight(values, value.scales if quantized else None, groups)


def write_compute_layout(value: Any, out: Any) -> None:
    """Write a stored tensor (host numpy or QuantizedWeight8bit of numpy) into `out`, host
    buffers of its one-device compute layout (a LinearWeight of arrays, shaped as
    `compute_layout_structs` gives, or an array for any other tensor): the host-side
    `to_linear_weight`, so loading onto one device needs no compiled program."""
    if not isinstance(out, LinearWeight):
        np.copyto(out, value)
        return
    quantized = isinstance(value, QuantizedWeight8bit)
    weight = np.asarray(value.weight if quantized else value)
    pieces = _chunked(weight, out.chunks, 1, isinstance(out, EmbeddingTable))  # a view
    n_out = out.values.shape[-2]
    # Transposed in bands of output rows: a band's source columns stay in cache (4x faster than
    # one strided copy of the whole tensor).
    for start in range(0, n_out, _BAND):
        band = slice(start, start + _BAND)
        np.copyto(out.values[..., band, :], pieces[..., band, :])
    if quantized:
        np.copyto(out.scales, value.scales)


_BAND = 256


def to_compute_layout(params: dict, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """The official params tree in the compute layout: each product weight a LinearWeight,
    every other tensor as it is. Each stored weight is released as soon as its replacement
    exists, so the peak is the checkpoint plus one tensor."""
    out: dict[str, dict[str, Any]] = {}
    for module in list(params):
        group = params[module]
        out[module] = {}
        for name in list(group):
            value = group.pop(name)
            if is_product_weight(module, name) and not isinstance(value, LinearWeight):
                value = _to_compute(module, name, value, mesh)
            out[module][name] = value
    return out


def _layout_of(module: str, name: str, value: Any, mesh: Optional[jax.sharding.Mesh]
               ) -> tuple[int, bool, int]:
    """(chunk count, stored as [out, in], devices splitting the input axis) of a product weight:
    the embedding table is [V, d]."""
    table = name == "embeddings"
    n_in = value.shape[-1] if table else value.shape[-2]
    blocks = value.scales.shape[-2] if isinstance(value, QuantizedWeight8bit) else 1
    shards = 1 if mesh is None else input_shards(mesh, module, name, value.shape)
    return chunk_count(n_in, blocks, shards), table, shards


def _to_compute(module: str, name: str, value: Any, mesh: Optional[jax.sharding.Mesh]) -> LinearWeight:
    chunks, table, groups = _layout_of(module, name, value, mesh)
    if mesh is None:
        return to_linear_weight(value, chunks, table)
    abstract = jax.eval_shape(lambda v: to_linear_weight(v, chunks, table, groups=groups), value)
    sharding = abstract.sharding(mesh, logical_axes(module, name))
    return to_linear_weight(value, chunks, table, sharding, groups)


def compute_layout_structs(params: dict, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """`to_compute_layout` of a tree of ShapeDtypeStructs (plans: shapes only, nothing computed)."""
    def struct(module: str, name: str, value: Any) -> Any:
        if not is_product_weight(module, name):
            return value
        chunks, table, groups = _layout_of(module, name, value, mesh)
        return jax.eval_shape(lambda v: to_linear_weight(v, chunks, table, groups=groups), value)

    return {module: {name: struct(module, name, value) for name, value in group.items()}
            for module, group in params.items()}


def to_official(params: dict) -> dict:
    """The official tree of `params` (either layout) as host numpy arrays, each tensor exactly
    as the checkpoint stored it: a model saved from it writes the files it was loaded from."""
    def host(array: Any) -> np.ndarray:
        # gathers a sharded array, over processes too
        return to_host(array) if isinstance(array, jax.Array) else np.asarray(array)

    def official(value: Any) -> Any:
        if isinstance(value, LinearWeight):
            weight = _unchunked(host(value.values), value.groups, isinstance(value, EmbeddingTable))
            return weight if value.scales is None else QuantizedWeight8bit(weight, host(value.scales))
        if isinstance(value, QuantizedWeight8bit):
            return QuantizedWeight8bit(weight=host(value.weight), scales=host(value.scales))
        return host(value)

    return {module: {name: official(value) for name, value in group.items()}
            for module, group in params.items()}


def resident_bytes(params: dict) -> int:
    """Bytes the params hold (all devices together)."""
    leaves = jax.tree_util.tree_leaves(params)
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)


# ---- on a mesh --------------------------------------------------------------------------------

def record_splits(params: dict) -> dict:
    """`params` (placed on a mesh) with each LinearWeight's `mesh_split` set from its arrays'
    shardings, so that a kernel can run on each device's shard (`LinearWeight.device_split`)."""
    def spec(array: jax.Array) -> tuple:
        entries = tuple(array.sharding.spec) if isinstance(array.sharding, NamedSharding) else ()
        return entries + (None,) * (array.ndim - len(entries))

    def record(leaf: Any) -> Any:
        if not isinstance(leaf, LinearWeight) or not isinstance(leaf.values, jax.Array):
            return leaf
        return dataclasses.replace(leaf, mesh_split=(
            spec(leaf.values), None if leaf.scales is None else spec(leaf.scales)))
    return jax.tree_util.tree_map(record, params, is_leaf=lambda leaf: isinstance(leaf, LinearWeight))


def input_shards(mesh: jax.sharding.Mesh, module: str, param: str, stored_shape: Sequence[int]) -> int:
    """Over how many devices the table splits the input axis of a stored weight (the second to
    last axis, or the last of the [V, d] embedding table): each chunk of the compute layout is
    split as that axis is."""
    spec = partition_spec(logical_axes(module, param), stored_shape, mesh)
    split = spec[-1] if param == "embeddings" else spec[-2]
    names = () if split is None else (split,) if isinstance(split, str) else tuple(split)
    return math.prod(mesh.shape[name] for name in names)
