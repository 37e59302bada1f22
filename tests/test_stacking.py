"""The layers stacked for one scanned layer body compute what the layers one by one do, and the
official names survive the round trip through the stacked form."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from grok1 import model
from grok1.config import ModelConfig
from grok1.params import has_stacked_layers, official_module, stacked_module
from grok1.weights.layout import LinearWeight, to_compute_layout
from grok1.weights.quant import QuantizedWeight8bit, quantize
from grok1.weights.stacking import stack_layers, unstack_layers

SMALL = ModelConfig(vocab_size=128, emb_size=32, num_q_heads=4, num_kv_heads=2, key_size=8,
                    num_layers=3, widening_factor=2, sequence_len=32)
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "small"


def official_params(config: ModelConfig, quantized: bool = False) -> dict:
    """Random params in the official tree (one module per layer), int8 linear weights if asked."""
    params = model.transformed(config).init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))
    return {m: {n: (quantize(v, 1) if quantized and n == "w" and not m.endswith("router") else np.asarray(v))
                for n, v in group.items()} for m, group in params.items()}


def tokens(batch: int, length: int) -> jnp.ndarray:
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(1, SMALL.vocab_size, (batch, length)), jnp.int32).at[1, -2:].set(0)


def forward(params: dict, *args):
    return jax.jit(model.transformed(SMALL).apply)(params, *args)


@pytest.mark.parametrize("layout", ["float32", "int8", "compute layout"])
def test_stacked_layers_give_the_logits_of_the_layers_one_by_one(layout):
    official = official_params(SMALL, quantized=layout != "float32")
    if layout == "compute layout":  # LinearWeight leaves, as grok1.load holds them
        official = to_compute_layout(official)
    stacked = stack_layers(dict(official))
    assert has_stacked_layers(stacked) and not has_stacked_layers(official)
    batch = tokens(2, 7)
    np.testing.assert_allclose(forward(stacked, batch)[0], forward(official, batch)[0], rtol=1e-6, atol=1e-6)


def test_stacked_layers_fill_the_cache_as_the_layers_one_by_one():
    official = official_params(SMALL)
    stacked = stack_layers(dict(official))
    batch = tokens(2, 7)
    results = {}
    for name, params in (("unrolled", official), ("scanned", stacked)):
        prefill, cache = forward(params, batch[:, :5], model.KVCache.zeros(SMALL, 2, 16, jnp.float32))
        decode, cache = forward(params, batch[:, 5:6], cache)
        results[name] = (prefill, decode, cache.keys, cache.values)
    for got, want in zip(results["scanned"], results["unrolled"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_stacking_puts_the_layers_on_a_leading_axis_under_one_module_each():
    official = official_params(SMALL, quantized=True)
    stacked = stack_layers(dict(official))
    assert "transformer/decoder_layers/moe/linear" in stacked
    assert not any(re.search(r"decoder_layer_\d", module) for module in stacked)
    weight = stacked["transformer/decoder_layers/moe/linear"]["w"]
    assert isinstance(weight, QuantizedWeight8bit)
    assert weight.shape == (SMALL.num_layers, SMALL.num_experts, SMALL.emb_size, SMALL.ffn_size)
    np.testing.assert_array_equal(weight.weight[2], official["transformer/decoder_layer_2/moe/linear"]["w"].weight)


@pytest.mark.parametrize("layout", ["int8", "compute layout"])
def test_unstacking_gives_the_official_tree_back_exactly(layout):
    official = official_params(SMALL, quantized=True)
    if layout == "compute layout":
        official = to_compute_layout(official)
    back = unstack_layers(stack_layers(dict(official)))
    assert sorted(back) == sorted(official)
    leaves = lambda tree: jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
    for (path, got), (_, want) in zip(leaves(back), leaves(official)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    kind = LinearWeight if layout == "compute layout" else QuantizedWeight8bit
    assert isinstance(back["transformer/decoder_layer_1/moe/linear_v"]["w"], kind)


def test_stacking_puts_layer_i_at_index_i_past_ten_layers_whatever_the_order_of_the_names():
    # Names sorted as strings put decoder_layer_10 before decoder_layer_2: the stack must follow
    # the layer numbers (stacked in string order, twelve_layer on a mesh was off by up to 2.99).
    official = {official_module(i, inner): {"w": np.full((2, 3), i, np.int32)}
                for i in range(12) for inner in ("moe/linear", "rms_norm")}
    official = {module: official[module] for module in sorted(official)}
    stacked = stack_layers(official)
    for inner in ("moe/linear", "rms_norm"):
        layers = stacked[stacked_module(inner)]["w"]
        assert layers.shape == (12, 2, 3)
        assert [int(layer[0, 0]) for layer in layers] == list(range(12)), inner


def test_stacking_refuses_layers_that_are_not_numbered_from_zero():
    official = official_params(SMALL)
    for module in [m for m in official if m.startswith("transformer/decoder_layer_1/")]:
        del official[module]
    with pytest.raises(ValueError, match=r"layers \[0, 2\], missing layers \[1\]"):
        stack_layers(official)


def compiled_dots(config: ModelConfig) -> int:
    """Dot instructions in the compiled decode step of `config`'s model, layers stacked."""
    fn = model.transformed(config)
    params = jax.eval_shape(lambda: stack_layers(fn.init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))))
    cache = jax.eval_shape(lambda: model.KVCache.zeros(config, 1, 16, jnp.float32))
    step = jax.jit(fn.apply).lower(params, jax.ShapeDtypeStruct((1, 1), jnp.int32), cache).compile()
    return len(re.findall(r"\bdot\(", step.as_text()))


def test_compiled_step_holds_one_layer_body_whatever_the_depth():
    two, six = compiled_dots(SMALL.replace(num_layers=2)), compiled_dots(SMALL.replace(num_layers=6))
    assert two > 0 and six == two


def test_loaded_int8_model_keeps_layers_stacked_and_saves_the_checkpoint_byte_for_byte(tmp_path):
    loaded = grok1.load(SHIPPED, mesh="1x1", progress=False)  # on a mesh the official int8 tree stays
    assert has_stacked_layers(loaded.params)
    loaded.save(tmp_path / "copy")
    for name in sorted(os.listdir(SHIPPED / "ckpt-0")):
        assert (tmp_path / "copy" / "ckpt-0" / name).read_bytes() == (SHIPPED / "ckpt-0" / name).read_bytes(), name


def write_wide_checkpoint(path: Path, blocks: int) -> ModelConfig:
    """An int8 checkpoint whose table and expert weights are cut into several chunks (input axes
    over MAX_CHUNK) with `blocks` scale blocks: every case of the one-device load's layout."""
    from grok1 import checkpoint
    config = ModelConfig(vocab_size=64, emb_size=2048, num_q_heads=8, num_kv_heads=1, key_size=256,
                         num_layers=2, widening_factor=1, num_experts=2, num_selected_experts=1,
                         sequence_len=16)
    params = official_params(config)
    checkpoint.save(checkpoint.quantize_params(params, config, num_blocks=blocks), path, config)
    return config


def leaves_equal(a: dict, b: dict) -> bool:
    """Same arrays in the same tree (whatever a mesh recorded of how they are split)."""
    import dataclasses
    unsplit = lambda leaf: dataclasses.replace(leaf, mesh_split=()) if isinstance(leaf, LinearWeight) else leaf  # noqa: E731
    a, b = (jax.tree_util.tree_map(unsplit, t, is_leaf=lambda x: isinstance(x, LinearWeight)) for t in (a, b))
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(flat_a, flat_b))


@pytest.mark.parametrize("blocks", [1, 2])
def test_loading_onto_one_device_gives_the_params_of_the_mesh_path_exactly(tmp_path, blocks, monkeypatch):
    from grok1.weights.stacking import HostStack
    write_wide_checkpoint(tmp_path / "wide", blocks)
    monkeypatch.setattr(HostStack, "PIECE_BYTES", 1000)  # the table in many bands
    one = grok1.load(tmp_path / "wide", progress=False)
    mesh = grok1.load(tmp_path / "wide", mesh="1x1", progress=False)
    assert leaves_equal(one.params, mesh.params)


def test_loading_onto_one_device_compiles_nothing():
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        grok1.load(SHIPPED, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_a_table_in_an_unusual_pickle_layout_loads_onto_one_device_like_the_usual_one(tmp_path):
    # The table is read in bands; a file the fast reader cannot locate (numpy's own pickle of a
    # Fortran-order array) is unpickled whole once and then cut into the same bands.
    import pickle
    import shutil
    from grok1 import checkpoint
    shutil.copytree(SHIPPED, tmp_path / "unusual")
    config = checkpoint.read_config(SHIPPED)
    table = next(s for s in checkpoint.tensor_specs(config) if s.param == "embeddings")
    path = tmp_path / "unusual" / "ckpt-0" / table.filename
    fortran = np.asfortranarray(checkpoint.read_tensor(path))
    with open(path, "wb") as f:
        pickle.dump(fortran, f, protocol=4)
    assert checkpoint.locate_tensor(path) is None
    assert leaves_equal(grok1.load(tmp_path / "unusual", progress=False).params,
                        grok1.load(SHIPPED, progress=False).params)
