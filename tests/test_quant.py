"""int8 weights with block scales: quantisation error, dequantisation and the fused matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.kernels import platform
from grok1.kernels.xla import quantized_matmul as matmul
from grok1.weights.quant import QuantizedWeight8bit, quantize


@pytest.mark.parametrize("blocks", [1, 2, 8])
def test_quantize_error_is_within_half_a_scale(blocks):
    w = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    q = quantize(w, num_blocks=blocks)
    assert q.weight.dtype == np.int8 and q.scales.shape == (blocks, 24)
    step = np.repeat(q.scales, 64 // blocks, axis=0)
    assert np.all(np.abs(q.dequantize(np.float32) - w) <= step / 2 + 1e-7)


@pytest.mark.parametrize("blocks", [1, 4])
def test_matmul_with_int8_weight_equals_matmul_with_its_dequantised_weight(blocks):
    rng = np.random.default_rng(1)
    w = quantize(rng.normal(size=(32, 16)), num_blocks=blocks)
    x = rng.normal(size=(2, 3, 32)).astype(np.float32)
    got = matmul(jnp.asarray(x), QuantizedWeight8bit(jnp.asarray(w.weight), jnp.asarray(w.scales)))
    np.testing.assert_allclose(np.asarray(got), x @ w.dequantize(np.float32), rtol=1e-5, atol=1e-5)


def test_matmul_keeps_the_batch_axes():
    w = quantize(np.ones((8, 4)), num_blocks=2)
    out = matmul(jnp.ones((5, 7, 8)), QuantizedWeight8bit(jnp.asarray(w.weight), jnp.asarray(w.scales)))
    assert out.shape == (5, 7, 4)


def test_dequantize_scales_each_block_of_the_input_axis():
    weight = np.ones((4, 2), np.int8)
    scales = np.asarray([[1.0, 2.0], [10.0, 20.0]], np.float32)
    w = QuantizedWeight8bit(weight, scales).dequantize(np.float32)
    np.testing.assert_array_equal(w, [[1, 2], [1, 2], [10, 20], [10, 20]])


def test_quantize_refuses_blocks_that_do_not_divide_the_input_axis():
    with pytest.raises(ValueError, match="num_blocks must be a positive divisor of the input axis"):
        quantize(np.ones((10, 3)), num_blocks=3)


def test_float32_products_ask_for_full_float32_on_accelerators_only(monkeypatch):
    # XLA:GPU multiplies float32 as TensorFloat-32 unless told otherwise; CPUs need no telling.
    assert platform.precision(jnp.float32) == jax.lax.Precision.DEFAULT
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "gpu")
    assert platform.precision(jnp.float32) == jax.lax.Precision.HIGHEST
    assert platform.precision(jnp.bfloat16) == jax.lax.Precision.DEFAULT
