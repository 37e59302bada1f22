"""Named hook points: Model.run_with_cache reads activations of the real forward pass,
Model.run_with_hooks replaces them (grok1/hooks.py, grok1/inspect/activations.py)."""

from __future__ import annotations


import jax
import ml_dtypes
import numpy as np
import pytest

import grok1
from conftest import SHIPPED, random_params, run_with_devices
from grok1 import checkpoint, hooks
from grok1.config import ModelConfig
from grok1.inspect.activations import abstract_program, all_layers
from grok1.inspect.lens import read_residual

# Two prompts of the same length, no padding (token ids of the shipped model's vocabulary).
PROMPT_A = [1, 415, 2130, 3354, 356, 272, 1610, 304]
PROMPT_B = [1, 415, 2130, 3354, 356, 272, 2418, 304]


def every_name(config: ModelConfig) -> list[str]:
    return [hooks.layer_name(p, i) for i in range(config.num_layers) for p in hooks.LAYER_POINTS] + list(
        hooks.GLOBAL_POINTS)


# ---- run_with_cache ---------------------------------------------------------------------------

def test_cached_run_returns_the_models_logits_bitwise(shipped):
    logits, _ = shipped.run_with_cache([PROMPT_A, PROMPT_B], every_name(shipped.config))
    np.testing.assert_array_equal(logits, shipped.logits([PROMPT_A, PROMPT_B]))


def test_only_the_names_asked_for_come_back_with_their_shapes(shipped):
    c = shipped.config
    _, cache = shipped.run_with_cache([PROMPT_A], ["blocks.1.attn.hook_q", "blocks.2.attn.hook_pattern",
                                                   "blocks.3.mlp.hook_expert_out", "hook_logits"])
    T, H, K = len(PROMPT_A), c.num_q_heads, c.key_size
    assert {name: value.shape for name, value in cache.items()} == {
        "blocks.1.attn.hook_q": (1, T, H, K), "blocks.2.attn.hook_pattern": (1, H, T, T),
        "blocks.3.mlp.hook_expert_out": (1, T, c.num_selected_experts, c.emb_size),
        "hook_logits": (1, T, c.vocab_size)}


def test_last_residual_through_the_final_norm_and_unembedding_is_the_logits(shipped):
    last = f"blocks.{shipped.config.num_layers - 1}.hook_resid_post"
    logits, cache = shipped.run_with_cache([PROMPT_A], [last, "hook_logits"])
    np.testing.assert_array_equal(read_residual(shipped, cache[last]), logits)
    np.testing.assert_array_equal(cache["hook_logits"], logits)


def test_each_residual_is_the_last_plus_the_sublayer_outputs(shipped):
    names = [f"blocks.2.{p}" for p in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                       "hook_resid_post")] + ["blocks.1.hook_resid_post"]
    _, cache = shipped.run_with_cache([PROMPT_A], names)
    block = {name.split(".")[-1]: value for name, value in cache.items() if name.startswith("blocks.2.")}
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_post"], block["hook_resid_pre"])
    # Up to one rounding: XLA may fuse the norm's last product with the addition (one FMA).
    np.testing.assert_allclose(block["hook_resid_pre"] + block["hook_attn_out"], block["hook_resid_mid"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(block["hook_resid_mid"] + block["hook_mlp_out"], block["hook_resid_post"],
                               rtol=1e-6, atol=1e-6)


def test_attention_patterns_are_causal_rows_summing_to_one(shipped):
    _, cache = shipped.run_with_cache([PROMPT_A, PROMPT_B], all_layers(shipped.config, "attn.hook_pattern"))
    T = len(PROMPT_A)
    for pattern in cache.values():
        np.testing.assert_allclose(pattern.sum(axis=-1), 1.0, atol=1e-6)
        assert np.all(pattern[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)


def test_pattern_is_the_softmax_of_the_capped_scores(shipped):
    names = [f"blocks.1.attn.{p}" for p in ("hook_attn_scores_pre_cap", "hook_attn_scores", "hook_pattern")]
    _, cache = shipped.run_with_cache([PROMPT_A], names)
    pre, scores, pattern = (cache[n] for n in names)
    causal = np.tril(np.ones((len(PROMPT_A),) * 2, bool))
    np.testing.assert_allclose(np.where(causal, 30 * np.tanh(pre / 30), -1e30), scores, rtol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(scores, axis=-1), pattern, atol=1e-6)


def test_expert_indices_are_the_traced_chosen_experts(shipped):
    names = all_layers(shipped.config, "mlp.hook_expert_indices")
    _, cache = shipped.run_with_cache([PROMPT_A, PROMPT_B], names)
    trace = shipped.trace([PROMPT_A, PROMPT_B])
    for i, layer in enumerate(trace.layers):
        np.testing.assert_array_equal(cache[f"blocks.{i}.mlp.hook_expert_indices"], layer.experts)


def test_attention_patterns_of_a_prompt_longer_than_a_key_block_are_computed(shipped, monkeypatch):
    import grok1.model
    names = ["blocks.0.attn.hook_pattern", "blocks.3.hook_resid_post"]
    _, plain = shipped.run_with_cache([PROMPT_A], names)
    monkeypatch.setattr(grok1.model, "ATTENTION_KEY_BLOCK", 4)  # 8 tokens: a long prompt
    _, blocked = shipped.run_with_cache([PROMPT_A], names)
    for name in plain:
        np.testing.assert_allclose(blocked[name], plain[name], atol=1e-5)


def test_an_unknown_name_is_refused_listing_the_points(shipped):
    expected = r"unknown hook point 'blocks.9.hook_resid_post'.*0\.\.3.*hook_resid_pre"
    with pytest.raises(ValueError, match=expected):
        shipped.run_with_cache([PROMPT_A], ["blocks.9.hook_resid_post"])


def test_names_given_as_one_string_are_refused_asking_for_a_list(shipped):
    with pytest.raises(ValueError, match=r"^names must be a list of hook names"):
        shipped.run_with_cache([PROMPT_A], "blocks.0.hook_resid_post")


def test_names_may_come_from_any_iterable(shipped):
    _, cache = shipped.run_with_cache([PROMPT_A], (f"blocks.{i}.hook_resid_post" for i in (2, 0)))
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert cache.layers("hook_resid_post") == [0, 2]
    assert cache.stack("hook_resid_post").shape == (2, 1, 8, 256)


def test_hooks_given_as_a_list_are_refused_asking_for_a_dict(shipped):
    expected = r"^hooks must be a dict \{hook name: fn\(value, name\)\}, got list$"
    with pytest.raises(ValueError, match=expected):
        shipped.run_with_hooks([PROMPT_A], [("blocks.0.hook_resid_post", lambda v, n: v)])


# ---- run_with_hooks ---------------------------------------------------------------------------

def test_identity_hooks_everywhere_leave_the_logits_bitwise_unchanged(shipped):
    identity = {name: (lambda value, name: value) for name in every_name(shipped.config)}
    logits, _ = shipped.run_with_hooks([PROMPT_A, PROMPT_B], identity)
    np.testing.assert_array_equal(logits, shipped.logits([PROMPT_A, PROMPT_B]))


def test_zeroing_one_layers_attention_output_changes_the_logits(shipped):
    logits, cache = shipped.run_with_hooks([PROMPT_A], {"blocks.2.hook_attn_out": lambda v, name: v * 0},
                                           ["blocks.2.hook_attn_out", "blocks.1.hook_resid_post"])
    _, clean = shipped.run_with_cache([PROMPT_A], ["blocks.1.hook_resid_post"])
    assert np.all(cache["blocks.2.hook_attn_out"] == 0)
    # Layers before the replaced one compute the same, up to rounding: one layer body runs all
    # layers, and a replacement in it may change how XLA fuses (and so rounds) that body.
    np.testing.assert_allclose(cache["blocks.1.hook_resid_post"], clean["blocks.1.hook_resid_post"],
                               atol=1e-5)
    assert np.abs(logits - shipped.logits([PROMPT_A])).max() > 0.1


def test_a_hook_receives_its_own_name(shipped):
    seen = []
    hooks_ = {f"blocks.{i}.hook_resid_mid": (lambda v, name: seen.append(name) or v) for i in (0, 3)}
    shipped.run_with_hooks([PROMPT_A], hooks_)
    assert sorted(seen) == ["blocks.0.hook_resid_mid", "blocks.3.hook_resid_mid"]


@pytest.mark.parametrize("layer", [0, 2])
def test_patching_the_whole_residual_from_b_gives_bs_logits_from_that_layer_on(shipped, layer):
    L = shipped.config.num_layers
    logits_b, cache_b = shipped.run_with_cache([PROMPT_B], all_layers(shipped.config, "hook_resid_pre"))
    name = f"blocks.{layer}.hook_resid_pre"
    patched, cache = shipped.run_with_hooks([PROMPT_A], {name: lambda v, n: cache_b[n]},
                                            [f"blocks.{i}.hook_resid_pre" for i in range(layer, L)])
    np.testing.assert_array_equal(patched, logits_b)
    for later, value in cache.items():
        np.testing.assert_array_equal(value, cache_b[later])
    assert np.abs(patched - shipped.logits([PROMPT_A])).max() > 0.1  # A and B do differ


def test_a_hook_returning_another_shape_is_refused_naming_it(shipped):
    expected = r"hook for blocks.1.hook_mlp_out returned shape \(3,\); .* \(1, 8, 256\)"
    with pytest.raises(ValueError, match=expected):
        shipped.run_with_hooks([PROMPT_A], {"blocks.1.hook_mlp_out": lambda v, name: np.zeros(3)})


# ---- forcing a routing, against a reference computed by hand ----------------------------------

ONE_LAYER = ModelConfig(vocab_size=64, emb_size=32, num_layers=1, num_q_heads=4, num_kv_heads=2,
                        key_size=8, widening_factor=2, num_experts=4, num_selected_experts=2,
                        sequence_len=16, embedding_multiplier_scale=1.0, attn_output_multiplier=0.25)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory) -> grok1.Model:
    """A one-layer checkpoint with int8 weights (2 scale blocks), written and loaded back."""
    path = tmp_path_factory.mktemp("one_layer") / "model"
    params = checkpoint.quantize_params(random_params(ONE_LAYER, seed=3), ONE_LAYER, num_blocks=2,
                                        scale_dtype=ml_dtypes.bfloat16)
    checkpoint.save(params, path, ONE_LAYER)
    return grok1.load(path, dtype="float32", progress=False)


def logits_by_hand(model: grok1.Model, tokens: list[int], route) -> np.ndarray:
    """The model's logits in numpy (test_inspect's forward pass), each layer's MoE the sum over
    `route(router probs [T, E])`'s (experts [T], weights [T]) pairs of each token's expert output
    times its weight."""
    from test_inspect import _np, _rms_norm, numpy_forward
    c, lm = model.config, model.params["language_model/rms_norm"]
    h = numpy_forward(model.params, c, tokens, route)[-1]["residual"]
    table = _np(model.params["language_model/in_out_embed"]["embeddings"])
    return _rms_norm(h, _np(lm["scale"])) @ table.T * c.output_multiplier_scale


def test_forcing_experts_0_and_1_reports_them_and_equals_the_hand_computed_layer(one_layer):
    tokens = [5, 17, 3, 60, 22, 9, 41]
    force = {"blocks.0.mlp.hook_expert_indices": lambda v, name: np.broadcast_to(np.array([0, 1]), v.shape)}
    logits, cache = one_layer.run_with_hooks([tokens], force, ["blocks.0.mlp.hook_expert_indices"])
    assert np.all(cache["blocks.0.mlp.hook_expert_indices"] == [0, 1])
    every_token = np.arange(len(tokens))
    to_0_and_1 = lambda p: [(np.full(len(tokens), e), p[every_token, e]) for e in (0, 1)]  # noqa: E731
    reference = logits_by_hand(one_layer, tokens, to_0_and_1)
    np.testing.assert_allclose(logits[0], reference, atol=1e-4)
    _, free = one_layer.run_with_cache([tokens], ["blocks.0.mlp.hook_expert_indices"])
    assert np.any(free["blocks.0.mlp.hook_expert_indices"] != [0, 1])  # forcing changed something


def test_zeroing_the_second_experts_output_equals_the_first_alone_by_hand(one_layer):
    tokens = [5, 17, 3, 60, 22, 9, 41]
    zero_second = {"blocks.0.mlp.hook_expert_out": lambda v, name: v.at[:, :, 1].set(0)}
    logits, cache = one_layer.run_with_hooks([tokens], zero_second, ["blocks.0.mlp.hook_expert_out"])
    assert np.all(cache["blocks.0.mlp.hook_expert_out"][:, :, 1] == 0)
    assert np.all(cache["blocks.0.mlp.hook_expert_out"][:, :, 0] != 0)
    first_alone = lambda probs: [(np.argmax(probs, axis=-1), np.max(probs, axis=-1))]  # noqa: E731
    np.testing.assert_allclose(logits[0], logits_by_hand(one_layer, tokens, first_alone), atol=1e-4)


# ---- the per-layer tree, a mesh, memory --------------------------------------------------------

def test_the_per_layer_tree_reads_the_same_activations(one_layer, shipped):
    from grok1.weights.stacking import unstack_layers
    per_layer = grok1.Model(config=shipped.config, params=unstack_layers(shipped.params), dtype=shipped.dtype)
    names = ["blocks.1.hook_resid_post", "blocks.3.attn.hook_pattern", "blocks.0.mlp.hook_expert_indices"]
    logits, cache = per_layer.run_with_cache([PROMPT_A], names)
    stacked_logits, stacked = shipped.run_with_cache([PROMPT_A], names)
    np.testing.assert_allclose(logits, stacked_logits, atol=1e-5)
    for name in names:
        np.testing.assert_allclose(cache[name], stacked[name], atol=1e-5)


def test_a_1x8_mesh_reads_patches_and_lenses_as_one_device():
    if not (SHIPPED / "ckpt-0").is_dir():
        pytest.skip("the shipped model checkpoints/small is absent")
    out = run_with_devices(f"""
import numpy as np, grok1
from grok1.inspect.lens import logit_lens
A, B = {PROMPT_A}, {PROMPT_B}
names = ["blocks.0.hook_resid_pre", "blocks.2.attn.hook_pattern", "blocks.3.hook_resid_post",
         "blocks.1.mlp.hook_expert_indices", "blocks.2.mlp.hook_expert_out", "ln_final.hook_normalized"]
force = {{"blocks.1.mlp.hook_expert_indices": lambda v, n: v * 0 + np.array([0, 1])}}
worst = 0.0
results = []
for mesh in (None, "1x8"):
    m = grok1.load({str(SHIPPED)!r}, dtype="float32", mesh=mesh, progress=False)
    logits, cache = m.run_with_cache([A, B], names)
    _, b = m.run_with_cache([B], ["blocks.2.hook_resid_pre"])
    patched, _ = m.run_with_hooks([A], {{"blocks.2.hook_resid_pre": lambda v, n: b[n]}})
    forced, forced_cache = m.run_with_hooks([A, B], force, ["blocks.1.mlp.hook_expert_indices"])
    identity, _ = m.run_with_hooks([A, B], {{n: (lambda v, n: v) for n in names}})
    assert np.array_equal(identity, logits)
    assert np.all(forced_cache["blocks.1.mlp.hook_expert_indices"] == [0, 1])
    results.append((logits, cache, patched, forced, logit_lens(m, A)))
(l1, c1, p1, f1, lens1), (l8, c8, p8, f8, lens8) = results
assert set(c1) == set(c8) and np.array_equal(lens1.top_ids[..., 0], lens8.top_ids[..., 0])
assert all(np.array_equal(c1[n], c8[n]) for n in names if n.endswith("indices"))
print(max([np.abs(l1 - l8).max(), np.abs(p1 - p8).max(), np.abs(f1 - f8).max(),
           np.abs(lens1.final_prob - lens8.final_prob).max()]
          + [np.abs(c1[n] - c8[n]).max() for n in names]))
""")
    assert float(out) < 1e-4


def test_a_few_names_on_64_layers_add_only_their_arrays_to_device_memory():
    config = ModelConfig(vocab_size=512, emb_size=128, num_layers=64, num_q_heads=4, num_kv_heads=2,
                         key_size=32, widening_factor=2, num_experts=8, num_selected_experts=2,
                         sequence_len=256, embedding_multiplier_scale=1.0, attn_output_multiplier=0.25)
    from grok1.model import param_shapes
    from grok1.weights.stacking import stack_layers
    params = jax.eval_shape(stack_layers, param_shapes(config))
    tokens = jax.ShapeDtypeStruct((2, 256), np.int32)
    names = ["blocks.10.hook_resid_post", "blocks.50.hook_resid_post", "blocks.63.mlp.hook_expert_indices"]
    asked = 2 * (2 * 256 * 128 * 4) + 2 * 256 * 2 * 4
    every = 64 * 2 * 256 * 128 * 4  # hook_resid_post of every layer
    none, few = (abstract_program(config, np.float32, params, tokens, n).memory_analysis()
                 for n in ((), names))
    # The outputs grow by the arrays asked for (and a pointer of the output tuple for each).
    assert 0 <= few.output_size_in_bytes - none.output_size_in_bytes - asked <= 8 * len(names)
    # The loop's buffers hold the arrays asked for once more, and nothing of the other layers.
    assert few.temp_size_in_bytes - none.temp_size_in_bytes <= 2 * asked < every / 10
