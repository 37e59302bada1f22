"""The model computes what the official Grok-1 computes (golden sets), in batches and through the cache."""

from __future__ import annotations

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from grok1.config import ModelConfig
from grok1.model import (AttentionContext, KVCache, MoELayer, MultiHeadAttention, attention_context,
                         cap_attention_logits, transformed)
from grok1.weights.quant import quantize


@functools.lru_cache(maxsize=None)
def load_golden(name: str, dtype: str) -> grok1.Model:
    from conftest import GOLDEN
    return grok1.load(GOLDEN / name, dtype=dtype)


def test_two_layer_float32_logits_within_0_03_of_golden_everywhere(two_layer):
    model = load_golden("two_layer", "float32")
    for prompt, reference in zip(two_layer.prompts, two_layer.logits):
        diff = np.abs(model.logits([prompt])[0] - reference)
        assert diff.max() <= 0.03, f"prompt {prompt}: max |diff| {diff.max():.4f}"


def test_twelve_layer_float32_matches_golden_in_mean_and_argmax(twelve_layer):
    model = load_golden("twelve_layer", "float32")
    diffs, agree, total = [], 0, 0
    for prompt, reference in zip(twelve_layer.prompts, twelve_layer.logits):
        logits = model.logits([prompt])[0]
        diffs.append(np.abs(logits - reference).mean() / reference.std())
        agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        total += len(prompt)
    assert max(diffs) <= 0.15, f"mean |diff| / std = {diffs}"
    assert agree / total >= 0.85, f"argmax agreement {agree}/{total}"


def test_two_layer_bfloat16_within_0_1_at_95_percent_of_positions(two_layer):
    model = load_golden("two_layer", "bfloat16")
    close = total = 0
    for prompt, reference in zip(two_layer.prompts, two_layer.logits):
        per_position = np.abs(model.logits([prompt])[0] - reference).max(axis=-1)
        close += int((per_position <= 0.1).sum())
        total += len(prompt)
    assert close / total >= 0.95, f"{close}/{total} positions within 0.1"


# ---- bfloat16 against the bfloat16 goldens (issue 17) ------------------------------------------

CLEAR_MARGIN = 0.2  # reference top-two margins above this must give the same top token


@functools.lru_cache(maxsize=None)
def load_golden_int8(name: str) -> grok1.Model:
    """bfloat16 compute on the official int8 tree (a mesh keeps it, as on accelerators): the
    block scales multiply float32 partial products, so the weights are exactly the checkpoint's."""
    from conftest import GOLDEN
    return grok1.load(GOLDEN / name, dtype="bfloat16", mesh=grok1.make_mesh("1x1"))


def assert_bfloat16_tracks_golden_like_float32(golden, model: grok1.Model) -> None:
    float32 = load_golden(golden.name, "float32")
    for prompt, reference in zip(golden.prompts, golden.logits):
        logits = model.logits([prompt])[0]
        error = np.abs(logits - reference).mean() / reference.std()
        float32_error = np.abs(float32.logits([prompt])[0] - reference).mean() / reference.std()
        assert error <= max(1.5 * float32_error, 0.015), \
            f"prompt {prompt}: bfloat16 {error:.4f} vs float32 {float32_error:.4f} (mean |error| / std)"
        top_two = np.sort(reference, axis=-1)[:, -2:]
        clear = top_two[:, 1] - top_two[:, 0] > CLEAR_MARGIN
        assert np.array_equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear]), \
            f"prompt {prompt}: top token differs at a position with margin > {CLEAR_MARGIN}"


# Tokens the greedy check compares per golden set: those before each prompt's first near tie in
# the reference (5 of 46: two_layer 0 + 4 + 0 of 30, twelve_layer 0 + 1 of 16). The guard keeps the
# check from comparing nothing, as it silently would if the cut-off moved to position 0.
GREEDY_COMPARED = {"two_layer": 4, "twelve_layer": 1}


def assert_greedy_follows_golden_until_a_near_tie(golden, model: grok1.Model) -> None:
    expected = golden.data["greedy_full_recompute"]
    outs = model.generate(golden.prompts, temperature=0, max_new_tokens=len(expected[0]))
    compared = 0
    for out, reference, margins in zip(outs, expected, golden.data["greedy_top2_margin"], strict=True):
        n = next((i for i, m in enumerate(margins) if m < CLEAR_MARGIN), len(margins))
        assert out.token_ids[:n] == reference[:n], f"greedy {out.token_ids} vs golden {reference}"
        compared += len(reference[:n])
    assert compared >= GREEDY_COMPARED[golden.name], \
        f"compared {compared} greedy tokens, expected at least {GREEDY_COMPARED[golden.name]}"


# The int8 tree runs its unfused int8 -> bf16 converts on CPU: minutes on the shared 2-core
# machine (121-238 s per set), hence slow; `-m slow` runs them.
@pytest.mark.slow
def test_bfloat16_on_int8_weights_tracks_golden_at_least_like_float32(golden):
    assert_bfloat16_tracks_golden_like_float32(golden, load_golden_int8(golden.name))


@pytest.mark.slow
def test_bfloat16_on_int8_weights_greedy_follows_golden_until_a_near_tie(golden):
    assert_greedy_follows_golden_until_a_near_tie(golden, load_golden_int8(golden.name))


def test_two_layer_bfloat16_cpu_layout_tracks_golden_at_least_like_float32(two_layer):
    assert_bfloat16_tracks_golden_like_float32(two_layer, load_golden("two_layer", "bfloat16"))


def test_twelve_layer_bfloat16_cpu_layout_tracks_golden_at_least_like_float32(twelve_layer):
    assert_bfloat16_tracks_golden_like_float32(twelve_layer, load_golden("twelve_layer", "bfloat16"))


# On CPU bfloat16 rounds exactly where the official run on XLA:CPU rounded (q and k before RoPE,
# the attention output projection, the logits before and after their multiplier, which like the
# embedding multiplier is a bfloat16 constant; docs/ARCHITECTURE.md). Measured: two_layer 1 and 2
# bit for bit, every logit within two bfloat16 steps; the old roundings (every product's rows,
# float32 multipliers) were 0.0014-0.025 std away, float32 is 0.003-0.11.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="accelerators round the products' rows")
def test_bfloat16_on_cpu_reproduces_the_official_logits_within_two_bfloat16_steps(golden):
    model = load_golden(golden.name, "bfloat16")
    for i, (prompt, reference) in enumerate(zip(golden.prompts, golden.logits)):
        diff = np.abs(model.logits([prompt])[0] - reference)
        assert diff.mean() / reference.std() <= 0.001, f"{golden.name} prompt {i}: mean {diff.mean():.5f}"
        assert diff.max() <= 2 ** -6, f"{golden.name} prompt {i}: max |diff| {diff.max():.4f}"


def test_bfloat16_scales_the_embeddings_by_the_multiplier_as_bfloat16_holds_it(shipped):
    # 3.1 is 3.09375 in bfloat16: the official model's multiply by a Python float.
    config = dataclasses.replace(shipped.config, embedding_multiplier_scale=3.1)
    from conftest import SHIPPED
    name = "blocks.0.hook_resid_pre"
    tokens = [[5, 17, 300]]
    in_bfloat16 = grok1.load(SHIPPED, dtype="bfloat16", config=config, progress=False)
    in_float32 = grok1.load(SHIPPED, dtype="float32", config=config, progress=False)
    bf16 = in_bfloat16.run_with_cache(tokens, [name])[1][name]
    f32 = in_float32.run_with_cache(tokens, [name])[1][name]
    np.testing.assert_allclose(bf16 * np.float32(3.1), f32 * np.float32(3.09375), rtol=1e-6)


def test_bfloat16_cpu_layout_greedy_follows_golden_until_a_near_tie(golden):
    assert_greedy_follows_golden_until_a_near_tie(golden, load_golden(golden.name, "bfloat16"))


def test_right_padded_batch_equals_each_prompt_alone(golden):
    model = load_golden(golden.name, "float32")
    width = max(len(p) for p in golden.prompts)
    batch = np.zeros((len(golden.prompts), width), np.int32)  # pad token 0 on the right
    for i, prompt in enumerate(golden.prompts):
        batch[i, :len(prompt)] = prompt
    together = model.logits(batch)
    for i, prompt in enumerate(golden.prompts):
        alone = model.logits([prompt])[0]
        np.testing.assert_allclose(together[i, :len(prompt)], alone, atol=1e-4, rtol=0)


def test_cached_one_token_at_a_time_equals_full_forward(two_layer):
    model = load_golden("two_layer", "float32")
    prompt = np.asarray([two_layer.prompts[1]], np.int32)
    full = model.logits(prompt)[0]
    apply = jax.jit(transformed(model.config, jnp.float32).apply)
    cache = model.init_cache(batch=1)
    stepwise = []
    for t in range(prompt.shape[1]):
        logits, cache = apply(model.params, prompt[:, t:t + 1], cache)
        stepwise.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(stepwise), full, atol=1e-4, rtol=0)
    assert int(cache.length[0]) == prompt.shape[1]


def test_cached_prefill_then_decode_equals_full_forward(twelve_layer):
    model = load_golden("twelve_layer", "float32")
    prompt = np.asarray([twelve_layer.prompts[1]], np.int32)
    full = model.logits(prompt)[0]
    apply = jax.jit(transformed(model.config, jnp.float32).apply)
    logits, cache = apply(model.params, prompt[:, :12], model.init_cache(batch=1))
    np.testing.assert_allclose(np.asarray(logits[0]), full[:12], atol=1e-4, rtol=0)
    for t in range(12, prompt.shape[1]):
        logits, cache = apply(model.params, prompt[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits[0, 0]), full[t], atol=1e-4, rtol=0)


def test_logits_at_selects_one_position_per_row(two_layer):
    model = load_golden("two_layer", "float32")
    tokens = np.asarray([[5, 17, 99, 3], [300, 12, 0, 0]], np.int32)
    full = model.logits(tokens)
    apply = jax.jit(transformed(model.config, jnp.float32).apply)
    last, _ = apply(model.params, tokens, None, jnp.asarray([3, 1]))
    np.testing.assert_allclose(np.asarray(last), full[[0, 1], [3, 1]], atol=1e-5, rtol=0)


def test_logits_rejects_token_ids_outside_vocab(two_layer):
    model = load_golden("two_layer", "float32")
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model.logits([[1, 512]])
    with pytest.raises(ValueError, match="2-D"):
        model.logits([1, 2, 3])


@functools.lru_cache(maxsize=None)
def load_small() -> grok1.Model:
    import pathlib
    return grok1.load(pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "small",
                      dtype="float32", progress=False)


def test_ragged_token_rows_are_refused_saying_the_rows_differ_in_length():
    with pytest.raises(ValueError, match="rows have different lengths .*pad token 0") as error:
        load_small().logits([[1, 5, 6], [1, 7]])
    assert "inhomogeneous" not in str(error.value)


def test_logits_refuse_more_tokens_than_the_context():
    with pytest.raises(ValueError, match="300 tokens do not fit the model's context of 256"):
        load_small().logits([[5] * 300])


def test_trace_refuses_more_tokens_than_the_context():
    with pytest.raises(ValueError, match="257 tokens do not fit the model's context of 256"):
        load_small().trace([[5] * 257])


# ---- mixture of experts: the sparse top-2 path against a dense oracle ---------------------------

SMALL = ModelConfig(vocab_size=64, emb_size=32, num_layers=1, num_q_heads=4, num_kv_heads=2,
                    key_size=8, widening_factor=2, sequence_len=16, embedding_multiplier_scale=1.0,
                    attn_output_multiplier=8 ** -0.5)


def dense_moe_oracle(x, probs, w_gate, w_up, w_down, k):
    """All experts for every token, then the top-k gates (the official code's way), in numpy."""
    x, probs = np.asarray(x, np.float64), np.asarray(probs, np.float64)
    h = np.einsum("btd,edf->btef", x, w_gate)
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    every_expert = np.einsum("btef,efd->bted", gelu * np.einsum("btd,edf->btef", x, w_up), w_down)
    top = np.argsort(-probs, axis=-1)[..., :k]
    gates = np.take_along_axis(probs, top, axis=-1)
    chosen = np.take_along_axis(every_expert, top[..., None], axis=2)
    return (chosen * gates[..., None]).sum(axis=2)


def moe_fn(x, probs):
    return MoELayer(SMALL, jnp.float32)(x, probs)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_sparse_moe_equals_dense_oracle(quantized):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, SMALL.emb_size)).astype(np.float32)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 5, SMALL.num_experts)), jnp.float32))
    moe = hk.without_apply_rng(hk.transform(moe_fn))
    params = moe.init(jax.random.PRNGKey(1), x, probs)
    if quantized:  # linear_1 with 4 scale blocks, as the release uses 8 for it
        params = {m: {"w": quantize(p["w"], num_blocks=4 if m.endswith("linear_1") else 1)}
                  for m, p in params.items()}
    weights = {m.split("/")[-1]: (p["w"].dequantize(np.float32) if quantized else np.asarray(p["w"]))
               for m, p in params.items()}
    got = moe.apply(params, x, probs)
    want = dense_moe_oracle(x, probs, weights["linear"], weights["linear_v"], weights["linear_1"],
                            SMALL.num_selected_experts)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_moe_gates_are_router_probabilities_not_renormalised():
    x = np.ones((1, 1, SMALL.emb_size), np.float32)
    probs = jnp.asarray([[[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]]], jnp.float32)
    moe = hk.without_apply_rng(hk.transform(moe_fn))
    params = moe.init(jax.random.PRNGKey(2), x, probs)
    full = moe.apply(params, x, probs)
    doubled = moe.apply(params, x, probs * 2)  # same experts chosen, gates doubled
    np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(full), rtol=1e-5)


# ---- attention logit capping ------------------------------------------------------------------

def test_capping_limits_logits_to_30():
    logits = jnp.asarray([-1e4, -100.0, -30.0, 0.0, 1.0, 30.0, 100.0, 1e4])
    capped = np.asarray(cap_attention_logits(logits))
    assert np.all(np.abs(capped) <= 30.0)
    np.testing.assert_allclose(capped, 30 * np.tanh(np.asarray(logits) / 30), rtol=1e-6)
    assert abs(capped[4] - 1.0) < 1e-3  # small logits pass nearly unchanged


def attention_reference(x, wq, wk, wv, wo, config, cap=True):
    """Grouped-query attention with RoPE, causal mask and (optionally) the cap, in numpy float64."""
    T, H, N, K = x.shape[0], config.num_q_heads, config.num_kv_heads, config.key_size
    q, k, v = (x @ wq).reshape(T, H, K), (x @ wk).reshape(T, N, K), (x @ wv).reshape(T, N, K)
    freqs = 1.0 / 10000 ** (np.arange(0, K, 2) / K)
    phase = np.concatenate([np.arange(T)[:, None] * freqs] * 2, axis=-1)[:, None, :]

    def rope(a):
        rotated = np.concatenate([-a[..., K // 2:], a[..., :K // 2]], axis=-1)
        return a * np.cos(phase) + rotated * np.sin(phase)

    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // N, axis=1), np.repeat(v, H // N, axis=1)  # head h reads kv h // G
    raw = np.einsum("thk,shk->hts", q, k) * config.attn_output_multiplier
    logits = 30 * np.tanh(raw / 30) if cap else raw
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -1e30)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hts,shk->thk", weights, v).reshape(T, H * K) @ wo, raw


def test_attention_caps_logits_beyond_30_like_the_reference():
    rng = np.random.default_rng(3)
    T = 6
    tokens = jnp.ones((1, T), jnp.int32)
    x = rng.normal(size=(1, T, SMALL.emb_size)).astype(np.float32)

    def attn(x):
        out, _ = MultiHeadAttention(SMALL, jnp.float32)(x, attention_context(tokens, 0, None), 0)
        return out

    fn = hk.without_apply_rng(hk.transform(attn))
    params = fn.init(jax.random.PRNGKey(0), x)
    params = {m: {"w": np.asarray(p["w"]) * (8.0 if m.split("/")[-1] in ("query", "key") else 1.0)}
              for m, p in params.items()}
    w = {m.split("/")[-1]: np.asarray(p["w"], np.float64) for m, p in params.items()}
    want, raw = attention_reference(x[0].astype(np.float64), w["query"], w["key"], w["value"],
                                    w["linear"], SMALL, cap=True)
    uncapped, _ = attention_reference(x[0].astype(np.float64), w["query"], w["key"], w["value"],
                                      w["linear"], SMALL, cap=False)
    visible = np.broadcast_to(np.tril(np.ones((T, T), bool)), raw.shape)
    assert np.abs(raw[visible]).max() > 30, "the test must drive logits past the cap"
    got = np.asarray(fn.apply(params, x))[0]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    assert np.abs(got - uncapped).max() > 1e-2, "capping must change the result here"


def test_kv_cache_zeros_stacks_the_layers_in_one_buffer():
    cache = KVCache.zeros(SMALL.replace(num_layers=3), batch=2, seq_len=8, dtype=jnp.float32)
    assert cache.keys.shape == cache.values.shape == (3, 2, 8, SMALL.num_kv_heads, SMALL.key_size)
    assert cache.valid.shape == (2, 8) and cache.length.shape == (2,)


def test_attention_context_masks_pad_and_future_keys():
    ctx: AttentionContext = attention_context(jnp.asarray([[4, 5, 0]]), 0, None)
    expected = np.asarray([[[1, 0, 0], [1, 1, 0], [1, 1, 0]]], bool)
    np.testing.assert_array_equal(np.asarray(ctx.mask), expected)
