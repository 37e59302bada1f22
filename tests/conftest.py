"""Shared fixtures: the golden sets and reference files from ../shared, skipped when absent (locally;
.ci/run refuses to start without them)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"
SHIPPED = REPO / "checkpoints" / "small"
REFERENCE = SHARED / "reference"
GOLDEN_SETS = ("two_layer", "twelve_layer")


def require(path: pathlib.Path) -> pathlib.Path:
    """`path`, or skip the test with the reason that ../shared does not provide it."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside the repo)")
    return path


class Golden:
    """One golden set: checkpoint folder, config, prompts and reference logits."""

    def __init__(self, name: str):
        self.name = name
        self.path = require(GOLDEN / name)
        with open(self.path / "golden.json") as f:
            self.data = json.load(f)
        self.prompts: list[list[int]] = self.data["prompts"]
        npz = np.load(self.path / "golden.npz")
        self.logits = [npz[f"logits_{i}"] for i in range(len(self.prompts))]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_in_a_temporary_folder(tmp_path_factory):
    """run.py caches compilations in ~/.cache/grok1/jax by default: the suite (and the run.py
    processes it starts, which inherit the environment) use a folder of its own instead."""
    previous = os.environ.get("GROK1_COMPILATION_CACHE")
    os.environ["GROK1_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    yield
    if previous is None:
        del os.environ["GROK1_COMPILATION_CACHE"]
    else:
        os.environ["GROK1_COMPILATION_CACHE"] = previous


@pytest.fixture(params=GOLDEN_SETS)
def golden(request) -> Golden:
    return Golden(request.param)


@pytest.fixture
def two_layer() -> Golden:
    return Golden("two_layer")


@pytest.fixture
def twelve_layer() -> Golden:
    return Golden("twelve_layer")


@pytest.fixture
def tokenizer_path() -> pathlib.Path:
    return require(REFERENCE / "tokenizer.model")


@pytest.fixture
def tensor_index_path() -> pathlib.Path:
    return require(REFERENCE / "grok1_tensor_index.json")


def run_with_devices(code: str, devices: int = 8, timeout: float = 600) -> str:
    """Run Python `code` in a subprocess with `devices` forced CPU devices; return its stdout.

    XLA_FLAGS must be set before jax is imported, hence the separate process.
    """
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def random_params(config, seed: int = 0) -> dict:
    """Float params of a config's shapes for writing test checkpoints: bf16 embeddings/norms, f32
    router and linear weights."""
    import ml_dtypes
    from grok1 import checkpoint
    rng = np.random.default_rng(seed)
    params: dict = {}
    for spec in checkpoint.tensor_specs(config):
        dtype = np.float32 if spec.quantized or spec.module.endswith("router") else ml_dtypes.bfloat16
        params.setdefault(spec.module, {})[spec.param] = rng.normal(size=spec.shape).astype(dtype)
    return params


@pytest.fixture(scope="module")
def shipped():
    """The shipped small model in float32 (skipped where checkpoints/small is absent)."""
    import grok1
    if not (SHIPPED / "ckpt-0").is_dir():
        pytest.skip("the shipped model checkpoints/small is absent")
    return grok1.load(SHIPPED, dtype="float32", progress=False)
