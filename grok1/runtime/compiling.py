"""How grok1 compiles its programs: `jit` is jax.jit with the XLA options that grok1's steps
want on the backend they run on.

On CPU, XLA's newer fusion emitters hold about 0.15 GB more while a step compiles (bench-1b:
the peak RSS of a whole session 1.30 -> 1.12 GiB, 1.7x -> 1.48x the checkpoint) for steps that
run as fast without them (decode equal, prefill 512 3-4 % slower; benchmarks/BENCHMARKS.md), so
grok1 compiles with the classic ones there. An XLA that no longer knows the option compiles with
its defaults. Other backends get XLA's defaults.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def compiler_options(backend: str) -> dict[str, Any]:
    """The options grok1 compiles with on `backend` ("cpu", "gpu", ...): those this XLA accepts."""
    if backend != "cpu":
        return {}
    try:
        one = jax.device_put(1, jax.local_devices(backend=backend)[0])
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)(one).block_until_ready()
    except Exception:  # noqa: BLE001 - an XLA without the option: its defaults
        return {}
    return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)` with `compiler_options` for the default backend."""
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend()), **kwargs)
