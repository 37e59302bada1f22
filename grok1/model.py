"""The Grok-1 model, top to bottom in forward order.

    tokens -> in_out_embed * embedding_multiplier_scale
           -> num_layers x DecoderLayer:
                  h += rms_norm_1(attention(rms_norm(h)))      grouped-query, RoPE, 30*tanh(x/30) cap
                  h += rms_norm_3(moe(rms_norm_2(h)))          router softmax, top-2 of 8 experts
           -> rms_norm -> h @ in_out_embed.T * output_multiplier_scale -> logits

Module and parameter names are the official checkpoint's (`transformer/decoder_layer_3/moe/linear_v`
...), so a checkpoint maps 1:1 onto the parameter tree. The model also reads that tree with the
layers stacked along a leading axis (`transformer/decoder_layers/moe/linear_v`, grok1/params.py):
then one layer body runs num_layers times (`jax.lax.scan`), and a program compiles one layer
whatever the depth. Shapes: L layers, B batch, T new tokens, S keys
(cache length), d emb_size, H query heads, N kv heads, G = H/N, K key_size, E experts, f ffn_size.
`hooks.point(name, value)` marks each named activation, `blocks.{i}.<name>` in layer i
(grok1/hooks.py, docs/INSPECTING.md); with no hook session open it is the value itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from grok1 import hooks
from grok1.config import ModelConfig
from grok1.kernels import attention_over_cache, linear, moe, precision, table_rows, times_table
from grok1.mesh import activation_sharding, split_like_cache, split_rows
from grok1.params import LAYERS_MODULE, has_stacked_layers, layer_module
from grok1.weights.layout import LinearWeight
from grok1.weights.quant import Weight
from grok1.weights.stacking import layer_of

RMS_NORM_EPS = 1e-5
ROPE_BASE = 10000.0
ATTN_LOGIT_CAP = 30.0
MASKED_LOGIT = -1e30
ATTENTION_KEY_BLOCK = 1024  # prompts attend to more keys than this in blocks of it (bounded memory)
MOE_TOKEN_CHUNK = 1024      # longer prompts run their experts about this many tokens at a time


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """How the model computes, as named choices that do not change what it computes.

    `expert_product`: the official tree's grouped expert product (grok1.kernels.GROUPED_PRODUCTS;
    training takes "blocked"), or "pallas": the compute layout's experts through the Pallas
    kernel on any backend (GPUs take it anyway; interpret mode on CPU). `attention_key_block`: prompts attending to more keys than this do
    so in blocks of it (None: ATTENTION_KEY_BLOCK, read when the step is traced; `trace` asks for
    the plain path, whose [T, S] logits it summarises)."""

    expert_product: str = "ragged_dot"
    attention_key_block: Optional[int] = None


# ---- KV cache ---------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for B rows of up to S positions.

    Layers are stacked along the leading axis, so the layer loop updates one array in place.
    `valid[b, s]` marks positions holding a real (non-pad) token; `length[b]` counts positions
    written so far, so row b's next token goes to position `length[b]` (rows advance independently).
    """

    keys: jax.Array    # [L, B, S, N, K]
    values: jax.Array  # [L, B, S, N, K]
    valid: jax.Array   # [B, S] bool
    length: jax.Array  # [B] int32

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, seq_len: Optional[int] = None,
              dtype=jnp.bfloat16) -> "KVCache":
        shape = (config.num_layers, batch, seq_len or config.sequence_len, config.num_kv_heads,
                 config.key_size)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros(shape[1:3], bool), length=jnp.zeros((batch,), jnp.int32))

    def sharding(self, mesh: jax.sharding.Mesh) -> "KVCache":
        """This cache's NamedShardings on `mesh` (of a cache or its abstract shape): rows over
        data, then kv heads over the remaining mesh axes (grok1/mesh.py, ACTIVATION_AXES)."""
        return KVCache(keys=activation_sharding(mesh, "cache_kv", self.keys.shape),
                       values=activation_sharding(mesh, "cache_kv", self.values.shape),
                       valid=activation_sharding(mesh, "cache_valid", self.valid.shape),
                       length=activation_sharding(mesh, "cache_length", self.length.shape))


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """Where this step's tokens sit: RoPE positions of the queries and which keys they may see."""

    positions: jax.Array   # [B, T] int32
    mask: jax.Array        # [B, T, S] bool
    cache: Optional[KVCache]


def attention_context(tokens: jax.Array, pad_token: int, cache: Optional[KVCache]) -> AttentionContext:
    """Masks per ARCHITECTURE.md: a key is visible iff it is not pad, not in the future and,
    with a cache, already written."""
    B, T = tokens.shape
    new_valid = tokens != pad_token
    if cache is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        key_valid, key_positions = new_valid, positions
    else:
        positions = cache.length[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        key_valid = jax.vmap(lambda v, n, s: jax.lax.dynamic_update_slice(v, n, (s,)))(
            cache.valid, new_valid, cache.length)
        key_positions = jnp.broadcast_to(jnp.arange(cache.valid.shape[1], dtype=jnp.int32),
                                         cache.valid.shape)
        cache = dataclasses.replace(cache, valid=key_valid)
    mask = key_valid[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])
    return AttentionContext(positions=positions, mask=mask, cache=cache)


# ---- building blocks --------------------------------------------------------------------------

class RMSNorm(hk.Module):
    """x * rsqrt(mean(x^2) + 1e-5) * scale, in float32, no offset."""

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_NORM_EPS)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


class Linear(hk.Module):
    """`x @ w` without bias; `w` int8 with block scales as stored, or float (grok1/kernels)."""

    def __init__(self, output_size: int, dtype, name: str):
        super().__init__(name=name)
        self.output_size = output_size
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = get_weight("w", [x.shape[-1], self.output_size])
        return linear(x, w, self.dtype)  # rows as the kernels take them in `dtype`; float32 result


def get_weight(name: str, shape: list[int]) -> Weight | LinearWeight:
    """A linear weight [in, out] from the checkpoint (in the compute layout of grok1/weights/layout.py
    once loaded); a random float array at init."""
    fan_in = shape[-2]
    init = hk.initializers.TruncatedNormal(stddev=fan_in ** -0.5)
    return hk.get_parameter(name, shape, jnp.float32, init=init)


def rotary_embedding(x: jax.Array, positions: jax.Array) -> jax.Array:
    """RoPE in float32 on [B, T, heads, K]: halves of the head dim rotate (not interleaved pairs).
    The result stays float32."""
    K = x.shape[-1]
    freqs = 1.0 / (ROPE_BASE ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))      # [K/2]
    phase = positions.astype(jnp.float32)[:, :, None] * freqs                         # [B, T, K/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]                   # [B, T, 1, K]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x32 * jnp.cos(phase) + rotated * jnp.sin(phase)


def rounded(x: jax.Array, dtype) -> jax.Array:
    """x rounded to the compute dtype and kept float32: where the official run holds a value in
    bfloat16 (a no-op in float32)."""
    return x.astype(dtype).astype(jnp.float32)


def cap_attention_logits(logits: jax.Array) -> jax.Array:
    """Grok-1's soft cap: 30 * tanh(logits / 30), so no attention logit exceeds +-30."""
    return ATTN_LOGIT_CAP * jnp.tanh(logits / ATTN_LOGIT_CAP)


# ---- attention --------------------------------------------------------------------------------

class MultiHeadAttention(hk.Module):
    """Grouped-query attention: H query heads read N kv heads in contiguous groups of G."""

    def __init__(self, config: ModelConfig, dtype, options: ComputeOptions = ComputeOptions(),
                 name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.options = options

    def __call__(self, x: jax.Array, ctx: AttentionContext, layer: jax.Array | int
                 ) -> tuple[jax.Array, Optional[tuple[jax.Array, jax.Array]]]:
        """x [B, T, d] -> (attention output [B, T, d], the cache's stacked keys and values
        [L, B, S, N, K] with this step's written into layer `layer`; None without a cache)."""
        c = self.config
        B, T, _ = x.shape
        H, N, K = c.num_q_heads, c.num_kv_heads, c.key_size
        q = Linear(H * K, self.dtype, name="query")(x).reshape(B, T, H, K)
        k = Linear(N * K, self.dtype, name="key")(x).reshape(B, T, N, K)
        v = Linear(N * K, self.dtype, name="value")(x).reshape(B, T, N, K)
        k, v = split_like_cache(k), split_like_cache(v)  # on a mesh: whole heads, as cached
        # The official model rounds the query and key projections to the compute dtype before RoPE
        # (they stay bfloat16 through rotate_half's slices); everything after is float32.
        q = hooks.point("attn.hook_q", rotary_embedding(q.astype(self.dtype), ctx.positions))
        k = hooks.point("attn.hook_k", rotary_embedding(k.astype(self.dtype), ctx.positions))
        v = hooks.point("attn.hook_v", v)

        q = q.reshape(B, T, N, c.q_per_kv, K)                               # [B, T, N, G, K]
        kv = None
        if ctx.cache is None:
            out = self.attend(q, k, v, ctx.mask)
        else:  # write this step's keys at each row's own offset, attend over the layer's
            kv = (write_layer(ctx.cache.keys, k, layer, ctx.cache.length),
                  write_layer(ctx.cache.values, v, layer, ctx.cache.length))
            out = attention_over_cache(q, *kv, layer, ctx.mask, self.attend,
                                       multiplier=c.attn_output_multiplier,
                                       cap=ATTN_LOGIT_CAP, masked_logit=MASKED_LOGIT)
        out = out.reshape(B, T, H * K)
        # Rounded to the compute dtype, as the official run (8 devices) holds the projection
        # once its devices' parts are summed; the residual stream it joins stays float32.
        return rounded(Linear(c.emb_size, self.dtype, name="linear")(out), self.dtype), kv

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """softmax(masked(cap(q . k * multiplier))) @ v: q [B, T, N, G, K], k and v [B, S, N, K],
        mask [B, T, S] -> [B, T, N, G, K] float32."""
        # Attention runs in float32 on the (possibly bfloat16-cached) keys and values: the
        # official model's softmax weights and weighted sum were never rounded (docs/ARCHITECTURE.md);
        # its products ask for full float32 (accelerators would use TensorFloat-32: kernels.precision).
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        block = self.options.attention_key_block or ATTENTION_KEY_BLOCK
        if q.shape[1] > 1 and k.shape[1] > block:  # long prompt: never hold all [T, S] logits
            return attention_in_blocks(q, k, v, mask, self.config.attn_output_multiplier, block)
        logits = per_head_point("attn.hook_attn_scores_pre_cap", self.attention_logits(q, k))
        logits = cap_attention_logits(logits)                               # [B, N, G, T, S]
        logits = per_head_point("attn.hook_attn_scores",
                                jnp.where(mask[:, None, None, :, :], logits, MASKED_LOGIT))
        weights = per_head_point("attn.hook_pattern", jax.nn.softmax(logits, axis=-1))
        return jnp.einsum("bngts,bsnk->btngk", weights, v, precision=precision(jnp.float32))

    def attention_logits(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """(q . k) * attn_output_multiplier in float32, before capping and masking."""
        logits = jnp.einsum("btngk,bsnk->bngts", q, k, precision=precision(jnp.float32),
                            preferred_element_type=jnp.float32)
        return logits * self.config.attn_output_multiplier


def per_head_point(name: str, x: jax.Array) -> jax.Array:
    """The hook point `name` on attention scores [B, N, G, T, S], seen per query head [B, H, T, S]."""
    if hooks.current() is None:
        return x
    B, N, G, T, S = x.shape
    return hooks.point(name, x.reshape(B, N * G, T, S)).reshape(x.shape)


def write_layer(stack: jax.Array, new: jax.Array, layer: jax.Array | int, starts: jax.Array) -> jax.Array:
    """`stack` [L, B, S, N, K] with `new` [B, T, N, K] written into layer `layer`, row b from
    position `starts[b]` on (clamped so that the T positions fit, as dynamic_update_slice does).

    One dynamic_update_slice per row, so XLA updates the stack in place on every mesh. (One
    scatter of all rows made the partitioned program copy the whole cache around the layer loop:
    2 x 1.07 GB per device for grok-1 at batch 8 and context 8192 on 1x8; a vmap of
    dynamic_update_slice over rows made XLA:CPU move the rows axis first, copying the whole cache
    back and forth around every write.) On a mesh the stack keeps the cache's split
    (`split_like_cache`; the entries come split so from the projections).
    """
    new = new.astype(stack.dtype)
    zero = jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    for b in range(new.shape[0]):
        stack = jax.lax.dynamic_update_slice(
            stack, new[b][None, None], (layer, jnp.int32(b), starts[b].astype(jnp.int32), zero, zero))
    return split_like_cache(stack)


def attention_in_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        multiplier: float, block: int) -> jax.Array:
    """`attention_in_key_blocks` for `block` queries at a time (a loop over query blocks), so a
    long prompt holds [B, N, G, block, block] logits at once, whatever its length: each query's
    attention is its own, so the result is the same. Shapes as in attention_in_key_blocks."""
    B, T, N, G, K = q.shape
    if T <= block:
        return attention_in_key_blocks(q, k, v, mask, multiplier, block)
    count = -(-T // block)
    pad = count * block - T

    def query_blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [count, B, block, ...]
        x = jnp.pad(x, [(0, pad if a == 1 else 0) for a in range(x.ndim)])
        return jnp.moveaxis(x.reshape(B, count, block, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda qm: attention_in_key_blocks(qm[0], k, v, qm[1], multiplier, block),
                      (query_blocks(q), query_blocks(mask)))                 # [count, B, block, ...]
    return jnp.moveaxis(out, 0, 1).reshape(B, count * block, N, G, K)[:, :T]


def attention_in_key_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                            multiplier: float, block: int) -> jax.Array:
    """The attention above, `block` keys at a time: softmax(masked(cap(q . k * multiplier))) @ v.

    q [B, T, N, G, K], k and v [B, S, N, K] float32, mask [B, T, S]; returns [B, T, N, G, K].
    Only [B, N, G, T, block] logits are live at once: a running max and sum of exp(logits - max)
    (online softmax, float32) rescale the values accumulated so far. Keys past S (S rounded up to
    whole blocks) get -inf and weigh exactly nothing; masked keys get MASKED_LOGIT as in the plain
    path, so a row that sees no key still averages all S values exactly as it does there.
    """
    B, T, N, G, K = q.shape
    S = k.shape[1]
    num_blocks = -(-S // block)
    padded = num_blocks * block

    def blocks(x: jax.Array, axis: int) -> jax.Array:  # [..., S, ...] -> [num_blocks, ..., block, ...]
        x = jnp.pad(x, [(0, padded - S if a == axis else 0) for a in range(x.ndim)])
        x = x.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    in_range = (jnp.arange(padded) < S).reshape(num_blocks, block)

    def add_block(carry, key_block):
        running_max, running_sum, weighted_values = carry
        k_block, v_block, mask_block, in_range_block = key_block
        logits = jnp.einsum("btngk,bsnk->bngts", q, k_block,
                            precision=precision(jnp.float32)) * multiplier          # [B, N, G, T, block]
        logits = cap_attention_logits(logits)
        logits = jnp.where(mask_block[:, None, None, :, :], logits, MASKED_LOGIT)
        logits = jnp.where(in_range_block, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))                # [B, N, G, T]
        rescale = jnp.exp(running_max - new_max)
        weights = jnp.exp(logits - new_max[..., None])
        running_sum = running_sum * rescale + weights.sum(axis=-1)
        weighted_values = (weighted_values * rescale[..., None]
                           + jnp.einsum("bngts,bsnk->bngtk", weights, v_block,
                                        precision=precision(jnp.float32)))
        return (new_max, running_sum, weighted_values), None

    start = (jnp.full((B, N, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, N, G, T), jnp.float32),
             jnp.zeros((B, N, G, T, K), jnp.float32))
    (_, total, weighted_values), _ = jax.lax.scan(
        add_block, start, (blocks(k, 1), blocks(v, 1), blocks(mask, 2), in_range))
    return jnp.moveaxis(weighted_values / total[..., None], 3, 1)              # [B, T, N, G, K]


# ---- mixture of experts -----------------------------------------------------------------------

class Router(hk.Module):
    """Softmax over all experts of float32(x) @ w, in float32."""

    def __init__(self, config: ModelConfig, name: str = "router"):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array) -> jax.Array:
        w = hk.get_parameter("w", [x.shape[-1], self.config.num_experts], jnp.float32,
                             init=hk.initializers.TruncatedNormal(stddev=x.shape[-1] ** -0.5))
        logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                            precision=precision(jnp.float32))
        return jax.nn.softmax(hooks.point("mlp.hook_router_logits", logits), axis=-1)  # [B, T, E]


class MoELayer(hk.Module):
    """Top-k experts per token, each `(gelu(x @ linear) * (x @ linear_v)) @ linear_1`, weighted by
    its router probability as is (not renormalised). Only the chosen experts are computed
    (grok1/kernels/experts.py)."""

    def __init__(self, config: ModelConfig, dtype, options: ComputeOptions = ComputeOptions(),
                 name: str = "moe"):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.options = options

    def __call__(self, x: jax.Array, router_probs: jax.Array) -> jax.Array:
        c = self.config
        B, T, d = x.shape
        E, f, k = c.num_experts, c.ffn_size, c.num_selected_experts
        w_gate = ExpertWeight([E, d, f], name="linear")()
        w_up = ExpertWeight([E, d, f], name="linear_v")()
        w_down = ExpertWeight([E, f, d], name="linear_1")()

        gates, experts = jax.lax.top_k(router_probs, k)                  # [B, T, k]
        if hooks.wants("mlp.hook_expert_indices"):  # a routing read or forced: its experts' weights
            experts = hooks.point("mlp.hook_expert_indices", experts)
            gates = jnp.take_along_axis(router_probs, experts, axis=-1)

        def chosen_experts(x, gates, experts):  # [B, t, ...] -> [B, t, d]
            B, t, _ = x.shape
            out = moe(x.reshape(B * t, d), gates.reshape(B * t, k), experts.reshape(B * t, k),
                      (w_gate, w_up, w_down), self.dtype, self.options.expert_product)
            return out.reshape(B, t, d)

        positions = max(1, MOE_TOKEN_CHUNK // B)  # per chunk: about MOE_TOKEN_CHUNK tokens of B rows
        if T > positions:  # long prompt: each token's experts are its own, so chunks are exact
            out = in_token_chunks(chosen_experts, (x, gates, experts), positions)
        else:
            out = chosen_experts(x, gates, experts)
        if hooks.wants("mlp.hook_expert_out"):
            out = self.through_each_expert(out, x, gates, experts, (w_gate, w_up, w_down))
        return out

    def through_each_expert(self, out: jax.Array, x: jax.Array, gates: jax.Array, experts: jax.Array,
                            weights: tuple) -> jax.Array:
        """The hook point mlp.hook_expert_out: each chosen expert's own output [B, T, k, d],
        computed only when asked for. `out` plus what a replacement changes, weighted by the
        gates: the same `out` where the outputs are left as they are (exactly: the change is 0)."""
        B, T, d = x.shape
        ones = jnp.ones((B * T, 1), jnp.float32)
        each = jnp.stack([moe(x.reshape(B * T, d), ones, experts[..., j].reshape(B * T, 1), weights,
                              self.dtype, self.options.expert_product).reshape(B, T, d)
                          for j in range(experts.shape[-1])], axis=2)
        change = hooks.point("mlp.hook_expert_out", each) - each
        return out + jnp.sum(change * gates[..., None].astype(jnp.float32), axis=2)


def in_token_chunks(fn: Callable[..., jax.Array], inputs: tuple[jax.Array, ...], chunk: int) -> jax.Array:
    """fn over the [B, T, ...] `inputs` `chunk` positions at a time (T padded up to whole chunks
    with zeros, their results dropped): the temporaries of one chunk are live, not of all T."""
    B, T = inputs[0].shape[:2]
    num_chunks = -(-T // chunk)

    def chunks(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [num_chunks, B, chunk, ...]
        a = jnp.pad(a, [(0, num_chunks * chunk - T if i == 1 else 0) for i in range(a.ndim)])
        return jnp.moveaxis(a.reshape((B, num_chunks, chunk) + a.shape[2:]), 1, 0)

    out = jax.lax.map(lambda parts: fn(*parts), tuple(chunks(a) for a in inputs))
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape((B, num_chunks * chunk) + out.shape[3:])[:, :T]


class ExpertWeight(hk.Module):
    """The stacked [E, in, out] weight `moe/{name}/w` of all experts."""

    def __init__(self, shape: list[int], name: str):
        super().__init__(name=name)
        self.shape = shape

    def __call__(self) -> Weight | LinearWeight:
        return get_weight("w", self.shape)


# ---- decoder layer and the stack --------------------------------------------------------------

class DecoderLayer(hk.Module):
    """Pre- and post-norm around both sublayers: four RMSNorms per layer. `layer` says which
    layer of the stacked KV cache it writes and reads. Named `decoder_layers` it is the scanned
    body of all layers (parameters [L, ...], one layer picked per step); `decoder_layer_{i}` is
    layer i."""

    def __init__(self, config: ModelConfig, dtype, options: ComputeOptions = ComputeOptions(),
                 name: str = LAYERS_MODULE):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.options = options

    def __call__(self, h: jax.Array, ctx: AttentionContext, layer: jax.Array | int
                 ) -> tuple[jax.Array, Optional[tuple[jax.Array, jax.Array]]]:
        h = hooks.point("hook_resid_pre", h)
        attention = MultiHeadAttention(self.config, self.dtype, self.options)
        attn, kv = attention(RMSNorm(name="rms_norm")(h), ctx, layer)
        attn = hooks.point("hook_attn_out", RMSNorm(name="rms_norm_1")(attn))
        h = hooks.point("hook_resid_mid", h + attn)

        x = RMSNorm(name="rms_norm_2")(h)
        router_probs = hooks.point("mlp.hook_expert_weights", Router(self.config)(x))
        moe_out = MoELayer(self.config, self.dtype, self.options)(x, router_probs)
        moe_out = hooks.point("hook_mlp_out", RMSNorm(name="rms_norm_3")(moe_out))
        h = hooks.point("hook_resid_post", h + moe_out)
        return h, kv


class Transformer(hk.Module):
    """The stack of decoder layers, in either of the two parameter forms of grok1/weights/stacking.py.

    Stacked (`transformer/decoder_layers/...`, [L, ...] each): one layer body run num_layers
    times by `jax.lax.scan`, so XLA compiles the body once whatever the depth. The residual
    stream and the stacked KV cache are the loop's carry; each layer writes its slice of the
    cache in place. Per layer (`unroll`, the official `transformer/decoder_layer_{i}/...`): the
    same body in a Python loop, each layer reading its own arrays (the official tree, e.g. in
    training). Either way the loop runs through grok1/hooks.py (`hooks.scan_layers`,
    `hooks.layer`), which names each layer's hook points.
    """

    def __init__(self, config: ModelConfig, dtype, unroll: bool = False,
                 options: ComputeOptions = ComputeOptions(), name: str = "transformer"):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.unroll = unroll
        self.options = options

    def __call__(self, h: jax.Array, ctx: AttentionContext
                 ) -> tuple[jax.Array, Optional[tuple[jax.Array, jax.Array]]]:
        kv = None if ctx.cache is None else (ctx.cache.keys, ctx.cache.values)
        num_layers = self.config.num_layers

        def with_cache(kv: Optional[tuple[jax.Array, jax.Array]]) -> AttentionContext:
            """ctx holding the cache as the previous layers left it."""
            return ctx if kv is None else dataclasses.replace(
                ctx, cache=dataclasses.replace(ctx.cache, keys=kv[0], values=kv[1]))

        # On a mesh the residual stream stays split by rows over `data`, each row whole, in and
        # out of every layer (grok1/mesh.py).
        if self.unroll:
            for i in range(num_layers):
                with hooks.layer(i):
                    h, kv = DecoderLayer(self.config, self.dtype, self.options, name=layer_module(i))(
                        split_rows(h), with_cache(kv), i)
            return split_rows(h), kv

        def one_layer_body(h, kv, index):
            decoder = DecoderLayer(self.config, self.dtype, self.options)
            h, kv = decoder(split_rows(h), with_cache(kv), index)
            return split_rows(h), kv

        layer = hk.transform(one_layer_body)

        def init_stacked(rng: jax.Array, h: jax.Array, kv) -> hk.Params:  # each layer its own draw
            return jax.vmap(layer.init, in_axes=(0, None, None, None))(
                jax.random.split(rng, num_layers), h, kv, 0)

        rng = hk.next_rng_key() if hk.running_init() else None
        params = hk.experimental.transparent_lift(init_stacked)(rng, h, kv)

        def one_layer(carry, index):
            return layer.apply(layer_of(params, index), None, *carry, index), None

        (h, kv), _ = hooks.scan_layers(one_layer, (split_rows(h), kv), num_layers)
        return split_rows(h), kv


class LanguageModel(hk.Module):
    """Tied input/output embeddings with their two multipliers, and the final RMSNorm."""

    def __init__(self, config: ModelConfig, dtype, name: str = "language_model"):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype

    # Both methods name their submodules as __call__ would, so the shared table is
    # `language_model/in_out_embed` (not `language_model/~embed/...`).
    @hk.experimental.name_like("__call__")
    def embed(self, tokens: jax.Array) -> jax.Array:
        table = InOutEmbed(self.config, name="in_out_embed")()
        # The residual stream is float32 in either compute dtype (docs/ARCHITECTURE.md says why).
        multiplier = self.as_compute_dtype(self.config.embedding_multiplier_scale)
        return table_rows(table, tokens).astype(jnp.float32) * multiplier

    @hk.experimental.name_like("__call__")
    def unembed(self, h: jax.Array) -> jax.Array:
        h = hooks.point("ln_final.hook_normalized", RMSNorm(name="rms_norm")(h))
        table = InOutEmbed(self.config, name="in_out_embed")()                          # [V, d]
        # The official model holds the product in the compute dtype, scales it, and returns the
        # logits rounded once more.
        logits = rounded(times_table(h, table, self.dtype), self.dtype)
        logits = logits * self.as_compute_dtype(self.config.output_multiplier_scale)
        return hooks.point("hook_logits", rounded(logits, self.dtype))                  # [..., V]

    def as_compute_dtype(self, multiplier: float) -> jax.Array:
        """A config multiplier as the compute dtype holds it: the official model multiplies its
        bfloat16 activations by Python floats, which JAX makes bfloat16 constants (Grok-1's
        embedding multiplier 78.38 is 78.5 there, the output multiplier 0.5774 is 0.5781)."""
        return jnp.asarray(multiplier, self.dtype).astype(jnp.float32)


class InOutEmbed(hk.Module):
    """The [V, d] embedding table, shared by the input lookup and the output projection."""

    def __init__(self, config: ModelConfig, name: str):
        super().__init__(name=name)
        self.config = config

    def __call__(self) -> jax.Array | LinearWeight:
        c = self.config
        return hk.get_parameter("embeddings", [c.vocab_size, c.emb_size], jnp.float32,
                                init=hk.initializers.TruncatedNormal(stddev=1.0))


# ---- the whole forward pass -------------------------------------------------------------------

def forward(config: ModelConfig, dtype, tokens: jax.Array, cache: Optional[KVCache] = None,
            logits_at: Optional[jax.Array] = None, unroll_layers: bool = False,
            options: ComputeOptions = ComputeOptions(), head: Optional[Callable[..., Any]] = None
            ) -> tuple[Any, Optional[KVCache]]:
    """tokens [B, T] -> (logits, updated cache). Call inside `hk.transform`.

    logits are [B, T, V], or [B, V] at position `logits_at[b]` of each row when given (decoding
    needs only the last real position, and skipping the rest saves the 131072-wide projection).
    With a cache, every row's length advances by T; callers with right-padded rows set `length`.
    `unroll_layers` says the params hold the layers per layer, not stacked (see Transformer).
    `options` says how to compute (ComputeOptions); the result is the same whatever they are.
    `head(h, unembed)`, when given, replaces the logits by what it computes from the final hidden
    states h [B, T, d] and the output projection `unembed` (h -> logits): scoring takes the
    log-probabilities it needs a block of positions at a time, never the [B, T, V] logits at once.
    """
    lm = LanguageModel(config, dtype)
    transformer = Transformer(config, dtype, unroll=unroll_layers, options=options)
    ctx = attention_context(tokens, config.pad_token, cache)
    h = lm.embed(tokens)
    h, kv = transformer(h, ctx)
    if logits_at is not None:
        h = h[jnp.arange(h.shape[0]), logits_at]                               # [B, d]
    logits = lm.unembed(h) if head is None else head(h, lm.unembed)
    if cache is not None:
        cache = KVCache(keys=kv[0], values=kv[1], valid=ctx.cache.valid,
                        length=cache.length + tokens.shape[1])
    return logits, cache


def transformed(config: ModelConfig, dtype=jnp.float32, options: ComputeOptions = ComputeOptions()
                ) -> hk.Transformed:
    """`hk.transform` of `forward` for this config and compute dtype (no RNG needed at apply).

    `init` gives the official tree, one module per layer as a checkpoint holds it; `apply` takes
    it or its stacked form (grok1/weights/stacking.py) and runs the layers the way that form is
    made for: scanned when stacked, unrolled otherwise. `options`: ComputeOptions (training picks
    the "blocked" grouped expert product).
    """
    def model_fn(unroll: bool):
        return hk.without_apply_rng(hk.transform(
            lambda tokens, cache=None, logits_at=None, head=None: forward(
                config, dtype, tokens, cache, logits_at, unroll, options, head)))

    scanned, unrolled = model_fn(False), model_fn(True)

    def apply(params: hk.Params, *args, **kwargs):
        return (scanned if has_stacked_layers(params) else unrolled).apply(params, *args, **kwargs)

    return hk.Transformed(init=unrolled.init, apply=apply)


def param_shapes(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """The official parameter tree (module path -> param name -> shape), computed abstractly."""
    fn = transformed(config)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(fn.init, jax.random.PRNGKey(0), tokens)
