"""grok1.inspect: parameter accounting (`describe`) and per-layer tracing (`Model.trace`)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import grok1
from grok1.config import ModelConfig
from grok1.inspect import describe, format_description, format_trace, plot_trace
from grok1.model import transformed
from grok1.weights.layout import LinearWeight, to_official
from grok1.weights.quant import QuantizedWeight8bit

# d=256, 16 query heads over 8 kv heads of 16, 8 experts of ffn int(2*256)*2//3 = 341 -> 344.
SMALL = ModelConfig(vocab_size=512, emb_size=256, num_layers=2, num_q_heads=16, num_kv_heads=8,
                    key_size=16, widening_factor=2, num_experts=8, num_selected_experts=2,
                    sequence_len=64, embedding_multiplier_scale=1.0, attn_output_multiplier=0.25)


# ---- describe ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grok1_description() -> dict:
    """describe() of the released model on a 1x8 mesh (computed once: tracing 64 layers takes seconds)."""
    return describe(grok1.PRESETS["grok-1"], "1x8")


def test_grok1_tensors_and_total_match_the_release_index(tensor_index_path, grok1_description):
    with open(tensor_index_path) as f:
        index = json.load(f)
    d = grok1_description
    described = {(t["module"], t["param"]): t["shape"] for t in d["tensors"]}
    assert described == {(t["module"], t["param"]): t["shape"] for t in index}
    assert d["total"]["params"] == sum(math.prod(t["shape"]) for t in index) == 315_684_820_992


def test_small_config_counts_by_hand():
    d = describe(SMALL)
    per_layer = (256 * 256 + 256 * 128 + 256 * 128 + 256 * 256  # query, key, value, linear
                 + 256 * 8                                        # router
                 + 3 * 8 * 256 * 344                              # experts
                 + 4 * 256)                                       # four norms
    assert d["ffn_size"] == 344
    assert d["per_layer"]["params"] == per_layer
    assert d["total"]["params"] == 512 * 256 + 256 + 2 * per_layer


def test_small_config_bytes_by_hand():
    d = describe(SMALL)
    per_layer = (256 * 256 + 1 * 256 * 2      # query int8 + bf16 scales [1, 256]
                 + 2 * (256 * 128 + 128 * 2)  # key, value: scales [1, 128]
                 + 256 * 256 + 8 * 256 * 2    # attention linear: 8 blocks, scales [8, 256]
                 + 256 * 8 * 4                # router, float32
                 + 2 * (8 * 256 * 344 + 8 * 1 * 344 * 2)  # moe linear, linear_v: scales [8, 1, 344]
                 + 8 * 344 * 256 + 8 * 8 * 256 * 2        # moe linear_1: scales [8, 8, 256]
                 + 4 * 256 * 2)               # norms, bf16
    assert d["per_layer"]["bytes"] == per_layer
    assert d["total"]["bytes"] == 512 * 256 * 2 + 256 * 2 + 2 * per_layer


@pytest.mark.parametrize("name", ["grok-1", "small"])
def test_active_params_per_token_are_two_of_eight_experts_plus_the_rest(name, request):
    c = grok1.PRESETS["grok-1"] if name == "grok-1" else SMALL
    described = request.getfixturevalue("grok1_description") if name == "grok-1" else describe(SMALL)
    d, f, L = c.emb_size, c.ffn_size, c.num_layers
    attention = 2 * d * c.num_q_heads * c.key_size + 2 * d * c.num_kv_heads * c.key_size
    expected = (c.vocab_size * d + d
                + L * (attention + d * c.num_experts + c.num_selected_experts * 3 * d * f + 4 * d))
    assert described["active_per_token"]["params"] == expected
    if name == "grok-1":
        assert expected == 83_756_587_008


def test_decode_flops_grow_by_four_hk_per_layer_and_visible_key():
    d = describe(SMALL)
    matmul_weights = 2 * (2 * 256 * 256 + 2 * 256 * 128 + 256 * 8 + 2 * 3 * 256 * 344) + 512 * 256
    by_context = {e["context"]: e for e in d["flops_per_token"]["by_context"]}
    assert by_context[64]["decode"] == 2 * matmul_weights + 4 * 16 * 16 * 2 * 64
    assert by_context[64]["prefill"] == 2 * matmul_weights + 4 * 16 * 16 * 2 * 65 / 2


def test_kv_cache_bytes_per_token(grok1_description):
    assert grok1_description["kv_cache"]["bytes_per_token"]["bfloat16"] == 2 * 64 * 8 * 128 * 2  # 256 KiB


def test_mesh_splits_everything_but_norms_and_router(grok1_description):
    d = grok1_description
    replicated = sum(t["bytes"] for t in d["tensors"] if t["component"] in ("norms", "router"))
    assert d["mesh"]["devices"] == 8
    assert d["mesh"]["param_bytes_per_device"] == (d["total"]["bytes"] - replicated) // 8 + replicated


def test_one_device_holds_everything():
    d = describe(SMALL)
    assert d["mesh"]["param_bytes_per_device"] == d["total"]["bytes"]


def test_bad_mesh_spec_is_refused():
    with pytest.raises(ValueError, match="mesh spec"):
        describe(SMALL, "eight")


def test_a_preset_name_describes_that_preset_as_load_takes_it():
    assert grok1.describe("bench-1b", "1x8") == grok1.describe(grok1.PRESETS["bench-1b"], "1x8")


PRESET_NAMES = ", ".join(sorted(grok1.PRESETS))  # bench-1b, grok-1


def test_an_unknown_preset_name_is_refused_listing_the_presets():
    with pytest.raises(ValueError, match=rf"^unknown preset 'grok-2'; presets: {PRESET_NAMES}$"):
        describe("grok-2")


def test_a_config_of_another_type_is_refused_saying_what_is_allowed():
    allowed = rf"a ModelConfig or a preset name \({PRESET_NAMES}\)"
    with pytest.raises(TypeError, match=rf"^config must be {allowed}; got dict$"):
        describe(SMALL.to_dict())


def test_description_is_json_and_readable():
    d = describe(SMALL, "1x2")
    assert json.loads(json.dumps(d)) == d
    text = format_description(d)
    assert "decoder_layer_{i}/moe/linear_1/w" in text and f"{d['total']['params']:,}" in text


# ---- trace: checked against an independent numpy forward pass --------------------------------

def _np(w) -> np.ndarray:
    """A parameter as float32 numpy as the checkpoint has it ([..., in, out], the table [V, d]),
    int8 weights dequantised block by block."""
    if isinstance(w, LinearWeight):
        w = to_official({"m": {"w": w}})["m"]["w"]
    if isinstance(w, QuantizedWeight8bit):
        weight, scales = np.asarray(w.weight, np.float32), np.asarray(w.scales, np.float32)
        *lead, n_in, n_out = weight.shape
        blocks = scales.shape[-2]
        split = weight.reshape(*lead, blocks, n_in // blocks, n_out) * scales[..., :, None, :]
        return split.reshape(weight.shape)
    return np.asarray(w, np.float32)


def _rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rope(x):  # [T, heads, K], positions 0..T-1, halves of the head dim rotate
    T, _, K = x.shape
    phase = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, K, 2) / K)
    phase = np.concatenate([phase, phase], axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., K // 2:], x[..., :K // 2]], axis=-1)
    return x * np.cos(phase) + rotated * np.sin(phase)


def numpy_forward(params: dict, c: ModelConfig, tokens: list[int], route=None) -> list[dict]:
    """Per layer: router probs, top-k experts, residual RMS and the residual itself of one unpadded
    row, in numpy. `route(router probs [T, E])`, when given, replaces the top-k routing: each
    token's MoE output is the sum over its (experts [T], weights [T]) pairs."""
    from grok1.weights.stacking import unstack_layers  # the official names, one module per layer
    p = {module: {name: _np(w) for name, w in group.items()}
         for module, group in unstack_layers(params).items()}
    T, H, N, K = len(tokens), c.num_q_heads, c.num_kv_heads, c.key_size
    h = p["language_model/in_out_embed"]["embeddings"][tokens] * c.embedding_multiplier_scale
    causal = np.tril(np.ones((T, T), bool))
    layers = []
    for i in range(c.num_layers):
        lp = lambda name: p[f"transformer/decoder_layer_{i}/{name}"]  # noqa: E731
        x = _rms_norm(h, lp("rms_norm")["scale"])
        q = _rope((x @ lp("multi_head_attention/query")["w"]).reshape(T, H, K))
        k = _rope((x @ lp("multi_head_attention/key")["w"]).reshape(T, N, K))
        v = (x @ lp("multi_head_attention/value")["w"]).reshape(T, N, K)
        kv_head = np.arange(H) // (H // N)
        logits = np.einsum("thk,shk->hts", q, k[:, kv_head]) * c.attn_output_multiplier
        logits = np.where(causal, 30 * np.tanh(logits / 30), -1e30)
        attn = np.einsum("hts,shk->thk", _softmax(logits), v[:, kv_head]).reshape(T, H * K)
        h = h + _rms_norm(attn @ lp("multi_head_attention/linear")["w"], lp("rms_norm_1")["scale"])
        x = _rms_norm(h, lp("rms_norm_2")["scale"])
        probs = _softmax(x @ lp("router")["w"])
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :c.num_selected_experts]
        pairs = (route(probs) if route else
                 [(experts[:, j], probs[np.arange(T), experts[:, j]]) for j in range(experts.shape[1])])
        moe = np.zeros_like(x)
        for t in range(T):
            for chosen, weights in pairs:
                e = chosen[t]
                gate = x[t] @ lp("moe/linear")["w"][e]
                gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
                moe[t] += weights[t] * ((gelu * (x[t] @ lp("moe/linear_v")["w"][e]))
                                        @ lp("moe/linear_1")["w"][e])
        h = h + _rms_norm(moe, lp("rms_norm_3")["scale"])
        layers.append({"probs": probs, "experts": experts, "rms": np.sqrt(np.mean(h * h, axis=-1)),
                       "residual": h})
    return layers


@pytest.fixture(scope="module")
def traced_two_layer():
    """The two_layer golden model traced on its prompts, right-padded into one batch."""
    from conftest import Golden
    golden = Golden("two_layer")
    model = grok1.load(golden.path, dtype="float32")
    width = max(len(p) for p in golden.prompts)
    tokens = [p + [model.config.pad_token] * (width - len(p)) for p in golden.prompts]
    references = [numpy_forward(model.params, model.config, p) for p in golden.prompts]
    return model, golden.prompts, model.trace(tokens), references


def test_traced_experts_equal_numpy_routing_from_the_weights(traced_two_layer):
    _, prompts, trace, references = traced_two_layer
    for row, prompt in enumerate(prompts):
        for i, ref in enumerate(references[row]):
            traced = trace.layers[i]
            np.testing.assert_allclose(traced.router_probs[row, :len(prompt)], ref["probs"], atol=1e-4)
            # Where the 2nd and 3rd choices are a near-tie either pick is right; there are none here.
            ranked = np.sort(ref["probs"], axis=-1)[:, ::-1]
            assert np.all(ranked[:, 1] - ranked[:, 2] > 1e-4)
            np.testing.assert_array_equal(traced.experts[row, :len(prompt)], ref["experts"])


def test_traced_residual_rms_equals_numpy(traced_two_layer):
    _, prompts, trace, references = traced_two_layer
    for row, prompt in enumerate(prompts):
        for i, ref in enumerate(references[row]):
            np.testing.assert_allclose(trace.layers[i].residual_rms[row, :len(prompt)], ref["rms"],
                                       rtol=1e-4)


def test_expert_load_counts_the_real_tokens_routed_to_each_expert(traced_two_layer):
    _, prompts, trace, references = traced_two_layer
    for i, layer in enumerate(trace.layers):
        chosen = np.concatenate([ref[i]["experts"].ravel() for ref in references])
        np.testing.assert_array_equal(layer.expert_load, np.bincount(chosen, minlength=8))
    assert trace.expert_load.sum() == 2 * 2 * sum(len(p) for p in prompts)


def test_traced_logits_match_the_reference_implementation(traced_two_layer):
    _, prompts, trace, _ = traced_two_layer
    from conftest import Golden
    for row, (prompt, reference) in enumerate(zip(prompts, Golden("two_layer").logits)):
        np.testing.assert_allclose(trace.logits[row, :len(prompt)], reference, atol=0.03)


# ---- trace: the attention logit cap ----------------------------------------------------------

@pytest.fixture(scope="module")
def random_params() -> dict:
    """Random SMALL parameters (initialised once for the module)."""
    params = jax.jit(transformed(SMALL).init)(jax.random.PRNGKey(0), np.ones((1, 1), np.int32))
    return jax.tree_util.tree_map(np.asarray, params)


def _with_attention_gain(params: dict, gain: float) -> grok1.Model:
    """SMALL with `params`, its query and key weights multiplied by `gain`."""
    params = jax.tree_util.tree_map(np.array, params)
    for i in range(SMALL.num_layers):
        for name in ("query", "key"):
            params[f"transformer/decoder_layer_{i}/multi_head_attention/{name}"]["w"] *= gain
    return grok1.Model(config=SMALL, params=params, dtype=np.dtype(np.float32))


def test_large_attention_weights_are_reported_capped(random_params):
    trace = _with_attention_gain(random_params, 20.0).trace(np.arange(1, 17)[None])
    for layer in trace.layers:
        assert layer.capped_fraction > 0
        assert layer.logit_max_abs_before_cap > 30 >= layer.logit_max_abs_after_cap


def test_prompts_longer_than_an_attention_key_block_are_traced_in_full(random_params, monkeypatch):
    import grok1.model
    monkeypatch.setattr(grok1.model, "ATTENTION_KEY_BLOCK", 4)   # 13 tokens: a long prompt
    # A length no other test traces, so the trace is compiled afresh under the small block.
    trace = _with_attention_gain(random_params, 20.0).trace(np.arange(1, 14)[None])
    assert grok1.model.ATTENTION_KEY_BLOCK == 4
    for layer in trace.layers:
        assert layer.logit_max_abs_before_cap > 30 >= layer.logit_max_abs_after_cap


def test_small_attention_weights_are_not_capped(random_params):
    trace = _with_attention_gain(random_params, 0.1).trace(np.arange(1, 17)[None])
    for layer in trace.layers:
        assert layer.capped_fraction == 0
        assert layer.logit_max_abs_before_cap < 5


# ---- summary and plot ------------------------------------------------------------------------

def test_summary_has_one_line_per_layer(traced_two_layer):
    _, _, trace, _ = traced_two_layer
    lines = format_trace(trace).splitlines()
    assert [line.split()[0] for line in lines[-2:]] == ["0", "1"]


def test_plot_writes_a_png(traced_two_layer, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, trace, _ = traced_two_layer
    path = tmp_path / "experts.png"
    plot_trace(trace, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_without_matplotlib_says_how_to_install_it(traced_two_layer, tmp_path, monkeypatch):
    _, _, trace, _ = traced_two_layer
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_trace(trace, tmp_path / "experts.png")


def test_trace_on_a_mesh_equals_one_device(two_layer):
    from conftest import run_with_devices
    out = run_with_devices(f"""
import numpy as np, grok1
tokens = [[1, 5, 9, 33, 4, 0], [1, 7, 7, 8, 9, 10]]
one = grok1.load({str(two_layer.path)!r}, dtype="float32").trace(tokens)
mesh = grok1.load({str(two_layer.path)!r}, dtype="float32", mesh=grok1.make_mesh("2x4")).trace(tokens)
assert all((a.experts == b.experts).all() for a, b in zip(one.layers, mesh.layers))
assert all((a.expert_load == b.expert_load).all() for a, b in zip(one.layers, mesh.layers))
print(max(np.abs(a.residual_rms - b.residual_rms).max() for a, b in zip(one.layers, mesh.layers)))
""")
    assert float(out) < 1e-4


def test_architecture_doc_names_code_that_exists():
    """Every `name` in a "Code:" line of docs/ARCHITECTURE.md exists in model.py or a linked file."""
    import importlib
    import pathlib
    import re

    repo = pathlib.Path(__file__).resolve().parent.parent
    doc = (repo / "docs" / "ARCHITECTURE.md").read_text()
    paragraphs = [p for p in doc.split("\n\n") if p.startswith("Code:")]
    assert len(paragraphs) >= 10
    for paragraph in paragraphs:
        files = ["grok1/model.py"] + re.findall(r"\]\(\.\./(grok1/[\w/]+\.py)\)", paragraph)
        assert all((repo / f).is_file() for f in files), paragraph
        modules = [importlib.import_module(f[:-3].replace("/", ".")) for f in files]
        namespaces = modules + [v for m in modules for v in vars(m).values() if isinstance(v, type)]
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", paragraph):
            head, *rest = name.split(".")
            found = [ns for ns in namespaces if hasattr(ns, head)]
            assert found, f"{name} in {paragraph!r}"
            for attr in rest:
                assert hasattr(getattr(found[0], head), attr), f"{name} in {paragraph!r}"


def test_trace_command_prints_each_layer_and_writes_the_plot(tmp_path):
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    shipped = repo / "checkpoints" / "small"
    if not (shipped / "ckpt-0").is_dir():
        pytest.skip("the shipped model checkpoints/small is absent")
    layers = ModelConfig.from_json(shipped / "config.json").num_layers
    png = tmp_path / "experts.png"
    result = subprocess.run([sys.executable, "run.py", "--trace", "--prompt", "The cat sat on the mat.",
                             "--plot", str(png)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first_words = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert [w for w in first_words if w.isdigit()] == [str(i) for i in range(layers)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
