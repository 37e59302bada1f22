"""grok1.runtime.compiling: the XLA options grok1's steps compile with."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import grok1
from grok1.generation import steps
from grok1.generation.runner import Runner
from grok1.runtime import compiling
from grok1.runtime.compiling import CPU_OPTIONS, compiler_options

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "small"


def test_cpu_steps_compile_without_the_fusion_emitters_on_this_xla():
    assert compiler_options("cpu") == CPU_OPTIONS == {"xla_cpu_use_fusion_emitters": False}


def test_other_backends_compile_with_xla_defaults():
    assert compiler_options("gpu") == {} and compiler_options("tpu") == {}


def test_an_option_this_xla_does_not_know_falls_back_to_its_defaults(monkeypatch):
    monkeypatch.setattr(compiling, "CPU_OPTIONS", {"xla_cpu_no_such_option": True})
    compiler_options.cache_clear()
    try:
        assert compiler_options("cpu") == {}
    finally:
        compiler_options.cache_clear()


def test_jit_gives_the_results_of_jax_jit():
    f = lambda x: jax.nn.gelu(x) * jnp.tanh(x / 30) * 30  # noqa: E731
    x = jnp.linspace(-50, 50, 1001, dtype=jnp.float32)
    assert jnp.array_equal(compiling.jit(f)(x), jax.jit(f)(x))


def test_the_decode_step_and_the_forward_compile_with_grok1s_options(monkeypatch):
    """An option XLA refuses fails the compile: so these compiles do receive grok1's options."""
    model = grok1.load(SHIPPED, progress=False)
    monkeypatch.setattr(compiling, "compiler_options", lambda backend: {"xla_cpu_no_such_option": True})
    runner = Runner(model, slots=1)
    state = steps.empty_state(model.config, model.dtype, 1)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        runner.decode.lower(model.params, state).compile()
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        model.logits([[1, 2, 3]])


def test_each_backend_compile_hands_the_compilers_freed_memory_back(monkeypatch):
    x, trims = jnp.arange(7.0).block_until_ready(), []
    monkeypatch.setattr(compiling, "heap_trimmer", lambda: trims.append)
    compiling.jit(lambda x: x * 3 + 1)(x)
    assert trims == [0]


def test_a_program_from_jaxs_cache_trims_nothing(monkeypatch):
    f, x, y = compiling.jit(lambda x: x * 5 - 2), jnp.arange(5.0), jnp.ones(5)
    f(x)
    trims = []
    monkeypatch.setattr(compiling, "heap_trimmer", lambda: trims.append)
    f(y)
    assert trims == []


def test_a_c_library_without_malloc_trim_compiles_as_before(monkeypatch):
    monkeypatch.setattr(compiling, "heap_trimmer", lambda: None)
    x = jnp.arange(9.0)
    assert jnp.array_equal(compiling.jit(lambda x: x / 3)(x), x / 3)
