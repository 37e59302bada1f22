"""Parameter layouts chosen at load time for the platform that computes with them.

Checkpoints always hold the official tree (int8 `QuantizedWeight8bit` linear weights, experts
stacked as [E, in, out]). On accelerators that tree is used as is: the int8 -> float convert fuses
into the matmul. XLA on CPU does not fuse it (a convert feeding a dot moves a few GB/s of int8,
a plain float32 matrix-vector product several times more), and slicing one expert out of a
stacked array copies it. So on CPU, when memory allows, `prepare_params` dequantises every linear
weight once into float32 and splits each expert stack into `ExpertWeights`, one array per expert,
which the MoE layer selects (by branch, or in code unrolled per expert) without copying.
float32 whatever the compute dtype: int8 x a bfloat16 scale is exact in float32, so the layout
holds the checkpoint's weights exactly (`to_official` gives the int8 back), and a bfloat16 model
rounds only its activations, as the official bfloat16 run of the golden sets does (XLA removed its
weight's float32 -> bfloat16 -> float32 round trip; docs/ARCHITECTURE.md, "Where the model rounds
to bfloat16"). Results are those of the official tree up to float rounding (dequantising before
or after the dot only reorders one multiply).

XLA's CPU matmuls want opposite layouts for few and many rows: a decode step's matrix-vector
product reads a weight stored [out, in] fastest, while bfloat16 matmuls over the hundreds of rows
of a prompt run 2-4x faster than float32 ones, but only on a weight stored [in, out] (a
transposed operand is copied first). So experts can keep a second copy, bfloat16 [in, out], for
prefill (`prefill_dtype`): it computes the experts of prompts long enough to give each expert
`experts.MIN_PREFILL_COPY_ROWS` rows (from about 110 tokens with 8 experts, top-2) as the official
bfloat16 model does, and costs half the float32 layout's expert bytes again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from grok1.quant import QuantizedWeight8bit

# Keep the float layout only while it leaves this share of the host's available memory free.
MAX_MEMORY_SHARE = 0.6
# The float layout's dtype (see the module docstring).
WEIGHT_DTYPE = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """The [E, in, out] weight of all experts as E separate float arrays, each stored transposed
    as [out, in]: XLA's CPU dot reads a weight contracted on its last axis fastest for the few
    rows of a decode step (measured: as fast for one row, 1.5-2x faster for 8 to 32 rows).
    `for_prefill`, when kept, holds the same experts as [in, out] arrays for matmuls over many
    rows (see the module docstring)."""

    transposed: tuple[jax.Array, ...]                   # E x [out, in], WEIGHT_DTYPE
    for_prefill: Optional[tuple[jax.Array, ...]] = None  # E x [in, out], prefill dtype

    @property
    def shape(self) -> tuple[int, ...]:
        out_size, in_size = self.transposed[0].shape
        return (len(self.transposed), in_size, out_size)

    @property
    def dtype(self):
        return self.transposed[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(int(w.nbytes) for w in self.transposed + (self.for_prefill or ()))


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _dequantize(weight: jax.Array, scales: jax.Array, dtype, transpose: bool) -> jax.Array:
    w = QuantizedWeight8bit(weight, scales).dequantize(dtype)
    return w.T if transpose else w


def float_weight(w: Any, dtype, transpose: bool = False) -> jax.Array:
    """A linear weight [in, out] as one float array of `dtype` (dequantised when int8), laid out
    as [out, in] when `transpose`."""
    if isinstance(w, QuantizedWeight8bit):
        return _dequantize(jnp.asarray(w.weight), jnp.asarray(w.scales), jnp.dtype(dtype), transpose)
    w = jnp.asarray(w, dtype)
    return jnp.asarray(w.T.copy() if transpose else w)


def float_layout_bytes(params: dict, prefill_dtype=None) -> int:
    """At most the bytes the float layout of `params` takes (every tensor in WEIGHT_DTYPE, plus
    the experts' prefill copy in `prefill_dtype` when given)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    total = sum(math.prod(leaf.shape) for leaf in leaves) * jnp.dtype(WEIGHT_DTYPE).itemsize
    if prefill_dtype is not None:
        total += sum(math.prod(params[m]["w"].shape) for m in params if is_expert_stack(m)) \
            * jnp.dtype(prefill_dtype).itemsize
    return total


def fits_in_memory(params: dict, prefill_dtype=None) -> bool:
    """Whether the float layout fits in MAX_MEMORY_SHARE of the host's available memory."""
    try:
        import psutil
    except ImportError:
        return False
    need = float_layout_bytes(params, prefill_dtype)
    return need <= MAX_MEMORY_SHARE * psutil.virtual_memory().available


def prepare_params(params: dict, platform: Optional[str] = None, prefill_dtype=None) -> dict:
    """The params laid out for fast compute on `platform` (default: the default backend).

    CPU (when it fits in memory): every linear weight dequantised into float32, expert stacks
    split into ExpertWeights, the embedding table in float32 (it is also the output projection);
    with `prefill_dtype`, each expert also as an [in, out] array of that dtype for prompts (kept
    only while both copies fit). Other platforms, or too little memory: `params` unchanged. Each
    original array is released as soon as its replacement exists, so peak memory stays near the
    float layout's size.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu" or not fits_in_memory(params):
        return params
    if prefill_dtype is not None and not fits_in_memory(params, prefill_dtype):
        prefill_dtype = None
    prepared: dict[str, dict[str, Any]] = {}
    for module in list(params):
        prepared[module] = {}
        for name in list(params[module]):
            value = params[module].pop(name)
            if name == "w" and is_expert_stack(module):
                experts = tuple(float_weight(_index(value, e), WEIGHT_DTYPE, transpose=True)
                                for e in range(value.shape[0]))
                for_prefill = None if prefill_dtype is None else tuple(
                    float_weight(_index(value, e), prefill_dtype) for e in range(value.shape[0]))
                value = ExpertWeights(experts, for_prefill)
            elif name == "w" and not module.endswith("/router"):
                value = float_weight(value, WEIGHT_DTYPE)
            elif name == "embeddings":
                value = jnp.asarray(value, WEIGHT_DTYPE)
            prepared[module][name] = value
    return prepared


@dataclasses.dataclass(frozen=True)
class StoredForm:
    """A tensor's dtype in the checkpoint and, for int8 weights, its block scales."""

    dtype: np.dtype
    scales: Optional[Any] = None


def stored_forms(params: dict) -> dict[str, dict[str, StoredForm]]:
    """How the checkpoint stores each tensor that `prepare_params` converts (module -> param ->
    StoredForm): a few bytes per output column, kept so `to_official` can give back the exact
    stored tensors."""
    forms: dict[str, dict[str, StoredForm]] = {}
    for module, group in params.items():
        for name, value in group.items():
            if name in ("w", "embeddings"):
                quantized = isinstance(value, QuantizedWeight8bit)
                forms.setdefault(module, {})[name] = StoredForm(
                    np.dtype(value.weight.dtype if quantized else value.dtype),
                    value.scales if quantized else None)
    return forms


def to_official(params: dict, forms: dict[str, dict[str, StoredForm]]) -> dict:
    """The official tree of `params` (either layout) as host numpy arrays, each tensor as the
    checkpoint stored it (`forms` from `stored_forms` before `prepare_params`): the float layout
    holds int8 x scale exactly, so dividing by the scale gives the int8 weight back. A model saved
    from this tree writes the checkpoint it was loaded from, byte for byte."""
    from grok1.sharding import to_host  # gathers a sharded array, over processes too

    def host(array: Any) -> np.ndarray:
        return to_host(array) if isinstance(array, jax.Array) else np.asarray(array)

    def official(value: Any, form: Optional[StoredForm]) -> Any:
        if isinstance(value, QuantizedWeight8bit):
            return QuantizedWeight8bit(weight=host(value.weight), scales=host(value.scales))
        if isinstance(value, ExpertWeights):
            value = np.stack([host(w).T for w in value.transposed])         # [E, in, out]
        value = host(value)
        if form is None or form.scales is None:
            return value.astype(form.dtype) if form is not None else value
        scales = host(form.scales).astype(np.float32)                      # [..., blocks, out]
        *lead, n_in, n_out = value.shape
        blocks = scales.shape[-2]
        per_block = value.reshape(*lead, blocks, n_in // blocks, n_out) / scales[..., :, None, :]
        weight = np.rint(per_block).astype(form.dtype).reshape(value.shape)
        return QuantizedWeight8bit(weight=weight, scales=host(form.scales))

    return {module: {name: official(value, forms.get(module, {}).get(name))
                     for name, value in group.items()}
            for module, group in params.items()}


def is_expert_stack(module: str) -> bool:
    """Whether `module` (a params path) holds an [E, in, out] expert stack (`.../moe/linear*`)."""
    return module.split("/")[-2:-1] == ["moe"]


def _index(w: Any, e: int) -> Any:
    """Expert `e` of a stacked [E, in, out] weight (plain or int8)."""
    if isinstance(w, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=w.weight[e], scales=w.scales[e])
    return w[e]
