"""The native CPU kernels (grok1/kernels/native.py: cpu_products.cc, cpu_attention.cc) against float64
numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.kernels import native

if not native.available():
    pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}", allow_module_level=True)


def weight(seed: int, stack: int, chunks: int, n_out: int, run: int, blocks: int | None,
           dtype=jnp.int8, scale_dtype=jnp.bfloat16):
    """Random values [stack, chunks, n_out, run] (int8 or bfloat16) and scales [stack, blocks,
    n_out] (None without blocks), as jax arrays."""
    rng = np.random.default_rng(seed)
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        values = jnp.asarray(rng.integers(-128, 128, (stack, chunks, n_out, run), dtype=np.int8))
    else:
        values = jnp.asarray(rng.standard_normal((stack, chunks, n_out, run)), dtype)
    scales = None
    if blocks is not None:
        scales = jnp.asarray(rng.uniform(-2, 2, (stack, blocks, n_out)), scale_dtype)
    return values, scales


def rows(seed: int, count: int, n_in: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((count, n_in)), jnp.float32)


def assert_matches(y, x, index, values, scales=None) -> None:
    """y equals the float64 reference within float32 rounding of a sum of n_in products."""
    expected = native.reference(np.asarray(x), np.asarray(index), values, scales)
    n_in = x.shape[1]
    # bound: n_in roundings of float32 (2^-24 each) on the sum of |terms|
    w = np.asarray(values.astype(jnp.float32), np.float64)
    magnitude = native.reference(np.abs(np.asarray(x)), np.asarray(index), np.abs(w),
                                 None if scales is None else np.abs(np.asarray(scales.astype(jnp.float32))))
    tolerance = 4 * n_in * 2.0 ** -24 * magnitude + 1e-30
    y = np.asarray(y, np.float64)
    assert y.shape == expected.shape
    assert np.all(np.abs(y - expected) <= tolerance), np.max(np.abs(y - expected) / tolerance)


def test_int8_with_bfloat16_scales_matches_reference():
    values, scales = weight(0, 3, 2, 100, 64, 2)
    x, index = rows(1, 5, 128), jnp.asarray([2, 0, 1, 1, 2], jnp.int32)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


def test_int8_with_float32_scales_matches_reference():
    values, scales = weight(2, 2, 4, 37, 48, 4, scale_dtype=jnp.float32)
    x, index = rows(3, 4, 192), jnp.asarray([1, 1, 0, 1], jnp.int32)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


@pytest.mark.parametrize("count", [1, 3])
def test_bfloat16_weight_without_scales_matches_reference(count):
    values, _ = weight(4, 1, 1, 300, 260, None, dtype=jnp.bfloat16)
    x, index = rows(5, count, 260), jnp.zeros((count,), jnp.int32)
    assert_matches(native.rows_times(x, index, values), x, index, values)


@pytest.mark.parametrize("count", [1, 2, 7, 8, 16, 33])
def test_row_counts_match_reference(count):
    values, scales = weight(6, 1, 2, 70, 96, 1)    # 70 outputs: a partial last column step
    x, index = rows(7, count, 192), jnp.zeros((count,), jnp.int32)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


def test_stack_indices_in_any_order_each_row_uses_its_own():
    values, scales = weight(8, 5, 1, 130, 80, 1)
    index = jnp.asarray([4, 0, 4, 2, 1, 0, 3, 4, 2, 2, 0], jnp.int32)
    x = rows(9, index.shape[0], 80)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


def test_several_chunks_per_scale_block():
    values, scales = weight(10, 2, 6, 50, 40, 3)    # blocks of 80 inputs, two chunks each
    x, index = rows(11, 3, 240), jnp.asarray([0, 1, 0], jnp.int32)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


def test_one_chunk_per_scale_block_with_an_odd_chunk():
    values, scales = weight(12, 2, 8, 64, 683, 8)   # the down projection's chunking, B == C
    x, index = rows(13, 4, 8 * 683), jnp.asarray([1, 0, 1, 1], jnp.int32)
    assert_matches(native.rows_times(x, index, values, scales), x, index, values, scales)


def test_inside_jit():
    values, scales = weight(14, 3, 2, 90, 64, 2)
    x, index = rows(15, 6, 128), jnp.asarray([0, 1, 2, 2, 1, 0], jnp.int32)
    y = jax.jit(lambda x, i, v, s: native.rows_times(x * 1.0, i, v, s) + 0.0)(x, index, values, scales)
    assert_matches(y, x, index, values, scales)


def test_inside_scan_indexing_a_closed_over_stack_by_the_loop_counter():
    values, scales = weight(16, 4, 2, 64, 32, 1)
    x = rows(17, 2, 64)

    def body(carry, step):
        y = native.rows_times(x, jnp.full((2,), step, jnp.int32), values, scales)
        return carry + y.sum(), y

    total, ys = jax.jit(lambda: jax.lax.scan(body, jnp.float32(0), jnp.arange(4)))()
    for step in range(4):
        assert_matches(ys[step], x, jnp.full((2,), step, jnp.int32), values, scales)
    np.testing.assert_allclose(total, np.asarray(ys).sum(), rtol=1e-5)


def test_no_rows_gives_an_empty_result():
    values, scales = weight(18, 1, 1, 16, 32, 1)
    y = native.rows_times(jnp.zeros((0, 32), jnp.float32), jnp.zeros((0,), jnp.int32), values, scales)
    assert y.shape == (0, 16)


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    values, scales = weight(19, 2, 1, 4096, 512, 1)   # large enough to be split over threads
    x, index = rows(20, 9, 512), jnp.asarray([0, 1] * 4 + [1], jnp.int32)
    call = jax.jit(native.rows_times)
    monkeypatch.setenv("GROK1_NATIVE_THREADS", "1")
    one = np.asarray(call(x, index, values, scales))
    monkeypatch.setenv("GROK1_NATIVE_THREADS", "2")
    two = np.asarray(call(x, index, values, scales))
    np.testing.assert_array_equal(one, two)


def test_mismatched_input_length_is_a_clear_error():
    values, scales = weight(21, 1, 2, 8, 16, 1)
    with pytest.raises(ValueError, match="inputs per row"):
        native.rows_times(jnp.zeros((1, 30), jnp.float32), jnp.zeros((1,), jnp.int32), values, scales)


def test_mismatched_scales_are_a_clear_error():
    values, _ = weight(22, 2, 2, 8, 16, None)
    with pytest.raises(ValueError, match="scales must be"):
        native.rows_times(jnp.zeros((1, 32), jnp.float32), jnp.zeros((1,), jnp.int32), values,
                          jnp.ones((2, 1, 9), jnp.float32))


def test_chunk_across_scale_blocks_is_a_clear_error():
    values, _ = weight(23, 1, 2, 8, 16, None)
    with pytest.raises(ValueError, match="inside one of 4 scale blocks"):
        native.rows_times(jnp.zeros((1, 32), jnp.float32), jnp.zeros((1,), jnp.int32), values,
                          jnp.ones((1, 4, 8), jnp.float32))


def test_kernel_rejects_an_index_outside_the_stack():
    values, scales = weight(24, 2, 1, 8, 16, 1)
    with pytest.raises(Exception, match="outside the stack of 2"):
        jax.block_until_ready(native.rows_times(jnp.zeros((1, 16), jnp.float32),
                                                jnp.asarray([2], jnp.int32), values, scales))


def test_kernel_checks_shapes_itself():
    """The C++ side validates too (a caller going around rows_times' checks)."""
    values, scales = weight(25, 1, 2, 8, 16, 1)
    call = jax.ffi.ffi_call(native.TARGET_SCALED, jax.ShapeDtypeStruct((1, 8), jnp.float32))
    with pytest.raises(Exception, match="inputs per row"):
        jax.block_until_ready(call(jnp.zeros((1, 30), jnp.float32), jnp.zeros((1,), jnp.int32),
                                   values, scales, threads=np.int64(0)))


def test_loaded_model_decodes_through_the_kernel_with_the_logits_of_xla_products(monkeypatch):
    # The shipped int8 model's own decode step (rows of the bf16 table, layers picked out of the
    # stack, each (token, expert) pair reading its expert) against the same step with the kernel
    # turned off.
    import pathlib
    import grok1
    from grok1.kernels import platform, products
    from grok1.model import transformed

    model = grok1.load(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "small",
                       dtype="float32", progress=False)
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(4, 6))
    apply = jax.jit(transformed(model.config, model.dtype).apply)
    experts = model.params["transformer/decoder_layers/moe/linear_1"]["w"]
    assert experts.dtype == jnp.int8 and platform.native_products(experts, 8)

    def decode_step_logits() -> np.ndarray:
        _, cache = apply(model.params, jnp.asarray(tokens[:, :-1]), model.init_cache(4))
        logits, _ = apply(model.params, jnp.asarray(tokens[:, -1:]), cache)
        return np.asarray(logits)

    native_logits = decode_step_logits()
    monkeypatch.setattr(products, "native_products", lambda w, rows: False)
    monkeypatch.setattr(grok1.kernels.experts, "native_products", lambda w, rows: False)
    apply = jax.jit(transformed(model.config, model.dtype).apply)  # traced again, without it
    np.testing.assert_allclose(native_logits, decode_step_logits(), rtol=0, atol=1e-4)


def cache(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))


def assert_attention_matches(q, keys, values, layer, mask, multiplier=0.125, cap=30.0) -> None:
    got = native.cached_attention(q, keys, values, layer, mask, multiplier, cap, -1e30)
    expected = native.attention_reference(np.asarray(q), keys, values, layer, np.asarray(mask),
                                          multiplier, cap, -1e30)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    # float32 dots, exp and tanh (a few ulps each) on outputs of magnitude ~1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)


def test_cached_attention_matches_reference_on_every_layer():
    keys, values = cache(30, (3, 2, 37, 2, 64))                      # [L, B, S, N, K]
    q = jnp.asarray(np.random.default_rng(31).standard_normal((2, 1, 2, 3, 64)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(32).random((2, 1, 37)) < 0.7)
    for layer in range(3):
        assert_attention_matches(q, keys, values, layer, mask)


def test_cached_attention_reads_a_bfloat16_cache():
    keys, values = cache(33, (2, 2, 50, 2, 128), jnp.bfloat16)
    q = jnp.asarray(np.random.default_rng(34).standard_normal((2, 1, 2, 6, 128)), jnp.float32)
    assert_attention_matches(q, keys, values, 1, jnp.ones((2, 1, 50), bool))


def test_cached_attention_caps_logits_past_thirty():
    keys, values = cache(35, (1, 1, 24, 1, 32))
    q = 40 * jnp.asarray(np.random.default_rng(36).standard_normal((1, 1, 1, 2, 32)), jnp.float32)
    assert_attention_matches(q, keys, values, 0, jnp.ones((1, 1, 24), bool), multiplier=1.0)


def test_cached_attention_of_several_queries_with_their_own_masks_and_an_odd_key_size():
    keys, values = cache(37, (2, 3, 9, 1, 20))
    q = jnp.asarray(np.random.default_rng(38).standard_normal((3, 2, 1, 4, 20)), jnp.float32)
    mask = np.tril(np.ones((2, 9), bool), 6)[None].repeat(3, 0)          # causal, 2 new tokens
    assert_attention_matches(q, keys, values, 1, jnp.asarray(mask))


def test_cached_attention_averages_all_values_for_a_query_that_sees_no_key():
    # as the model does: every logit is the masked one, so the softmax is uniform
    keys, values = cache(39, (1, 1, 16, 1, 8))
    q = jnp.ones((1, 1, 1, 1, 8), jnp.float32)
    got = native.cached_attention(q, keys, values, 0, jnp.zeros((1, 1, 16), bool), 0.125, 30.0, -1e30)
    np.testing.assert_allclose(np.asarray(got)[0, 0, 0, 0], np.asarray(values)[0, 0, :, 0].mean(0),
                               atol=1e-6)


def test_cached_attention_of_a_query_that_sees_no_key_beside_one_that_sees_some():
    # one row, two new tokens: the first sees nothing (uniform over all 12 positions), the
    # second sees positions 0-4 only
    keys, values = cache(41, (1, 1, 12, 1, 8))
    q = jnp.asarray(np.random.default_rng(42).standard_normal((1, 2, 1, 2, 8)), jnp.float32)
    mask = np.zeros((1, 2, 12), bool)
    mask[0, 1, :5] = True
    assert_attention_matches(q, keys, values, 0, jnp.asarray(mask))


def test_cached_attention_ignores_stale_entries_past_what_the_queries_see():
    keys, values = cache(43, (2, 2, 30, 2, 64))
    q = jnp.asarray(np.random.default_rng(44).standard_normal((2, 1, 2, 2, 64)), jnp.float32)
    mask = jnp.asarray(np.arange(30)[None, None, :] < np.asarray([7, 19])[:, None, None])
    clean = native.cached_attention(q, keys, values, 1, mask, 0.125, 30.0, -1e30)
    stale = jnp.asarray(np.arange(30)[None, :] >= np.asarray([7, 19])[:, None])[None, :, :, None, None]
    dirty = [jnp.where(stale, 1e6, a) for a in (keys, values)]
    np.testing.assert_array_equal(
        np.asarray(native.cached_attention(q, *dirty, 1, mask, 0.125, 30.0, -1e30)), np.asarray(clean))


def test_cached_attention_rejects_a_layer_outside_the_cache():
    keys, values = cache(40, (2, 1, 8, 1, 8))
    with pytest.raises(Exception, match="outside the cache's 2 layers"):
        jax.block_until_ready(native.cached_attention(jnp.ones((1, 1, 1, 1, 8)), keys, values, 2,
                                                      jnp.ones((1, 1, 8), bool), 0.125, 30.0, -1e30))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_through_the_attention_kernel_has_the_logits_of_xla_attention(monkeypatch, dtype):
    # the prompt's step (8 new tokens, 4 query heads per kv head) and the decode step both
    # attend through the kernel; bfloat16 keeps a bfloat16 cache and rounds the logits
    import pathlib
    import grok1
    from grok1.kernels import attention, platform
    from grok1.model import transformed

    model = grok1.load(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "small",
                       dtype=dtype, progress=False)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.config.vocab_size, size=(4, 9))
    tokens[1, :3] = model.config.pad_token                              # a left-padded row

    def decode_step_logits() -> np.ndarray:
        apply = jax.jit(transformed(model.config, model.dtype).apply)
        _, cache = apply(model.params, jnp.asarray(tokens[:, :-1]), model.init_cache(4))
        logits, _ = apply(model.params, jnp.asarray(tokens[:, -1:]), cache)
        return np.asarray(logits)

    probe = jnp.zeros((4, 1, model.config.num_kv_heads, model.config.q_per_kv, model.config.key_size))
    assert platform.native_attention(probe, jnp.zeros((1,), jnp.float32))
    native_logits = decode_step_logits()
    monkeypatch.setattr(attention, "native_attention", lambda q, keys: False)
    xla_logits = decode_step_logits()
    # float32: rounding of the sums; bfloat16: at most one rounding step of the returned logits
    atol = 1e-4 if dtype == "float32" else 2.0 ** -7 * np.abs(xla_logits).max()
    np.testing.assert_allclose(native_logits, xla_logits, rtol=0, atol=atol)


MESH_DECODE = """
import re, numpy as np, jax, jax.numpy as jnp, grok1
from grok1.generation import steps
from grok1.generation.runner import Runner
from grok1.mesh import on_mesh
from grok1.model import transformed
path = {path!r}
one = grok1.load(path, dtype="float32", progress=False)
mesh = grok1.load(path, dtype="float32", mesh={spec!r}, progress=False)
tokens = np.random.default_rng(0).integers(3, one.config.vocab_size, size=(4, 6))

def decode_step_logits(model):
    apply = jax.jit(on_mesh(transformed(model.config, model.dtype).apply, model.mesh))
    _, cache = apply(model.params, jnp.asarray(tokens[:, :-1]), model.init_cache(4))
    logits, _ = apply(model.params, jnp.asarray(tokens[:, -1:]), cache)
    return np.asarray(logits)

runner = Runner(mesh, slots=4)
state = jax.device_put(steps.empty_state(mesh.config, mesh.dtype, 4), runner._state_sharding)
hlo = runner.decode.lower(mesh.params, state).compile().as_text()
print(len(re.findall(r"custom_call_target=.grok1_rows_times", hlo)))
print(np.abs(decode_step_logits(mesh) - decode_step_logits(one)).max())
"""


@pytest.mark.parametrize("spec", ["1x8", "2x4"])
def test_a_mesh_decodes_through_the_kernel_on_each_devices_shard_with_the_logits_of_one_device(spec):
    # Every product of the shipped model's decode step (the table, attention and the three
    # expert matrices: 7 in the layer body, and the output projection) runs per device under
    # shard_map.
    import pathlib
    from conftest import run_with_devices
    path = str(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "small")
    calls, diff = run_with_devices(MESH_DECODE.format(path=path, spec=spec), devices=8).split()
    assert int(calls) == 8
    assert float(diff) < 1e-4


MESH_ATTENTION = """
import re, numpy as np, jax, jax.numpy as jnp
from grok1 import kernels
from grok1.mesh import ACTIVATION_AXES, activation_sharding, make_mesh, on_mesh
from grok1.model import MASKED_LOGIT, cap_attention_logits
mesh = make_mesh({spec!r})
L, B, S, N, G, K = 2, {rows}, 40, {heads}, 3, 16
rng = np.random.default_rng(0)
keys, values = (rng.standard_normal((L, B, S, N, K)).astype(np.float32) for _ in range(2))
q = rng.standard_normal((B, 1, N, G, K)).astype(np.float32)
mask = rng.random((B, 1, S)) < 0.8

def attend(q, k, v, mask):  # the model's formula, multiplier 0.125
    logits = cap_attention_logits(jnp.einsum("btngk,bsnk->bngts", q, k) * 0.125)
    logits = jnp.where(mask[:, None, None], logits, MASKED_LOGIT)
    return jnp.einsum("bngts,bsnk->btngk", jax.nn.softmax(logits, axis=-1), v)

def step(q, keys, values, mask):
    return kernels.attention_over_cache(q, keys, values, 1, mask, attend, multiplier=0.125,
                                        cap=30.0, masked_logit=MASKED_LOGIT)

cache = activation_sharding(mesh, "cache_kv", keys.shape)
args = (q, jax.device_put(keys, cache), jax.device_put(values, cache), mask)
call = jax.jit(on_mesh(step, mesh))
print(len(re.findall(r"custom_call_target=.grok1_cached_attention", call.lower(*args).compile().as_text())))
print(np.abs(np.asarray(call(*args)) - np.asarray(attend(q, keys[1], values[1], mask))).max())
"""


@pytest.mark.parametrize("spec, rows, heads, kernel_calls", [
    ("1x8", 2, 8, 1),   # kv heads over model: each device its own head
    ("2x4", 4, 4, 1),   # rows over data, kv heads over model
    ("1x8", 2, 4, 0),   # 4 kv heads on 8 devices: the cache is replicated, XLA splits the work
])
def test_mesh_attention_runs_the_kernel_per_device_where_each_holds_its_own_cache_shard(
        spec, rows, heads, kernel_calls):
    from conftest import run_with_devices
    out = run_with_devices(MESH_ATTENTION.format(spec=spec, rows=rows, heads=heads), devices=8)
    calls, diff = out.split()
    assert int(calls) == kernel_calls
    assert float(diff) < 1e-5


@pytest.mark.parametrize("cores, devices, threads", [(2, 8, 1), (16, 8, 2), (2, 2, 1), (8, 1, 8)])
def test_each_device_kernel_call_gets_its_share_of_the_process_cores(monkeypatch, cores, devices, threads):
    # A mesh's devices run their programs side by side: 8 forced devices on 2 cores, each call
    # also spreading over XLA's pool, spent about a third more CPU time per decode step.
    from jax.sharding import AbstractMesh
    from grok1.kernels import platform
    monkeypatch.setattr(platform, "_cores", lambda: cores)
    monkeypatch.setattr(jax, "local_device_count", lambda: devices)
    mesh = AbstractMesh((1, 1, devices), ("data", "expert", "model"))
    assert platform.threads_per_device(mesh) == threads
