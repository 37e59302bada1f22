"""Attention of a decode step over the stacked KV cache: the native CPU kernel where it runs
(grok1/kernels/native.py reads the cache in place), on a mesh each device on its own rows and kv
heads; else the model's own XLA attention, which it passes in."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grok1.kernels import native
from grok1.kernels.platform import native_attention, threads_per_device
from grok1.mesh import cache_split


def attention_over_cache(q: jax.Array, keys: jax.Array, values: jax.Array, layer: jax.Array | int,
                         mask: jax.Array, attend: Callable[..., jax.Array], *, multiplier: float,
                         cap: float, masked_logit: float) -> jax.Array:
    """`attend(q, keys[layer], values[layer], mask)` for queries q [B, T, N, G, K] over the stacked
    cache [L, B, S, N, K]. On CPU, for a decode step's few queries, grok1/kernels/native.py's
    `cached_attention` computes the same softmax(masked(cap * tanh(multiplier * q.k / cap))) @ v
    (float32, up to rounding) from the cache in place; `multiplier`, `cap` and `masked_logit`
    are attend's constants, which it needs to know. On a mesh whose every device holds its own
    rows and kv heads of the cache, each runs it on those (`shard_map`): attention needs nothing
    from other rows or heads."""
    mesh = jax.sharding.get_abstract_mesh()
    on_mesh = not mesh.empty and mesh.size > 1
    kernel = native_attention(q, keys)
    cache_spec = cache_split(mesh, keys.shape) if kernel and on_mesh else None
    if not kernel or (on_mesh and cache_spec is None):
        k, v = (jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False) for stack in (keys, values))
        return attend(q, k, v, mask)

    threads = threads_per_device(mesh) if on_mesh else 0

    def here(q, keys, values, layer, mask):
        return native.cached_attention(q, keys, values, layer, mask, multiplier, cap, masked_logit,
                                       threads)

    layer = jnp.asarray(layer, jnp.int32)
    if not on_mesh:
        return here(q, keys, values, layer, mask)
    _, rows, _, heads, _ = cache_spec
    q_spec = P(rows, None, heads, None, None)
    return jax.shard_map(here, mesh=mesh, check_vma=False,
                         in_specs=(q_spec, cache_spec, cache_spec, P(), P(rows, None, None)),
                         out_specs=q_spec)(q, keys, values, layer, mask)
