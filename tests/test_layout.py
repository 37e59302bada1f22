"""The compute layout (grok1/weights/layout.py: weights as stored, each a LinearWeight [.., chunks, out,
chunk]) computes what the official tree does, holds the checkpoint's bytes, and gives them back."""

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
from grok1 import kernels, model
from grok1.config import ModelConfig
from grok1.kernels import experts as expert_kernels, platform, xla
from grok1.weights import layout
from grok1.weights.layout import EmbeddingTable, LinearWeight, chunk_count, to_compute_layout, to_official
from grok1.weights.quant import QuantizedWeight8bit, quantize

SMALL = ModelConfig(vocab_size=256, emb_size=64, num_q_heads=4, num_kv_heads=2, key_size=16,
                    num_layers=2, widening_factor=2, sequence_len=128)
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "small"


def official_params(config: ModelConfig, seed: int = 0, blocks: int = 1) -> dict:
    """Random params in the checkpoint's layout: every linear weight except the router int8,
    with `blocks` scale blocks, and a bfloat16 embedding table, as in the release."""
    params = model.transformed(config).init(jax.random.PRNGKey(seed), jnp.ones((1, 1), jnp.int32))
    def stored(m, n, v):
        if n == "w" and not m.endswith("router"):
            return quantize(v, blocks if v.shape[-2] % blocks == 0 else 1, scale_dtype=jnp.bfloat16)
        return np.asarray(v, jnp.bfloat16 if n == "embeddings" else np.float32)
    return {m: {n: stored(m, n, v) for n, v in p.items()} for m, p in params.items()}


def logits(params: dict, tokens: np.ndarray) -> np.ndarray:
    out, _ = jax.jit(model.transformed(SMALL).apply)(params, jnp.asarray(tokens))
    return np.asarray(out)


def test_weights_stay_in_their_stored_dtype():
    laid_out = to_compute_layout(official_params(SMALL))
    experts = laid_out["transformer/decoder_layer_0/moe/linear"]["w"]
    assert isinstance(experts, LinearWeight) and experts.dtype == jnp.int8
    assert experts.shape == (SMALL.num_experts, SMALL.emb_size, SMALL.ffn_size)
    table = laid_out["language_model/in_out_embed"]["embeddings"]
    assert isinstance(table, EmbeddingTable) and table.dtype == jnp.bfloat16
    assert table.shape == (SMALL.vocab_size, SMALL.emb_size)
    assert laid_out["transformer/decoder_layer_0/router"]["w"].dtype == jnp.float32


def test_resident_bytes_are_the_checkpoints():
    official = official_params(SMALL)
    stored = layout.resident_bytes(official)
    assert layout.resident_bytes(to_compute_layout(official_params(SMALL))) == stored


@pytest.mark.parametrize("tokens", [3, 100], ids=["decode-sized (one product per row and expert)",
                                                   "prefill-sized (grouped by expert)"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_compute_layout_logits_equal_official_tree(tokens, blocks):
    rng = np.random.default_rng(0)
    batch = rng.integers(1, SMALL.vocab_size, size=(2, tokens)).astype(np.int32)
    want = logits(official_params(SMALL, blocks=blocks), batch)
    got = logits(to_compute_layout(official_params(SMALL, blocks=blocks)), batch)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_long_input_axes_are_cut_into_chunks_that_nest_with_scale_blocks():
    assert chunk_count(1024) == 1
    assert chunk_count(5464) == 8               # 683 each: bench-1b's ffn
    assert chunk_count(5464, shards=8) == 1     # each of 8 devices holds 683 positions already
    assert chunk_count(32768, blocks=8) == 32   # grok-1's linear_1: runs of 1024 inside blocks of 4096
    assert chunk_count(32768, blocks=8, shards=8) == 4
    assert chunk_count(6144) == 6
    assert chunk_count(96, blocks=3) == 3       # a run may not cross a scale block


def test_accelerators_keep_an_input_axis_whole_except_where_scale_blocks_cut_it(monkeypatch):
    monkeypatch.setattr(layout.jax, "default_backend", lambda: "gpu")
    assert chunk_count(32768) == 1
    assert chunk_count(6144) == 1
    assert chunk_count(32768, blocks=8) == 8    # one run per scale block
    assert chunk_count(32768, blocks=8, shards=8) == 1


def test_a_chunked_weight_multiplies_like_the_stored_one():
    rng = np.random.default_rng(3)
    stored = quantize(rng.normal(size=(2, 4096, 40)), num_blocks=8)
    weight = layout.to_linear_weight(stored, chunk_count(4096, 8))
    assert weight.chunks == 8  # runs of 512: one per scale block
    x = jnp.asarray(rng.normal(size=(3, 4096)), jnp.float32)
    for e in range(2):
        want = x @ stored.dequantize(np.float32)[e]
        np.testing.assert_allclose(kernels.linear(x, weight[e], jnp.float32), want, rtol=2e-5, atol=2e-3)


@pytest.mark.parametrize("rows", [1, 40])
def test_accelerators_multiply_int8_and_bfloat16_weights_in_bfloat16_with_the_same_sums(monkeypatch, rows):
    # On accelerators an int8 or bfloat16 weight is converted to bfloat16 (exact) rather than
    # float32 inside a bfloat16 product: float32-accumulated products of the same values.
    rng = np.random.default_rng(11)
    stored = quantize(rng.normal(size=(2048, 48)), num_blocks=2)
    weight = layout.to_linear_weight(stored, chunk_count(2048, 2))
    table = jnp.asarray(rng.normal(size=(48, 2048)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(rows, 2048)), jnp.float32)
    rounded = x.astype(jnp.bfloat16).astype(jnp.float32)  # CPU rows stay float32 (operand_dtype)
    on_cpu = (kernels.linear(rounded, weight, jnp.bfloat16),
              xla.rows_times_transposed(x, table, jnp.bfloat16))
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "gpu")
    assert platform.product_dtype(jnp.int8, jnp.bfloat16) == jnp.bfloat16
    assert platform.product_dtype(jnp.bfloat16, jnp.bfloat16) == jnp.bfloat16
    assert platform.product_dtype(jnp.int8, jnp.float32) == jnp.float32
    assert platform.product_dtype(jnp.float32, jnp.bfloat16) == jnp.float32
    on_gpu = (kernels.linear(x, weight, jnp.bfloat16), xla.rows_times_transposed(x, table, jnp.bfloat16))
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.dtype == jnp.float32
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-4)


def test_bfloat16_products_take_float32_rows_on_cpu_and_bfloat16_rows_on_accelerators(monkeypatch):
    # The official run on XLA:CPU rounded no product's rows; accelerators' matrix units take bf16.
    rng = np.random.default_rng(12)
    weight = layout.to_linear_weight(quantize(rng.normal(size=(256, 8)), num_blocks=1), 1)
    x = jnp.asarray(rng.normal(size=(2, 256)), jnp.float32)
    assert platform.operand_dtype(jnp.bfloat16) == jnp.float32
    np.testing.assert_array_equal(kernels.linear(x, weight, jnp.bfloat16),
                                  kernels.linear(x, weight, jnp.float32))
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "gpu")
    assert platform.operand_dtype(jnp.bfloat16) == jnp.bfloat16
    assert platform.operand_dtype(jnp.float32) == jnp.float32


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_weight_in_chunks_over_device_shares_multiplies_like_the_stored_one(groups):
    rng = np.random.default_rng(5)
    stored = quantize(rng.normal(size=(4096, 24)), num_blocks=4)
    weight = layout.to_linear_weight(stored, chunk_count(4096, 4, groups), groups=groups)
    x = jnp.asarray(rng.normal(size=(2, 4096)), jnp.float32)
    np.testing.assert_allclose(kernels.linear(x, weight, jnp.float32), x @ stored.dequantize(np.float32),
                               rtol=2e-5, atol=2e-3)
    back = to_official({"m": {"w": weight}})["m"]["w"]
    np.testing.assert_array_equal(back.weight, stored.weight)


def test_to_official_gives_the_stored_tensors_back_exactly():
    official = official_params(SMALL, blocks=2)
    back = to_official(to_compute_layout(official_params(SMALL, blocks=2)))
    for module, group in official.items():
        for name, value in group.items():
            got = back[module][name]
            if isinstance(value, QuantizedWeight8bit):
                np.testing.assert_array_equal(got.weight, value.weight)
                np.testing.assert_array_equal(np.asarray(got.scales, np.float32), np.asarray(value.scales, np.float32))
            else:
                assert got.dtype == value.dtype
                np.testing.assert_array_equal(got, value)


def expert_stacks(rng, E: int = 4, d: int = 8, f: int = 12) -> tuple:
    """Random int8 (linear, linear_v, linear_1) stacks of E experts in the compute layout, and
    the `ffn(rows, e)` that runs expert e on them."""
    stack = lambda shape: jax.tree_util.tree_map(  # noqa: E731  on the device, as a loaded model's
        jnp.asarray, layout.to_linear_weight(quantize(rng.normal(size=(E, *shape)), 1), 1))
    weights = (stack((d, f)), stack((d, f)), stack((f, d)))
    return weights, lambda rows, e: expert_kernels.expert_ffn(rows, *(w[e] for w in weights), dtype=jnp.float32)


def test_grouped_experts_continue_in_rounds_when_a_group_overflows_its_window():
    rng = np.random.default_rng(1)
    N, d, E = 80, 8, 4
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    weights, ffn = expert_stacks(rng, E, d)
    experts = jnp.stack([jnp.zeros(N, jnp.int32), jnp.asarray(rng.integers(1, E, N), jnp.int32)], 1)
    gates = jnp.asarray(rng.uniform(size=(N, 2)), jnp.float32)
    # expert 0 is chosen by all 80 rows: five rounds of its 16-row window
    got = expert_kernels.grouped_experts(x, gates, experts, ffn, E, capacity=16)
    want = expert_kernels.chosen_experts_dense(x, gates, experts, ffn, E)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_pairs_of_a_decode_step_equal_every_chosen_expert_on_every_row():
    rng = np.random.default_rng(4)
    N, d, E = 5, 8, 4
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    weights, ffn = expert_stacks(rng, E, d)
    experts = jnp.asarray([rng.choice(E, 2, replace=False) for _ in range(N)], jnp.int32)
    gates = jnp.asarray(rng.uniform(size=(N, 2)), jnp.float32)
    got = expert_kernels.chosen_pairs(x, gates, experts, weights, jnp.float32)
    want = expert_kernels.chosen_experts_dense(x, gates, experts, ffn, E)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blocks", [1, 2])
def test_grouped_products_on_the_compute_layout_equal_every_chosen_expert_on_every_row(blocks):
    # The accelerators' grouped products over the whole stack, here on a stack picked by layer
    # as the layer loop does, and with several scale blocks (a chunk per block).
    rng = np.random.default_rng(6)
    N, d, f, E, L = 6, 64, 96, 4, 2
    def stack(n_in, n_out):
        stored = quantize(rng.normal(size=(L, E, n_in, n_out)) * n_in ** -0.5, blocks, scale_dtype=jnp.bfloat16)
        return layout.to_linear_weight(stored, blocks)[1]
    weights = (stack(d, f), stack(d, f), stack(f, d))
    ffn = lambda rows, e: expert_kernels.expert_ffn(rows, *(w[e] for w in weights), dtype=jnp.float32)  # noqa: E731
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    experts = jnp.asarray([rng.choice(E, 2, replace=False) for _ in range(N)], jnp.int32)
    gates = jnp.asarray(rng.uniform(size=(N, 2)), jnp.float32)
    got = expert_kernels.sorted_ragged(x, gates, experts, weights, jnp.float32)
    want = expert_kernels.chosen_experts_dense(x, gates, experts, ffn, E)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_moe_runs_grouped_products_on_one_accelerator_for_a_few_tokens_only(monkeypatch):
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "gpu")
    assert not platform.ragged_products(1, 2)          # one token reads just its two experts
    assert platform.ragged_products(8, 16)
    assert platform.ragged_products(64, platform.RAGGED_PAIRS_UP_TO)
    assert not platform.ragged_products(512, 1024)     # a prompt groups its rows per expert
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "cpu")
    assert not platform.ragged_products(8, 16)


def test_group_capacity_holds_the_balanced_share_with_margin_in_multiples_of_16():
    assert expert_kernels.group_capacity(512, 8, 2) == 160   # 128 expected rows per expert
    assert expert_kernels.group_capacity(100, 8, 2) == 32    # 25 expected
    assert expert_kernels.group_capacity(20, 8, 2) == 16
    assert expert_kernels.group_capacity(20, 2, 2) == 20     # never more than the tokens


def test_load_keeps_the_release_dtypes_whatever_the_compute_dtype():
    for dtype in (None, "bfloat16"):
        params = grok1.load(SHIPPED, dtype=dtype, progress=False).params
        assert params["transformer/decoder_layers/multi_head_attention/query"]["w"].dtype == jnp.int8
        assert params["transformer/decoder_layers/moe/linear"]["w"].dtype == jnp.int8


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_model_save_writes_the_loaded_checkpoint_byte_for_byte(tmp_path, dtype):
    shipped = SHIPPED
    model = grok1.load(shipped, dtype=dtype, progress=False)
    model.save(tmp_path / "copy")
    for name in sorted(os.listdir(shipped / "ckpt-0")):
        assert (tmp_path / "copy" / "ckpt-0" / name).read_bytes() == (shipped / "ckpt-0" / name).read_bytes(), name
    assert (tmp_path / "copy" / "tokenizer.model").read_bytes() == (shipped / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())


def test_model_save_round_trip_gives_identical_logits(tmp_path):
    shipped = SHIPPED
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
