"""Meshes and partition rules: every large weight is split 1/n over the whole mesh, and a sharded
model computes what one device computes."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import run_with_devices
from grok1.config import PRESETS
from grok1.mesh import activation_sharding, make_mesh, parse_mesh_spec, partition_spec
from grok1.model import KVCache, param_shapes
from grok1.params import logical_axes
from grok1.weights.placement import param_sharding
from grok1.weights.quant import QuantizedWeight8bit

MESHES = ("1x8", "2x4", "8x1", "1x2x4")
LARGE = ("query", "linear", "linear_v", "linear_1", "in_out_embed")


def abstract_mesh(spec: str) -> AbstractMesh:
    shape = parse_mesh_spec(spec)
    return AbstractMesh(tuple(shape.values()), tuple(shape))


def mesh_axes_of(spec: P) -> list[str]:
    axes = []
    for entry in spec:
        axes += [entry] if isinstance(entry, str) else list(entry or ())
    return axes


# ---- mesh specs -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("1x8", {"data": 1, "expert": 1, "model": 8}),
    ("2x4", {"data": 2, "expert": 1, "model": 4}),
    ("8x1", {"data": 8, "expert": 1, "model": 1}),
    ("1x2x4", {"data": 1, "expert": 2, "model": 4}),
    ("data=2,model=4", {"data": 2, "expert": 1, "model": 4}),
    ("expert=8", {"data": 1, "expert": 8, "model": 1}),
])
def test_parse_mesh_spec_names_data_expert_model(spec, expected):
    assert parse_mesh_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("8", "is not DATAxMODEL"),
    ("1x2x3x4", "is not DATAxMODEL"),
    ("pipeline=2", "unknown mesh axis 'pipeline'"),
    ("0x8", "must be positive"),
    ("model=2,model=4", "given twice"),
])
def test_parse_mesh_spec_rejects_bad_specs_saying_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec)


def test_make_mesh_refuses_a_device_count_mismatch():
    with pytest.raises(ValueError, match=r"needs 8 devices but 1 are available"):
        make_mesh("1x8", jax.devices()[:1])


# ---- the table --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grok1_layer_shapes() -> dict:
    """Parameter shapes of grok-1 at full width; one layer, as all layers share the rules."""
    return param_shapes(PRESETS["grok-1"].replace(num_layers=1))


@pytest.mark.parametrize("spec", MESHES)
def test_every_large_grok1_weight_is_split_over_all_eight_devices(spec, grok1_layer_shapes):
    mesh = abstract_mesh(spec)
    for module, group in grok1_layer_shapes.items():
        if module.split("/")[-1] not in LARGE:
            continue
        for name, struct in group.items():
            pspec = partition_spec(logical_axes(module, name), struct.shape, mesh)
            assert math.prod(mesh.shape[a] for a in mesh_axes_of(pspec)) == 8, (module, pspec)


@pytest.mark.parametrize("spec, split", [("1x8", 8), ("2x4", 4), ("8x1", 1), ("1x2x4", 8)])
def test_key_and_value_projections_split_whole_kv_heads_over_expert_and_model_only(
        spec, split, grok1_layer_shapes):
    # 8 kv heads of 128 (1024 columns): never cut within a head, and not split over data
    mesh = abstract_mesh(spec)
    for name in ("key", "value"):
        module = next(m for m in grok1_layer_shapes if m.endswith("multi_head_attention/" + name))
        shape = grok1_layer_shapes[module]["w"].shape
        pspec = partition_spec(logical_axes(module, "w"), shape, mesh)
        assert "data" not in mesh_axes_of(pspec)
        assert math.prod(mesh.shape[a] for a in mesh_axes_of(pspec)) == split
        assert shape[-1] // split % PRESETS["grok-1"].key_size == 0


@pytest.mark.parametrize("spec", MESHES)
def test_small_parameters_are_replicated(spec):
    mesh = abstract_mesh(spec)
    assert partition_spec(logical_axes("transformer/decoder_layer_0/router", "w"),
                          (6144, 8), mesh) == P(None, None)
    assert partition_spec(logical_axes("transformer/decoder_layer_0/rms_norm_3", "scale"),
                          (6144,), mesh) == P(None)


def test_experts_go_to_the_expert_axis_and_ffn_to_the_rest():
    axes = logical_axes("transformer/decoder_layer_0/moe/linear_1", "w")
    assert partition_spec(axes, (8, 32768, 6144), abstract_mesh("1x2x4")) == P("expert", "model", None)


def test_an_axis_that_does_not_divide_stays_whole():
    axes = logical_axes("transformer/decoder_layer_0/multi_head_attention/query", "w")
    assert partition_spec(axes, (64, 12), abstract_mesh("1x8")) == P(None, None)


def test_block_scales_are_split_like_the_weight_input_axis():
    mesh = abstract_mesh("2x4")
    weight = QuantizedWeight8bit(weight=jax.ShapeDtypeStruct((8, 32768, 6144), jnp.int8),
                                 scales=jax.ShapeDtypeStruct((8, 8, 6144), jnp.bfloat16))
    s = param_sharding(mesh, "transformer/decoder_layer_0/moe/linear_1", "w", weight)
    assert s.weight.spec == P(None, ("data", "model"), None)
    assert s.scales.spec == P(None, ("data", "model"), None)


def test_unknown_parameter_names_its_path():
    with pytest.raises(KeyError, match="transformer/decoder_layer_0/adapter/w"):
        logical_axes("transformer/decoder_layer_0/adapter", "w")


def test_kv_cache_rows_go_over_data_and_heads_over_the_rest():
    cache = jax.eval_shape(lambda: KVCache.zeros(PRESETS["grok-1"].replace(num_layers=2), 2, 128))
    s = cache.sharding(abstract_mesh("2x4"))
    assert s.keys.spec == s.values.spec == P(None, "data", None, "model", None)  # layers never split
    assert s.valid.spec == P("data", None) and s.length.spec == P("data")


def test_kv_cache_of_one_row_spreads_its_heads_over_every_device():
    cache = jax.eval_shape(lambda: KVCache.zeros(PRESETS["grok-1"].replace(num_layers=1), 1, 128))
    s = cache.sharding(abstract_mesh("2x4"))
    assert s.keys.spec == P(None, None, None, ("data", "model"), None)


def test_stacked_layer_weights_split_like_each_layer_with_the_layer_axis_whole():
    mesh = abstract_mesh("1x8")
    one = logical_axes("transformer/decoder_layer_0/moe/linear_1", "w")
    stacked = logical_axes("transformer/decoder_layers/moe/linear_1", "w")
    assert stacked == ("layers",) + one
    assert partition_spec(stacked, (64, 8, 32768, 6144), mesh) == \
        P(None, *partition_spec(one, (8, 32768, 6144), mesh))


def test_the_embedding_table_is_split_by_vocabulary_over_every_mesh_axis():
    axes = logical_axes("language_model/in_out_embed", "embeddings")
    assert partition_spec(axes, (131072, 6144), abstract_mesh("2x4")) == P(("data", "model"), None)
    assert partition_spec(axes, (131072, 6144), abstract_mesh("1x8")) == P("model", None)


def test_step_inputs_are_split_by_rows_and_logits_also_by_vocabulary_like_the_table():
    mesh = abstract_mesh("2x4")
    assert activation_sharding(mesh, "tokens", (4, 16)).spec == P("data", None)
    assert activation_sharding(mesh, "logits", (4, 16, 512)).spec == P("data", None, "model")
    assert activation_sharding(abstract_mesh("1x8"), "logits", (4, 16, 512)).spec == \
        P(None, None, "model")
    with pytest.raises(KeyError, match="unknown activation 'hidden'"):
        activation_sharding(mesh, "hidden", (4, 16, 512))


# ---- eight devices, real checkpoints ----------------------------------------------------------

EIGHT_DEVICES = """
import json, numpy as np, jax, grok1
from grok1.mesh import make_mesh
from grok1.weights.layout import LinearWeight
path, specs = {path!r}, {specs!r}
prompts = json.load(open(path + "/golden.json"))["prompts"]
T = max(len(p) for p in prompts)
tokens = np.array([p + [0] * (T - len(p)) for p in prompts])
reference = grok1.load(path, dtype="float32", mesh=make_mesh("1x1", jax.devices()[:1])).logits(tokens)
out = {{}}
for spec in specs:
    model = grok1.load(path, dtype="float32", mesh=make_mesh(spec))
    fractions = {{}}
    for module, group in model.params.items():
        if module.split("/")[-1] not in {large!r}:
            continue
        for name, value in group.items():
            w = value.values if isinstance(value, LinearWeight) else value
            fractions[module + "/" + name] = sorted({{s.data.size / w.size for s in w.addressable_shards}})
    out[spec] = {{"max_diff": float(np.abs(model.logits(tokens) - reference).max()), "fractions": fractions}}
print(json.dumps(out))
"""


def sharded_results(path, specs=MESHES) -> dict:
    return json.loads(run_with_devices(EIGHT_DEVICES.format(path=str(path), specs=list(specs), large=LARGE)))


@pytest.fixture(scope="module")
def two_layer_results():
    from conftest import Golden
    return sharded_results(Golden("two_layer").path)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_logits_equal_one_device(two_layer_results, spec):
    assert two_layer_results[spec]["max_diff"] <= 1e-4


@pytest.mark.parametrize("spec", MESHES)
def test_each_device_holds_an_eighth_of_every_large_weight(two_layer_results, spec):
    fractions = two_layer_results[spec]["fractions"]
    # query, the attention and expert `linear`, linear_v, linear_1 (each stacked over both
    # layers) and the table; key and value split only over expert and model (the next test)
    assert len(fractions) == 5 + 1
    assert all(f == [1 / 8] for f in fractions.values()), fractions


@pytest.mark.slow
def test_twelve_layer_sharded_logits_equal_one_device(twelve_layer):
    results = sharded_results(twelve_layer.path)
    assert all(r["max_diff"] <= 1e-4 for r in results.values()), results


CACHE_COLLECTIVES = """
import re, tempfile, jax, jax.numpy as jnp, numpy as np, grok1
from grok1 import checkpoint
from grok1.generation import steps
from grok1.generation.runner import Runner
from grok1.config import ModelConfig
from grok1.model import transformed
path = {path!r}
if path is None:  # 4 kv heads of 16, as bench-1b has 4: whole heads on 2x4's model axis
    config = ModelConfig(vocab_size=256, emb_size=128, num_q_heads=8, num_kv_heads=4, key_size=16,
                         num_layers=2, widening_factor=2, sequence_len=64)
    params = transformed(config).init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))
    path = tempfile.mkdtemp()
    checkpoint.save(jax.tree.map(np.asarray, params), path, config)
model = grok1.load(path, mesh={spec!r}, progress=False)
runner = Runner(model, slots={rows})
state = jax.device_put(steps.empty_state(model.config, model.dtype, {rows}), runner._state_sharding)
hlo = runner.decode.lower(model.params, state).compile().as_text()
c = model.config
stack = f"{{c.num_layers}},{{ {rows} }},{{c.sequence_len}},"
found = re.finditer(r"= \\w+\\[([\\d,]+)\\]\\S* (all-gather|collective-permute|all-to-all)(-start)?\\(", hlo)
print(sum(m.group(1).startswith(stack) for m in found))
"""


STEP_COLLECTIVES = """
import collections, re, tempfile, jax, jax.numpy as jnp, numpy as np, grok1
from grok1 import checkpoint
from grok1.generation import steps
from grok1.generation.runner import Runner
from grok1.config import ModelConfig
from grok1.model import transformed
# 4 kv heads of 16 columns, as bench-1b has 4: fewer than the 8 devices
config = ModelConfig(vocab_size=256, emb_size=128, num_q_heads=8, num_kv_heads=4, key_size=16,
                     num_layers=2, widening_factor=2, sequence_len=64)
params = transformed(config).init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))
path = tempfile.mkdtemp()
checkpoint.save(jax.tree.map(np.asarray, params), path, config)
model = grok1.load(path, mesh="1x8", progress=False)
counts = {}
for rows in (1, 8):
    runner = Runner(model, slots=rows)
    state = jax.device_put(steps.empty_state(model.config, model.dtype, rows), runner._state_sharding)
    hlo = runner.decode.lower(model.params, state).compile().as_text()
    found = re.findall(r" (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\\(", hlo)
    counts[rows] = dict(collections.Counter(found))
print(repr(counts))
"""


@pytest.fixture(scope="module")
def one_by_eight_step_collectives():
    import ast
    return ast.literal_eval(run_with_devices(STEP_COLLECTIVES, devices=8).strip())


@pytest.mark.parametrize("rows", [1, 8])
def test_rope_needs_no_collective_when_devices_outnumber_the_kv_heads(one_by_eight_step_collectives, rows):
    # Before the new keys were held whole-headed (mesh.split_like_cache) ahead of RoPE, each
    # layer swapped halves of heads between devices.
    assert "collective-permute" not in one_by_eight_step_collectives[rows]


@pytest.mark.parametrize("rows", [1, 8])
def test_a_1x8_decode_step_compiles_at_most_20_collectives(one_by_eight_step_collectives, rows):
    # Per layer: the two sublayers' all-reduces and the new keys' and values' gathers; around
    # the layers the table lookup, the final norm and the sampler. (Before the residual stream
    # was held whole along d and the table split by vocabulary: 35 at batch 1, 44 at batch 8.)
    assert sum(one_by_eight_step_collectives[rows].values()) <= 20, one_by_eight_step_collectives


@pytest.mark.parametrize("path, spec, rows", [
    # The shipped model's 2 kv heads of 32: the key/value projections split 8 ways (a quarter
    # head per device) while the cache keeps whole heads; 4 whole-cache all-gathers per step
    # before mesh.split_like_cache.
    ("checkpoints/small", "1x8", 8),
    # 4 kv heads on 2x4 at batch 1: the projections split the heads over model, the cache (one
    # row, nothing for data to split) over data; 5 collectives of the stacked cache before.
    (None, "2x4", 1),
])
def test_a_decode_step_moves_no_part_of_the_stacked_kv_cache_between_devices(path, spec, rows):
    assert int(run_with_devices(CACHE_COLLECTIVES.format(path=path, spec=spec, rows=rows), devices=8)) == 0
