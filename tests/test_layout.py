"""The CPU parameter layout (float weights, one array per expert) computes what the official one does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from conftest import GOLDEN, require
from grok1 import experts as expert_kernels, layout, model
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
    prepared = prepare_params(official_params(SMALL), platform="cpu")
    experts = prepared["transformer/decoder_layer_0/moe/linear"]["w"]
    assert isinstance(experts, ExpertWeights)
    assert experts.shape == (SMALL.num_experts, SMALL.emb_size, SMALL.ffn_size)
    query = prepared["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    assert not isinstance(query, QuantizedWeight8bit) and query.dtype == jnp.float32


def test_other_platforms_keep_the_official_layout():
    params = official_params(SMALL)
    assert prepare_params(params, platform="gpu") is params


@pytest.mark.parametrize("tokens", [4, 100], ids=["decode-sized (dense per chosen expert)", "prefill-sized (grouped by expert)"])
def test_cpu_layout_logits_equal_official_layout(tokens):
    rng = np.random.default_rng(0)
    batch = rng.integers(1, SMALL.vocab_size, size=(2, tokens)).astype(np.int32)
    want = logits(official_params(SMALL), batch)
    got = logits(prepare_params(official_params(SMALL), platform="cpu"), batch)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_grouped_experts_continue_in_rounds_when_a_group_overflows_its_window():
    rng = np.random.default_rng(1)
    N, d, f, E = 80, 8, 12, 4
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    weights = [tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((f, d), (f, d), (d, f)))  # [out, in]
               for _ in range(E)]
    experts = jnp.stack([jnp.zeros(N, jnp.int32), jnp.asarray(rng.integers(1, E, N), jnp.int32)], 1)
    gates = jnp.asarray(rng.uniform(size=(N, 2)), jnp.float32)
    ffn = lambda rows, *w: expert_kernels.expert_ffn(rows, *w, jnp.float32)
    # expert 0 is chosen by all 80 rows: five rounds of its 16-row window
    got = expert_kernels.grouped_experts(x, gates, experts, weights, ffn, capacity=16)
    want = expert_kernels.chosen_experts_dense(x, gates, experts, weights, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_group_capacity_holds_the_balanced_share_with_margin_in_multiples_of_16():
    assert expert_kernels.group_capacity(512, 8, 2) == 160   # 128 expected rows per expert
    assert expert_kernels.group_capacity(100, 8, 2) == 32    # 25 expected
    assert expert_kernels.group_capacity(20, 8, 2) == 16
    assert expert_kernels.group_capacity(20, 2, 2) == 20     # never more than the tokens


def test_prefill_copy_holds_each_expert_as_in_out_in_the_prefill_dtype():
    prepared = prepare_params(official_params(SMALL), platform="cpu",
                              prefill_dtype=jnp.bfloat16)
    experts = prepared["transformer/decoder_layer_0/moe/linear_1"]["w"]
    assert len(experts.for_prefill) == SMALL.num_experts
    for decode, prefill in zip(experts.transposed, experts.for_prefill):
        assert decode.dtype == jnp.float32 and prefill.dtype == jnp.bfloat16
        assert prefill.shape == decode.T.shape == (SMALL.ffn_size, SMALL.emb_size)
        np.testing.assert_allclose(np.asarray(prefill, np.float32), np.asarray(decode).T,
                                   rtol=2 ** -7)  # bf16 scale times bf16 weight: two roundings


def test_without_prefill_dtype_no_prefill_copy_is_kept():
    prepared = prepare_params(official_params(SMALL), platform="cpu")
    assert prepared["transformer/decoder_layer_0/moe/linear"]["w"].for_prefill is None


def test_prefill_copy_computes_prompts_within_bfloat16_rounding_and_leaves_decoding_float32():
    rng = np.random.default_rng(2)
    prompt = rng.integers(1, SMALL.vocab_size, size=(2, 100)).astype(np.int32)  # grouped path
    step = prompt[:, :4]                                                       # dense path
    plain = prepare_params(official_params(SMALL), platform="cpu")
    mixed = prepare_params(official_params(SMALL), platform="cpu",
                           prefill_dtype=jnp.bfloat16)
    want, got = logits(plain, prompt), logits(mixed, prompt)
    assert not np.array_equal(got, want)              # the prefill copy was used ...
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.02 * scale    # ... and changes logits by bf16 rounding
    np.testing.assert_array_equal(logits(mixed, step), logits(plain, step))


@pytest.mark.parametrize("dtype, prefill_dtype", [(None, jnp.bfloat16), ("float32", None),
                                                   ("bfloat16", jnp.bfloat16)])
def test_load_on_cpu_keeps_a_bfloat16_prefill_copy_unless_float32_is_asked_for(dtype, prefill_dtype):
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "small"
    params = grok1.load(shipped, dtype=dtype, progress=False).params
    experts = params["transformer/decoder_layer_0/moe/linear"]["w"]
    if prefill_dtype is None:
        assert experts.for_prefill is None
    else:
        assert {w.dtype for w in experts.for_prefill} == {jnp.dtype(prefill_dtype)}


def test_prefill_copy_is_dropped_when_both_copies_do_not_fit(monkeypatch):
    # Room for the float layout alone, not for the prefill copy beside it.
    monkeypatch.setattr(layout, "fits_in_memory",
                        lambda params, prefill_dtype=None: prefill_dtype is None)
    prepared = prepare_params(official_params(SMALL), platform="cpu",
                              prefill_dtype=jnp.bfloat16)
    experts = prepared["transformer/decoder_layer_0/moe/linear"]["w"]
    assert isinstance(experts, ExpertWeights) and experts.for_prefill is None


def test_cpu_layout_holds_the_checkpoint_weights_exactly_in_float32():
    params = official_params(SMALL)
    stored = params["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    exact = np.asarray(stored.dequantize(jnp.float32))
    prepared = prepare_params(params, platform="cpu")
    np.testing.assert_array_equal(
        np.asarray(prepared["transformer/decoder_layer_0/multi_head_attention/query"]["w"]), exact)


def test_bfloat16_compute_keeps_float32_weights_on_cpu():
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "small"
    params = grok1.load(shipped, dtype="bfloat16", progress=False).params
    assert params["transformer/decoder_layer_0/multi_head_attention/query"]["w"].dtype == jnp.float32
    assert params["transformer/decoder_layer_0/moe/linear"]["w"].dtype == jnp.float32


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_model_save_writes_the_loaded_checkpoint_byte_for_byte(tmp_path, dtype):
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "small"
    model = grok1.load(shipped, dtype=dtype, progress=False)
    model.save(tmp_path / "copy")
    for name in sorted(os.listdir(shipped / "ckpt-0")):
        assert (tmp_path / "copy" / "ckpt-0" / name).read_bytes() == (shipped / "ckpt-0" / name).read_bytes(), name
    assert (tmp_path / "copy" / "tokenizer.model").read_bytes() == (shipped / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())


def test_model_save_round_trip_gives_identical_logits(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "small"
    model = grok1.load(shipped, progress=False)
    model.save(tmp_path / "copy")
    tokens = [[1, 422, 1151, 9, 77]]
    np.testing.assert_array_equal(grok1.load(tmp_path / "copy", progress=False).logits(tokens),
                                  model.logits(tokens))


def test_model_save_of_a_golden_set_writes_its_tensor_files_byte_for_byte(tmp_path):
    golden = require(GOLDEN / "two_layer")
    grok1.load(golden, progress=False).save(tmp_path / "copy")
    for name in sorted(os.listdir(golden / "ckpt-0")):
        assert (tmp_path / "copy" / "ckpt-0" / name).read_bytes() == (golden / "ckpt-0" / name).read_bytes(), name
