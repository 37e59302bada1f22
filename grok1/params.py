"""The parameter schema: what each parameter of Grok-1 is, asked by name.

Every other module asks here instead of parsing paths on its own:

- the path grammar: the official tree names one module per decoder layer,
  `transformer/decoder_layer_{i}/moe/linear`; the model reads the layers stacked along a leading
  axis under `transformer/decoder_layers/moe/linear` (grok1/weights/stacking.py);
- each parameter's kind (the same module names occur in attention and in the experts, so the
  linears are told apart by their sublayer: "linear@attention", "linear_1@moe") and component
  (embeddings, attention, router, experts, norms);
- its logical axes, which grok1/mesh.py maps to mesh axes;
- how the release stores it: int8 with block scales for the linear weights (the row-parallel
  ones in 8 blocks), bfloat16 embeddings and norm scales, a float32 router;
- the tensor order of `ckpt-0/`: the official tree flattened as `jax.tree_util` flattens a Haiku
  params dict, module paths sorted as strings, then param names.

The shapes themselves come from the model code (grok1/model.py, `param_shapes`), never from here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional

import ml_dtypes
import numpy as np


# ---- path grammar ---------------------------------------------------------------------------------

TRANSFORMER = "transformer"
LAYERS_MODULE = "decoder_layers"        # the model's module name for all layers at once
STACKED_PREFIX = f"{TRANSFORMER}/{LAYERS_MODULE}/"
_OFFICIAL_LAYER = re.compile(rf"^{TRANSFORMER}/decoder_layer_(\d+)/(.+)$")
_LAYER_INDEX = re.compile(rf"^{TRANSFORMER}/decoder_layer_(\d+)(/|$)")


def layer_module(layer: int | str) -> str:
    """The official module name of decoder layer `layer` (inside `transformer`)."""
    return f"decoder_layer_{layer}"


def official_module(layer: int, inner: str) -> str:
    """The official module path of `inner` (e.g. "moe/linear") in decoder layer `layer`."""
    return f"{TRANSFORMER}/{layer_module(layer)}/{inner}"


def stacked_module(inner: str) -> str:
    """The stacked module path of `inner` (e.g. "moe/linear"), all layers at once."""
    return STACKED_PREFIX + inner


def is_stacked(module: str) -> bool:
    """Whether `module` is a stacked path, whose tensors have a leading layer axis."""
    return module.startswith(STACKED_PREFIX)


def has_stacked_layers(params: Iterable[str]) -> bool:
    """Whether a params dict (or its module paths) holds the decoder layers stacked (else one
    module per layer)."""
    return any(is_stacked(module) for module in params)


def official_layer(module: str) -> Optional[tuple[int, str]]:
    """(layer, inner path) of an official per-layer module path
    (`transformer/decoder_layer_3/moe/linear` -> (3, "moe/linear")); None for any other path."""
    match = _OFFICIAL_LAYER.match(module)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_index(module: str) -> Optional[int]:
    """The decoder layer of an official module path, or of a Haiku module inside one
    (`transformer/decoder_layer_3` itself too); None outside the per-layer modules."""
    match = _LAYER_INDEX.match(module)
    return int(match.group(1)) if match else None


# ---- kinds, components and logical axes -----------------------------------------------------------

# Logical axes of each parameter, by kind (`param_kind`). grok1/mesh.py maps them to mesh axes.
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

# The kinds of each component, as `describe` groups the parameters.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "embeddings": ("in_out_embed",),
    "attention": ("query", "key", "value", "linear@attention"),
    "router": ("router",),
    "experts": ("linear@moe", "linear_v@moe", "linear_1@moe"),
    "norms": ("rms_norm",),
}

# A decoder layer's modules in the order the forward pass uses them.
LAYER_ORDER = ("rms_norm", "multi_head_attention/query", "multi_head_attention/key",
               "multi_head_attention/value", "multi_head_attention/linear", "rms_norm_1",
               "rms_norm_2", "router", "moe/linear", "moe/linear_v", "moe/linear_1", "rms_norm_3")


def param_kind(module: str) -> str:
    """The kind of a module path's parameters: its last part, "@moe"/"@attention" for the
    linears (the same names occur in both sublayers), and "rms_norm" for every numbered norm."""
    parts = module.split("/")
    key = re.sub(r"^rms_norm(_\d+)?$", "rms_norm", parts[-1])
    if key in ("linear", "linear_v", "linear_1"):
        key = f"{key}@{'moe' if len(parts) > 1 and parts[-2] == 'moe' else 'attention'}"
    return key


def component(module: str) -> str:
    """Which component a module belongs to: embeddings, attention, router, experts or norms."""
    kind = param_kind(module)
    for name, kinds in COMPONENTS.items():
        if kind in kinds:
            return name
    raise KeyError(f"no component holds parameters of {module}; kinds: {sorted(PARAM_AXES)}")


def logical_axes(module: str, param: str) -> tuple[Optional[str], ...]:
    """Logical axes of a parameter from its module path, official or stacked (whose leading
    axis is "layers")."""
    key = param_kind(module)
    if key not in PARAM_AXES:
        raise KeyError(f"no partition rule for parameter {module}/{param}; rules: {sorted(PARAM_AXES)}")
    return ("layers",) + PARAM_AXES[key] if is_stacked(module) else PARAM_AXES[key]


def is_quantized_linear(module: str, param: str) -> bool:
    """Whether the release stores params[module][param] as int8 with block scales: the weight
    `w` of every linear but the router."""
    return param == "w" and param_kind(module) != "router"


def is_product_weight(module: str, param: str) -> bool:
    """Whether params[module][param] is the weight of a product that grok1/kernels computes from
    the compute layout: every int8 linear, and the embedding table (the output projection's
    weight, [out, in] as stored). The router is a tiny float32 product of its own."""
    return is_quantized_linear(module, param) or param == "embeddings"


def is_expert_stack(module: str) -> bool:
    """Whether `module` holds an [E, in, out] expert stack (`.../moe/linear*`)."""
    return param_kind(module).endswith("@moe")


# ---- how the release stores each parameter ------------------------------------------------------

# int8 scale blocks per weight in the release: one block per shard of its 8-way model axis for the
# row-parallel weights (attention output, moe linear_1), one block for every other int8 weight.
RELEASE_SCALE_BLOCKS = {"linear@attention": 8, "linear_1@moe": 8}


@dataclasses.dataclass(frozen=True)
class Storage:
    """How the release stores one parameter: `dtype`, and for int8 weights the shape and dtype of
    their block scales [..., blocks, out] (None otherwise)."""

    dtype: np.dtype
    scales_shape: Optional[tuple[int, ...]] = None
    scales_dtype: Optional[np.dtype] = None

    @property
    def quantized(self) -> bool:
        return self.scales_shape is not None


def release_scale_blocks(module: str, n_in: int) -> int:
    """Scale blocks of an int8 weight with input axis `n_in` as in the release (8 for the
    row-parallel weights where the axis allows it, else 1)."""
    blocks = RELEASE_SCALE_BLOCKS.get(param_kind(module), 1)
    return blocks if n_in % blocks == 0 else 1


def release_storage(module: str, param: str, shape: tuple[int, ...]) -> Storage:
    """How the release stores params[module][param] of `shape`: int8 linear weights with bfloat16
    block scales, a float32 router, bfloat16 embeddings and norm scales."""
    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    if is_quantized_linear(module, param):
        blocks = release_scale_blocks(module, shape[-2])
        return Storage(np.dtype(np.int8), (*shape[:-2], blocks, shape[-1]), bfloat16)
    if component(module) == "router":
        return Storage(np.dtype(np.float32))
    return Storage(bfloat16)


# ---- the checkpoint's tensor order ----------------------------------------------------------------

def tensor_order(tree: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(module, param) of every tensor of an official params tree, in `ckpt-0/` file order: the
    order `jax.tree_util` flattens a Haiku params dict in (module paths sorted as strings, then
    param names). Layer 10 comes before layer 2, as in the release."""
    return [(module, param) for module in sorted(tree) for param in sorted(tree[module])]


def repeat_layer(one_layer: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """An official tree of `num_layers` layers from the tree of a one-layer model: layers are
    identical, so `decoder_layer_0`'s entries are repeated for every layer."""
    tree: dict[str, Any] = {}
    for module, value in one_layer.items():
        layer = official_layer(module)
        if layer is None:
            tree[module] = value
            continue
        for i in range(num_layers):
            tree[official_module(i, layer[1])] = value
    return tree
