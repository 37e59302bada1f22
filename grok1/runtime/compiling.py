"""How grok1 compiles its programs: `jit` is jax.jit with the XLA options that grok1's steps
want on the backend they run on.

On CPU, XLA's newer fusion emitters hold about 0.15 GB more while a step compiles (bench-1b:
the peak RSS of a whole session 1.30 -> 1.12 GiB, 1.7x -> 1.48x the checkpoint) for steps that
run as fast without them (decode equal, prefill 512 3-4 % slower; benchmarks/BENCHMARKS.md), so
grok1 compiles with the classic ones there. An XLA that no longer knows the option compiles with
its defaults. Other backends get XLA's defaults.

Compiling a step allocates tens of MB of scratch that glibc keeps in its heap after the compiler
frees it; grok1 hands it back to the operating system after every compile (`malloc_trim`), so a
session's peak RSS does not grow by that much with each program it compiles (bench-1b: 1.57 ->
1.48x the checkpoint, BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any, Callable, Optional

import jax
import jax.monitoring

# The event jax records when a backend has compiled a program (not when one comes from the cache).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

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


@functools.cache
def heap_trimmer() -> Optional[Callable[[int], int]]:
    """glibc's `malloc_trim`, which returns the free memory at the top and in the middle of the C
    heap to the operating system; None on a C library without it (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def trim_heap_after_compiles(event: str, duration: float, **_: Any) -> None:
    """A jax.monitoring listener: after each backend compile, the compiler's freed scratch goes
    back to the operating system."""
    if event == BACKEND_COMPILE_EVENT and (trim := heap_trimmer()) is not None:
        trim(0)


@functools.cache
def listen_for_compiles() -> None:
    """Register `trim_heap_after_compiles` with jax, once per process."""
    jax.monitoring.register_event_duration_secs_listener(trim_heap_after_compiles)


def jit(fn: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)` with `compiler_options` for the default backend (and the heap
    trimmed after each of its compiles)."""
    listen_for_compiles()
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend()), **kwargs)
