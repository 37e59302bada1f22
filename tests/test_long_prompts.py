"""Long prompts in bounded memory: attention over keys in blocks and experts over positions in
chunks compute what the plain paths do, and the compiled prefill holds several times fewer
temporaries."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1 import model as grok_model
from grok1.config import ModelConfig
from grok1.model import (KVCache, MoELayer, MultiHeadAttention, attention_context, attention_in_key_blocks,
                         transformed)

CONFIG = ModelConfig(vocab_size=64, emb_size=32, num_layers=1, num_q_heads=4, num_kv_heads=2,
                     key_size=8, widening_factor=2, sequence_len=24, embedding_multiplier_scale=1.0,
                     attn_output_multiplier=8 ** -0.5)


def plain_attention(q, k, v, mask, multiplier):
    """The plain path of MultiHeadAttention, all [T, S] logits at once."""
    logits = jnp.einsum("btngk,bsnk->bngts", q, k) * multiplier
    logits = grok_model.cap_attention_logits(logits)
    logits = jnp.where(mask[:, None, None], logits, grok_model.MASKED_LOGIT)
    return jnp.einsum("bngts,bsnk->btngk", jax.nn.softmax(logits, axis=-1), v)


def random_attention_inputs(seed: int, B=2, T=7, S=19, N=2, G=3, K=8):
    """Logits large enough to pass the cap, a causal mask with a cache offset and pad keys."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(scale=6.0, size=(B, T, N, G, K)), jnp.float32)
    k = jnp.asarray(rng.normal(scale=6.0, size=(B, S, N, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, N, K)), jnp.float32)
    offset = S - T                                                 # queries sit after offset keys
    causal = np.arange(S)[None, :] <= offset + np.arange(T)[:, None]
    key_valid = rng.random((B, S)) > 0.25
    key_valid[1, :offset + 2] = False                               # row 1: early queries see no key
    mask = jnp.asarray(causal[None] & key_valid[:, None, :])
    return q, k, v, mask


@pytest.mark.parametrize("block", [1, 4, 5, 7, 19, 32])
def test_blocked_attention_equals_plain_for_block_sizes_dividing_s_or_not(block):
    q, k, v, mask = random_attention_inputs(seed=block)
    assert (plain_attention(q, k, v, mask, 0.35) != 0).any()
    np.testing.assert_allclose(attention_in_key_blocks(q, k, v, mask, 0.35, block),
                               plain_attention(q, k, v, mask, 0.35), rtol=2e-5, atol=2e-5)


def test_blocked_attention_averages_all_values_where_a_query_sees_no_key_like_plain():
    q, k, v, mask = random_attention_inputs(seed=0)
    assert not mask[1, 0].any(), "the inputs must hold a query that sees no key"
    blocked = attention_in_key_blocks(q, k, v, mask, 0.35, 5)
    np.testing.assert_allclose(blocked[1, 0], plain_attention(q, k, v, mask, 0.35)[1, 0], rtol=2e-5)
    assert np.isfinite(np.asarray(blocked)).all()


def traced_with(fn, *args, **sizes):
    """jit(fn)(*args) traced while grok1.model's block and chunk sizes are set to `sizes`."""
    saved = {name: getattr(grok_model, name) for name in sizes}
    for name, size in sizes.items():
        setattr(grok_model, name, size)
    try:
        return np.asarray(jax.jit(fn)(*args))
    finally:
        for name, size in saved.items():
            setattr(grok_model, name, size)


def attention_step(block: int, tokens, cache, x):
    """MultiHeadAttention on x with ATTENTION_KEY_BLOCK set to `block` while it traces."""
    def attend(x):
        ctx = attention_context(tokens, CONFIG.pad_token, cache)
        return MultiHeadAttention(CONFIG, jnp.float32)(x, ctx, 0)[0]
    fn = hk.without_apply_rng(hk.transform(attend))
    params = fn.init(jax.random.PRNGKey(0), x)
    return traced_with(fn.apply, params, x, ATTENTION_KEY_BLOCK=block)


@pytest.mark.parametrize("block", [3, 8])
def test_attention_module_takes_the_blocked_path_past_the_block_with_unchanged_output(block):
    rng = np.random.default_rng(1)
    B, T, S = 2, 6, CONFIG.sequence_len
    tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (B, T)), jnp.int32).at[1, :2].set(0)
    cache = KVCache.zeros(CONFIG, B, S, jnp.float32)
    rows_written = jnp.asarray([5, 9], jnp.int32)                  # a different offset per row
    keys = jnp.asarray(rng.normal(size=cache.keys.shape), jnp.float32)   # [1 layer, B, S, N, K]
    cache = KVCache(keys=keys, values=keys[..., ::-1], length=rows_written,
                    valid=jnp.arange(S)[None, :] < rows_written[:, None])
    x = jnp.asarray(rng.normal(size=(B, T, CONFIG.emb_size)), jnp.float32)
    plain = attention_step(S, tokens, cache, x)                    # S keys: not more than a block
    blocked = attention_step(block, tokens, cache, x)
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 8, 10])  # tokens of 2 rows: 1, 4 and 5 positions per chunk
def test_experts_run_in_position_chunks_past_the_chunk_with_unchanged_output(chunk):
    rng = np.random.default_rng(2)
    B, T = 2, 12
    x = jnp.asarray(rng.normal(size=(B, T, CONFIG.emb_size)), jnp.float32)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, T, CONFIG.num_experts)), jnp.float32))
    fn = hk.without_apply_rng(hk.transform(lambda x, p: MoELayer(CONFIG, jnp.float32)(x, p)))
    params = fn.init(jax.random.PRNGKey(0), x, probs)
    whole = traced_with(fn.apply, params, x, probs, MOE_TOKEN_CHUNK=T)
    chunked = traced_with(fn.apply, params, x, probs, MOE_TOKEN_CHUNK=chunk)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_padded_prompt_into_a_cache_gives_the_same_logits_in_blocks_and_chunks(dtype):
    config = CONFIG.replace(num_layers=2)
    rng = np.random.default_rng(4)
    B, T = 2, 10
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, T)), jnp.int32).at[1, 7:].set(0)
    fn = transformed(config, dtype)
    params = fn.init(jax.random.PRNGKey(1), tokens)
    first, cache = jax.jit(fn.apply)(params, tokens[:, :3], KVCache.zeros(config, B, dtype=dtype))
    apply = lambda p, t, c: fn.apply(p, t, c)[0]                       # noqa: E731
    plain = traced_with(apply, params, tokens[:, 3:], cache)
    small = traced_with(apply, params, tokens[:, 3:], cache, ATTENTION_KEY_BLOCK=5, MOE_TOKEN_CHUNK=6)
    assert np.isfinite(plain).all()
    np.testing.assert_allclose(small, plain, rtol=1e-4, atol=1e-4)


def prefill_temporaries(config: ModelConfig, T: int, **sizes) -> int:
    """Bytes of temporaries XLA:CPU allocates for one [1, T] prompt into a T-position cache."""
    fn = transformed(config, jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    params = jax.eval_shape(fn.init, jax.random.PRNGKey(0), tokens)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, 1, T, jnp.float32))
    saved = {name: getattr(grok_model, name) for name in sizes}
    for name, size in sizes.items():
        setattr(grok_model, name, size)
    try:
        step = jax.jit(lambda p, t, c: fn.apply(p, t, c, jnp.zeros((1,), jnp.int32)))
        return step.lower(params, tokens, cache).compile().memory_analysis().temp_size_in_bytes
    finally:
        for name, size in saved.items():
            setattr(grok_model, name, size)


def test_compiled_prefill_of_4096_positions_holds_a_quarter_of_the_plain_temporaries():
    config = CONFIG.replace(emb_size=64, num_q_heads=8, sequence_len=4096)
    plain = prefill_temporaries(config, 4096, ATTENTION_KEY_BLOCK=4096, MOE_TOKEN_CHUNK=4096)
    bounded = prefill_temporaries(config, 4096)
    assert plain >= 8 * 4096 * 4096 * 4, "the plain prefill holds all [H, T, S] float32 logits"
    assert bounded <= plain / 4, f"{bounded} bytes in blocks vs {plain} plain"
