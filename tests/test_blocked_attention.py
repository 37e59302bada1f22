"""Attention over keys in blocks (long prompts, bounded memory) computes what the plain path does."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1 import model as grok_model
from grok1.config import ModelConfig
from grok1.model import KVCache, MultiHeadAttention, attention_context, attention_in_key_blocks

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


def attention_step(block: int, tokens, cache, x):
    """MultiHeadAttention on x with ATTENTION_KEY_BLOCK set to `block` while it traces."""
    def attend(x):
        ctx = attention_context(tokens, CONFIG.pad_token, cache)
        return MultiHeadAttention(CONFIG, jnp.float32)(x, ctx, 0)[0]
    fn = hk.without_apply_rng(hk.transform(attend))
    params = fn.init(jax.random.PRNGKey(0), x)
    saved, grok_model.ATTENTION_KEY_BLOCK = grok_model.ATTENTION_KEY_BLOCK, block
    try:
        return np.asarray(jax.jit(fn.apply)(params, x))
    finally:
        grok_model.ATTENTION_KEY_BLOCK = saved


@pytest.mark.parametrize("block", [3, 8])
def test_attention_module_takes_the_blocked_path_past_the_block_with_unchanged_output(block):
    rng = np.random.default_rng(1)
    B, T, S = 2, 6, CONFIG.sequence_len
    tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (B, T)), jnp.int32).at[1, :2].set(0)
    cache = KVCache.zeros(CONFIG, B, S, jnp.float32)
    rows_written = jnp.asarray([5, 9], jnp.int32)                  # a different offset per row
    keys = jnp.asarray(rng.normal(size=cache.keys[0].shape), jnp.float32)
    cache = KVCache(keys=(keys,), values=(keys[..., ::-1],), length=rows_written,
                    valid=jnp.arange(S)[None, :] < rows_written[:, None])
    x = jnp.asarray(rng.normal(size=(B, T, CONFIG.emb_size)), jnp.float32)
    plain = attention_step(S, tokens, cache, x)                    # S keys: not more than a block
    blocked = attention_step(block, tokens, cache, x)
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)
