"""The CPU parameter layout (float weights, one array per expert) computes what the official one does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1 import experts as expert_kernels, model
from grok1.config import ModelConfig
from grok1.layout import ExpertWeights, prepare_params
from grok1.quant import QuantizedWeight8bit, quantize

SMALL = ModelConfig(vocab_size=256, emb_size=64, num_q_heads=4, num_kv_heads=2, key_size=16,
                    num_layers=2, widening_factor=2, sequence_len=128)


def official_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params in the checkpoint's layout: every linear weight except the router int8."""
    params = model.transformed(config).init(jax.random.PRNGKey(seed), jnp.ones((1, 1), jnp.int32))
    return {m: {n: (quantize(v, 1) if n == "w" and not m.endswith("router") else np.asarray(v))
                for n, v in p.items()} for m, p in params.items()}


def logits(params: dict, tokens: np.ndarray) -> np.ndarray:
    out, _ = jax.jit(model.transformed(SMALL).apply)(params, jnp.asarray(tokens))
    return np.asarray(out)


def test_cpu_layout_splits_experts_and_dequantises_linear_weights():
    prepared = prepare_params(official_params(SMALL), jnp.float32, platform="cpu")
    experts = prepared["transformer/decoder_layer_0/moe/linear"]["w"]
    assert isinstance(experts, ExpertWeights)
    assert experts.shape == (SMALL.num_experts, SMALL.emb_size, SMALL.ffn_size)
    query = prepared["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    assert not isinstance(query, QuantizedWeight8bit) and query.dtype == jnp.float32


def test_other_platforms_keep_the_official_layout():
    params = official_params(SMALL)
    assert prepare_params(params, jnp.bfloat16, platform="gpu") is params


@pytest.mark.parametrize("tokens", [4, 100], ids=["decode-sized (dense per chosen expert)", "prefill-sized (tiles)"])
def test_cpu_layout_logits_equal_official_layout(tokens):
    rng = np.random.default_rng(0)
    batch = rng.integers(1, SMALL.vocab_size, size=(2, tokens)).astype(np.int32)
    want = logits(official_params(SMALL), batch)
    got = logits(prepare_params(official_params(SMALL), jnp.float32, platform="cpu"), batch)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_tiles_handle_an_expert_chosen_by_every_row():
    rng = np.random.default_rng(1)
    N, d, f, E = 80, 8, 12, 4
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    weights = [tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((f, d), (f, d), (d, f)))  # [out, in]
               for _ in range(E)]
    experts = jnp.stack([jnp.zeros(N, jnp.int32), jnp.asarray(rng.integers(1, E, N), jnp.int32)], 1)
    gates = jnp.asarray(rng.uniform(size=(N, 2)), jnp.float32)
    got = expert_kernels.tiled_experts(x, gates, experts, weights, jnp.float32, tile=16)
    want = expert_kernels.chosen_experts_dense(x, gates, experts, weights, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
