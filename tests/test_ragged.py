"""The Pallas grouped expert kernel (grok1/kernels/ragged.py), the GPUs' MoE path, computes what
the XLA path computes: run here in Pallas interpret mode, at small shapes, int8 and bfloat16,
with ragged groups and experts that no row chose."""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from grok1.kernels import experts, platform, ragged, xla
from grok1.model import ComputeOptions, transformed
from grok1.weights import layout
from grok1.weights.quant import QuantizedWeight8bit

E = 8
PALLAS = ComputeOptions(expert_product=experts.PALLAS)


@contextlib.contextmanager
def xla_paths():
    """Traced inside, the MoE layers take XLA's paths on a GPU too (GROK1_PALLAS=0), so that a
    GPU compares the kernel with them; CPUs take them anyway."""
    previous = os.environ.get("GROK1_PALLAS")
    os.environ["GROK1_PALLAS"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["GROK1_PALLAS"]
        else:
            os.environ["GROK1_PALLAS"] = previous


def expert_stack(weight_dtype: str, n_in: int, n_out: int, chunks: int = 1, blocks: int = 1,
                 layers: int = 2, seed: int = 0) -> layout.LinearWeight:
    """A stack [layers, E, in, out] in the compute layout: int8 with `blocks` scale blocks, or
    bfloat16."""
    rng = np.random.default_rng(seed)
    shape = (layers, E, n_in, n_out)
    if weight_dtype == "int8":
        stored = QuantizedWeight8bit(
            weight=rng.integers(-127, 128, shape, dtype=np.int8),
            scales=rng.uniform(0.002, 0.02, (layers, E, blocks, n_out)).astype(jnp.bfloat16))
    else:
        stored = (0.02 * rng.standard_normal(shape)).astype(jnp.bfloat16)
    return layout.to_linear_weight(stored, chunks)


def sorted_rows(sizes: list[int], n_in: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows sorted into groups of `sizes`: (rows, group sizes, each row's expert)."""
    group_sizes = jnp.asarray(sizes, jnp.int32)
    n = sum(sizes)
    rows = jax.random.normal(jax.random.key(n), (n, n_in), jnp.float32)
    return rows, group_sizes, jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=n)


def assert_same_sums(got: jax.Array, want: jax.Array) -> None:
    """Equal up to float32 rounding of sums taken in another order (1e-5 of the largest)."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_row_blocks_pad_each_group_to_whole_blocks_and_give_empty_experts_none():
    blocks = ragged.row_blocks(jnp.asarray([3, 0, 17, 0, 0, 0, 0, 1], jnp.int32), 21, 16)
    assert blocks.count == 21 // 16 + E
    assert int(blocks.used[0]) == 4                       # 1 + 2 + 1 blocks: experts 0, 2, 2, 7
    assert blocks.expert[:4].tolist() == [0, 2, 2, 7]
    assert blocks.dest.tolist() == [0, 1, 2, *range(16, 33), 48]


def test_input_axis_is_split_until_the_grid_has_enough_programs():
    assert ragged.split_count(2 * 48, 128) == 16           # batch 1's down matrix: 96 -> 1536
    assert ragged.split_count(72 * 256, 24) == 1           # a prompt fills the grid by itself
    assert ragged.split_count(10, 3) == 1                  # an odd number of tiles stays whole


@pytest.mark.parametrize("weight_dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_kernel_equals_xla_ragged_product_with_empty_experts(weight_dtype, dtype):
    w = expert_stack(weight_dtype, 1024, 48)[jnp.int32(1)]                 # layer picked, traced
    rows, sizes, row_expert = sorted_rows([3, 0, 20, 2, 0, 0, 1, 4], 1024)  # 4 input tiles, split
    got = ragged.pallas_ragged_linear(rows, w, sizes, row_expert, dtype)
    want = xla.ragged_linear(rows, w, sizes, row_expert, dtype)
    assert_same_sums(got, want)


def test_kernel_scales_each_chunk_by_its_own_scale_block():
    w = expert_stack("int8", 1024, 32, chunks=2, blocks=2)[jnp.int32(0)]
    rows, sizes, row_expert = sorted_rows([0, 5, 0, 0, 9, 0, 0, 2], 1024)
    got = ragged.pallas_ragged_linear(rows, w, sizes, row_expert, jnp.float32)
    want = xla.ragged_linear(rows, w, sizes, row_expert, jnp.float32)
    assert_same_sums(got, want)


def moe_inputs(tokens: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens routed to 2 of the first 5 experts (3 get none), with their gates."""
    x = jax.random.normal(jax.random.key(seed), (tokens, 64), jnp.float32)
    scores = jax.random.uniform(jax.random.key(seed + 1), (tokens, E)).at[:, 5:].set(-1.0)
    gates, chosen = jax.lax.top_k(scores, 2)
    return x, gates, chosen


@pytest.mark.parametrize("tokens, weight_dtype", [(1, "int8"), (8, "int8"), (150, "int8"), (8, "bfloat16")],
                         ids=["one token", "decode step", "prompt (blocks of 64)", "decode step, bfloat16"])
def test_moe_through_the_kernel_equals_the_xla_path(tokens, weight_dtype):
    stacks = tuple(expert_stack(weight_dtype, *shape, seed=i)[jnp.int32(1)]
                   for i, shape in enumerate([(64, 96), (64, 96), (96, 64)]))
    x, gates, chosen = moe_inputs(tokens)
    run = jax.jit(experts.moe, static_argnums=(4, 5))
    got = run(x, gates, chosen, stacks, jnp.bfloat16, experts.PALLAS)
    with xla_paths():
        want = run(x, gates, chosen, stacks, jnp.bfloat16, "ragged_dot")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)


def test_gpus_take_the_kernel_by_default_and_cpus_their_own_path():
    stacks = tuple(expert_stack("int8", *shape)[jnp.int32(0)] for shape in [(64, 96), (64, 96), (96, 64)])
    x, gates, chosen = moe_inputs(8)
    text = str(jax.make_jaxpr(lambda x, g, c: experts.moe(x, g, c, stacks, jnp.bfloat16))(x, gates, chosen))
    assert ("pallas_call" in text) == (jax.default_backend() == "gpu")
    forced = jax.make_jaxpr(lambda x, g, c: experts.moe(x, g, c, stacks, jnp.bfloat16, experts.PALLAS))
    assert "pallas_call" in str(forced(x, gates, chosen))


def test_gpus_keep_xla_paths_for_experts_not_in_whole_triton_tiles():
    assert platform.pallas_tiles_fit(expert_stack("int8", 64, 96))
    assert not platform.pallas_tiles_fit(expert_stack("int8", 64, 344))   # the shipped model's width
    assert not platform.pallas_tiles_fit(expert_stack("int8", 344, 64))


def test_official_tree_refuses_the_kernel_naming_what_it_takes():
    w = QuantizedWeight8bit(weight=np.zeros((E, 8, 8), np.int8), scales=np.ones((E, 1, 8), np.float32))
    x, gates, chosen = moe_inputs(2)
    with pytest.raises(ValueError, match="'pallas' takes the compute layout"):
        experts.moe(x[:, :8], gates, chosen, (w, w, w), jnp.float32, experts.PALLAS)


def test_kernel_lowers_through_triton_for_gpus():
    # Lowering for CUDA needs no GPU: this checks that every operation of the kernel has a
    # Triton lowering at a decode step's shapes (a GPU session then compiles and times it).
    w = expert_stack("int8", 512, 256)
    rows, sizes, row_expert = sorted_rows([3, 0, 9, 2, 0, 0, 1, 1], 512)

    def step(rows, w, sizes, layer):
        return ragged.pallas_ragged_linear(rows, w[layer], sizes, None, jnp.bfloat16, interpret=False)

    lowered = jax.jit(step).trace(rows, w, sizes, jnp.int32(1)).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


# ---- the whole model through the kernel --------------------------------------------------------

@functools.lru_cache(maxsize=None)
def logits_fn(path: str, dtype: str, options: ComputeOptions):
    model = grok1.load(path, dtype=dtype, progress=False)
    return model, jax.jit(transformed(model.config, model.dtype, options).apply)


def model_logits(path: str, dtype: str, options: ComputeOptions, tokens: list[list[int]]) -> np.ndarray:
    """Logits through the kernel (PALLAS) or else through XLA's paths, on any backend."""
    model, forward = logits_fn(str(path), dtype, options)
    with contextlib.nullcontext() if options == PALLAS else xla_paths():
        return np.asarray(forward(model.params, jnp.asarray(tokens))[0], np.float32)


def require_whole_tiles(model: grok1.Model) -> None:
    """Compiled (on a GPU), the kernel takes experts in whole Triton tiles; interpreted, any."""
    stack = model.params["transformer/decoder_layers/moe/linear"]["w"]
    if not ragged.pallas_interpret() and not platform.pallas_tiles_fit(stack):
        pytest.skip(f"experts {stack.shape[-2:]} are not in whole Triton tiles (the GPU keeps XLA's path)")


def test_shipped_model_logits_through_the_kernel_equal_the_xla_path():
    from conftest import REPO
    tokens = np.random.default_rng(0).integers(3, 500, (2, 12)).tolist()
    path = REPO / "checkpoints" / "small"
    require_whole_tiles(logits_fn(str(path), "float32", PALLAS)[0])
    got = model_logits(path, "float32", PALLAS, tokens)
    want = model_logits(path, "float32", ComputeOptions(), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def golden_batch(golden) -> list[list[int]]:
    """The golden prompts as one batch, right-padded with the pad token (one compile)."""
    longest = max(map(len, golden.prompts))
    return [p + [0] * (longest - len(p)) for p in golden.prompts]


def test_two_layer_golden_logits_through_the_kernel_within_0_03_in_float32(two_layer):
    require_whole_tiles(logits_fn(str(two_layer.path), "float32", PALLAS)[0])
    got = model_logits(two_layer.path, "float32", PALLAS, golden_batch(two_layer))
    for row, (prompt, reference) in enumerate(zip(two_layer.prompts, two_layer.logits)):
        assert np.abs(got[row, :len(prompt)] - reference).max() <= 0.03


def test_twelve_layer_golden_logits_through_the_kernel_track_the_xla_path_in_bfloat16(twelve_layer):
    # Its experts (128 -> 176) are whole Triton tiles: on a GPU this runs the compiled kernel.
    golden = twelve_layer
    require_whole_tiles(logits_fn(str(golden.path), "bfloat16", PALLAS)[0])
    got = model_logits(golden.path, "bfloat16", PALLAS, golden_batch(golden))
    want = model_logits(golden.path, "bfloat16", ComputeOptions(), golden_batch(golden))
    for row, prompt in enumerate(golden.prompts):
        assert np.abs(got[row, :len(prompt)] - want[row, :len(prompt)]).max() <= 0.02 * np.abs(want).max()
