"""JAX's persistent compilation cache: where it lives, how to move or switch it off, and that a
second run.py finds its compiled steps there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from grok1.runtime import compile_cache


def test_default_folder_is_grok1_jax_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.cache_dir() == str(tmp_path / ".cache" / "grok1" / "jax")


def test_xdg_cache_home_moves_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == str(tmp_path / "grok1" / "jax")


def test_environment_variable_names_another_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "elsewhere"))
    assert compile_cache.cache_dir() == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_environment_variable_switches_the_cache_off(monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV_DIR, value)
    assert compile_cache.cache_dir() is None
    assert compile_cache.enable() is None


def test_an_explicit_folder_beats_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_DIR, "off")
    assert compile_cache.cache_dir(str(tmp_path)) == str(tmp_path)


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), "--temperature", "0",
                           "--max-new-tokens", "2", "--quiet", *args],
                          cwd=str(REPO), capture_output=True, text=True, timeout=300)


def test_run_py_stores_its_compiled_steps_in_the_folder_it_is_given(tmp_path):
    result = run_py("--compilation-cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    names = os.listdir(tmp_path / "cache")
    assert any(n.startswith("jit_prefill_slot") for n in names)
    assert any(n.startswith("jit_decode_steps") for n in names)


def test_run_py_rejects_a_folder_and_no_cache_together(tmp_path):
    result = run_py("--compilation-cache", str(tmp_path), "--no-compilation-cache")
    assert result.returncode == 2 and "contradict" in result.stderr


@pytest.mark.slow
def test_second_run_reaches_its_first_token_in_at_most_40_percent_of_the_first():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compile_cache as benchmark
    result = benchmark.main([])
    assert result["first_token_ratio"] <= 0.4, result
