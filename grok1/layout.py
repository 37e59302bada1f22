"""The compute layout: how loaded weights sit in memory, one layout for every device and mesh.

Checkpoints hold the official tree: linear weights [..., in, out], int8 `QuantizedWeight8bit` with
block scales in the release (experts stacked as [E, in, out]). `to_compute_layout` keeps every
tensor in its stored dtype (int8 stays int8, bfloat16 stays bfloat16: resident at the
checkpoint's size) and only transposes each linear weight into a `LinearWeight` [..., out, in]:
XLA's matrix-vector product (a decode step) streams a weight contracted on its last axis at memory
bandwidth, with the int8 -> float convert fused into it, while the stored [in, out] form runs
about 30x slower on CPU (benchmarks/products.py). The transpose runs per tensor on the devices
that hold it, shard by shard (the partition table in sharding.py describes the stored axes; a
LinearWeight's shards are that table's, transposed), so no full-size float copy ever exists.
The embedding table [V, d] is already [out, in] for the output projection and stays as stored;
the router is tiny and float32.

`to_official` gives the stored tree back (exactly: it only transposes again), which `Model.save`
writes. How rows are multiplied by a LinearWeight is grok1/kernels.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from grok1.quant import QuantizedWeight8bit


# The input axis of a weight is cut into chunks of at most this many elements: XLA:CPU's fused
# int8/bfloat16 matrix-vector product runs at bandwidth only up to about this contraction length
# (1024: 11-15 G params/s; 4096 and more: 0.3, the convert no longer fused; benchmarks/products.py).
MAX_CHUNK = 1024


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearWeight:
    """A weight in the compute layout, for `x @ w` with w [..., in, out] as the checkpoint has it:
    `values` [..., chunks, out, chunk] in the stored dtype (the input axis cut into `chunks`
    contiguous pieces, each stored transposed), and for int8 weights the stored block `scales`
    [..., blocks, out] (input block b of output column o is scaled by scales[..., b, o]); None
    for float weights. Leading axes (experts) index as usual."""

    values: jax.Array
    scales: Optional[jax.Array] = None

    @property
    def chunks(self) -> int:
        return self.values.shape[-3]

    @property
    def chunk_size(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., in, out] shape."""
        *lead, chunks, n_out, size = self.values.shape
        return (*lead, chunks * size, n_out)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (0 if self.scales is None else int(self.scales.nbytes))

    def __getitem__(self, index: Any) -> "LinearWeight":
        """The weight of one expert (or a slice of experts) of a stacked weight."""
        return LinearWeight(self.values[index], None if self.scales is None else self.scales[index])

    def dequantized_chunk(self, j: int) -> jax.Array:
        """Chunk j of the weight as float32 [..., out, chunk] (int8 x scale is exact in float32).
        Inside a product XLA fuses this into the operand instead of materialising it."""
        values = self.values[..., j, :, :].astype(jnp.float32)
        if self.scales is None:
            return values
        size, n_in = self.chunk_size, self.shape[-2]
        block = n_in // self.scales.shape[-2]
        scales = jnp.swapaxes(self.scales.astype(jnp.float32), -1, -2)             # [..., out, blocks]
        if size <= block:  # the chunk lies inside one scale block
            b = j * size // block
            return values * scales[..., b:b + 1]
        per = size // block  # the chunk spans whole blocks
        *lead, n_out, _ = values.shape
        blocks = values.reshape(*lead, n_out, per, block) * scales[..., j * per:(j + 1) * per, None]
        return blocks.reshape(values.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmbeddingTable(LinearWeight):
    """The [V, d] embedding table in the compute layout: the weight of the output projection
    (d in, V out) in chunks like any LinearWeight, its `shape` the official [V, d]."""

    @property
    def shape(self) -> tuple[int, ...]:
        chunks, vocab, size = self.values.shape
        return (vocab, chunks * size)


def chunk_count(n_in: int, blocks: int = 1, shards: int = 1) -> int:
    """How many chunks to cut an input axis of `n_in` into: the fewest of at most MAX_CHUNK
    elements that are a multiple of `shards` (the devices splitting that axis, so each holds
    whole chunks) and nest with the `blocks` scale blocks (a chunk inside one block, or whole
    blocks in a chunk). `shards` when none fits."""
    block = n_in // blocks
    for count in range(shards, n_in + 1, shards):
        size = n_in // count
        if n_in % count == 0 and size <= MAX_CHUNK and (block % size == 0 or size % block == 0):
            return count
    return shards


def is_linear(module: str, name: str) -> bool:
    """Whether params[module][name] is a weight of a product: every `w` but the router's, and the
    embedding table (the output projection's weight, [out, in] as stored)."""
    return (name == "w" and not module.endswith("/router")) or name == "embeddings"


def _chunked(value: jax.Array, chunks: int, stored_transposed: bool) -> jax.Array:
    """[..., in, out] (or [out, in] when `stored_transposed`) -> [..., chunks, out, in / chunks]."""
    if stored_transposed:
        n_out, n_in = value.shape
        return jnp.swapaxes(value.reshape(n_out, chunks, n_in // chunks), 0, 1)
    *lead, n_in, n_out = value.shape
    return jnp.swapaxes(value.reshape(*lead, chunks, n_in // chunks, n_out), -1, -2)


def _unchunked(values: np.ndarray, stored_transposed: bool) -> np.ndarray:
    """The inverse of `_chunked`, on host arrays."""
    *lead, chunks, n_out, size = values.shape
    if stored_transposed:
        return np.ascontiguousarray(np.swapaxes(values, 0, 1).reshape(n_out, chunks * size))
    return np.ascontiguousarray(np.swapaxes(values, -1, -2).reshape(*lead, chunks * size, n_out))


def to_linear_weight(value: Any, chunks: int, stored_transposed: bool = False,
                     sharding: Any = None) -> LinearWeight:
    """A stored weight (QuantizedWeight8bit or float; [..., in, out], or [out, in] for the
    embedding table) as a LinearWeight of `chunks` chunks, computed where `value` lies and placed
    by `sharding` (a LinearWeight of shardings) when given."""
    quantized = isinstance(value, QuantizedWeight8bit)
    weight = value.weight if quantized else value
    chunked = lambda w: _chunked(w, chunks, stored_transposed)  # noqa: E731
    if isinstance(weight, np.ndarray):
        values = np.asarray(chunked(jnp.asarray(weight)))
    else:
        values = jax.jit(chunked, out_shardings=None if sharding is None else sharding.values)(weight)
    if stored_transposed:
        return EmbeddingTable(values)
    return LinearWeight(values, value.scales if quantized else None)


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
            if is_linear(module, name) and not isinstance(value, LinearWeight):
                value = _to_compute(module, name, value, mesh)
            out[module][name] = value
    return out


def _layout_of(module: str, name: str, value: Any, mesh: Optional[jax.sharding.Mesh]) -> tuple[int, bool]:
    """(chunk count, stored as [out, in]) of a product weight: the embedding table is [V, d]."""
    table = name == "embeddings"
    n_in = value.shape[-1] if table else value.shape[-2]
    blocks = value.scales.shape[-2] if isinstance(value, QuantizedWeight8bit) else 1
    shards = 1
    if mesh is not None:
        from grok1.sharding import input_shards
        shards = input_shards(mesh, module, name, value.shape)
    return chunk_count(n_in, blocks, shards), table


def _to_compute(module: str, name: str, value: Any, mesh: Optional[jax.sharding.Mesh]) -> LinearWeight:
    chunks, table = _layout_of(module, name, value, mesh)
    if mesh is None:
        return to_linear_weight(value, chunks, table)
    from grok1.sharding import param_sharding
    abstract = jax.eval_shape(lambda v: to_linear_weight(v, chunks, table), value)
    return to_linear_weight(value, chunks, table, param_sharding(mesh, module, name, abstract))


def compute_layout_structs(params: dict, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """`to_compute_layout` of a tree of ShapeDtypeStructs (plans: shapes only, nothing computed)."""
    def struct(module: str, name: str, value: Any) -> Any:
        if not is_linear(module, name):
            return value
        chunks, table = _layout_of(module, name, value, mesh)
        return jax.eval_shape(lambda v: to_linear_weight(v, chunks, table), value)

    return {module: {name: struct(module, name, value) for name, value in group.items()}
            for module, group in params.items()}


def to_official(params: dict) -> dict:
    """The official tree of `params` (either layout) as host numpy arrays, each tensor exactly
    as the checkpoint stored it: a model saved from it writes the files it was loaded from."""
    from grok1.sharding import to_host  # gathers a sharded array, over processes too

    def host(array: Any) -> np.ndarray:
        return to_host(array) if isinstance(array, jax.Array) else np.asarray(array)

    def official(value: Any) -> Any:
        if isinstance(value, LinearWeight):
            weight = _unchunked(host(value.values), isinstance(value, EmbeddingTable))
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


def is_expert_stack(module: str) -> bool:
    """Whether `module` (a params path) holds an [E, in, out] expert stack (`.../moe/linear*`)."""
    return module.split("/")[-2:-1] == ["moe"]
