"""Native CPU kernels, called from jitted code through the XLA FFI (grok1/kernels/platform.py
says when).

- `rows_times` (cpu_products.cc, beside this file): a few rows times a chunked int8 or bfloat16 weight.
  XLA:CPU streams such a weight at memory bandwidth only in a one-row product, so a few rows ran
  as one-row products, each reading the weight again; the kernel multiplies all rows that use one
  weight in one pass over it, on all cores.
- `cached_attention` (cpu_attention.cc): a decode step's attention over one layer of the
  stacked KV cache, read in place (XLA:CPU copies the layer into another order first, every
  layer of every step) and only as far as the queries may see.

    from grok1.kernels import native
    if native.available():
        y = native.rows_times(x, index, w.values, w.scales)   # x [P, n_in] -> y float32 [P, O]

The sources are compiled with g++ on first use into a cache folder (GROK1_NATIVE_CACHE, else
~/.cache/grok1/native), keyed by the sources, the compiler and its flags, the jax version and the
CPU's flags, and loaded with ctypes. `available()` says whether that worked (never raises);
`unavailable_reason()` says why not. GROK1_NATIVE=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(pathlib.Path(__file__).with_name(name)
                for name in ("cpu_products.cc", "cpu_attention.cc"))
HEADERS = (pathlib.Path(__file__).with_name("cpu_common.h"),)
TARGET_SCALED = "grok1_rows_times_scaled"
TARGET_UNSCALED = "grok1_rows_times_unscaled"
TARGET_ATTENTION = "grok1_cached_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread",
         "-fvisibility=hidden", "-fno-math-errno")

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": None, "library": None, "path": None}


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept: $GROK1_NATIVE_CACHE, else ~/.cache/grok1/native."""
    return pathlib.Path(os.environ.get("GROK1_NATIVE_CACHE")
                        or pathlib.Path.home() / ".cache" / "grok1" / "native")


def _cpu_flags() -> str:
    """The first `flags` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str, cpu_flags: str) -> pathlib.Path:
    """The cached library's path: its name carries a hash of everything the build depends on."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), repr(FLAGS).encode(),
                 compiler.encode(), repr(version).encode(), jax.__version__.encode(),
                 jax.ffi.include_dir().encode(), cpu_flags.encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"grok1_cpu_products-{key.hexdigest()[:20]}.so"


def _build(compiler: str, path: pathlib.Path) -> None:
    """Compiles SOURCES to `path` through a temporary file in the same folder, renamed into place
    (a reader never sees a half-written library)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    """Builds (if not cached), loads and registers the kernels; records why not on failure."""
    if os.environ.get("GROK1_NATIVE", "1") == "0":
        raise RuntimeError("turned off by GROK1_NATIVE=0")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"needs Linux on x86-64, this is {platform.system()} {platform.machine()}")
    flags = _cpu_flags()
    missing = [f for f in ("avx2", "fma") if f not in flags.split()]
    if missing:
        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    path = library_path(compiler, flags)
    if not path.exists():
        # A pause of several seconds, once per machine: say why, on stderr (a terminal or a log
        # alike) and on a line of its own; run.py builds the kernels before any text starts.
        print(f"grok1: compiling the native CPU kernels into {path.parent} (once)", file=sys.stderr,
              flush=True)
        _build(compiler, path)
    library = ctypes.CDLL(str(path))
    if library.grok1_native_simd() != 1:
        raise RuntimeError(f"{path} was built without AVX2/FMA")
    jax.ffi.register_ffi_target(TARGET_SCALED, jax.ffi.pycapsule(library.Grok1RowsTimesScaled),
                                platform="cpu")
    jax.ffi.register_ffi_target(TARGET_UNSCALED, jax.ffi.pycapsule(library.Grok1RowsTimesUnscaled),
                                platform="cpu")
    jax.ffi.register_ffi_target(TARGET_ATTENTION, jax.ffi.pycapsule(library.Grok1CachedAttention),
                                platform="cpu")
    _state.update(library=library, path=path)


def available() -> bool:
    """Whether the kernels are built, loaded and registered (once per process; never raises)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _load()
                _state["ok"] = True
            except Exception as error:  # noqa: BLE001 - any failure means "not available"
                _state["reason"] = f"{type(error).__name__}: {error}"
        return _state["ok"]


def unavailable_reason() -> Optional[str]:
    """Why `available()` is False (None when it is True or was not asked yet), for a log line."""
    return _state["reason"]


def rows_times(x: jax.Array, index: jax.Array, values: jax.Array,
               scales: Optional[jax.Array] = None, threads: int = 0) -> jax.Array:
    """y float32 [P, O]: each row x[p] (float32 [P, n_in]) times stack entry index[p] (int32 [P])
    of a chunked weight `values` [S, C, O, R] (int8 or bfloat16, n_in = C * R, chunk c holding
    inputs c*R .. c*R+R-1 as [O, R]), with block `scales` [S, B, O] (bfloat16 or float32) when
    given. Rows sharing an index share one pass over that weight. Usable inside jit, scan and
    while loops; runs on CPU only (call `available()` first). Pass the whole stack and an index
    rather than a slice of it: a slice is copied before the call. `threads` > 0 caps the threads
    it runs on (0: as many as the cores and XLA's thread pool allow)."""
    if not available():
        raise RuntimeError(f"grok1 native kernel unavailable: {unavailable_reason()}")
    x = jnp.asarray(x, jnp.float32)
    index = jnp.asarray(index, jnp.int32)
    if x.ndim != 2:
        raise ValueError(f"x must be [P, n_in], got shape {x.shape}")
    if index.shape != x.shape[:1]:
        raise ValueError(f"index must be [P] = [{x.shape[0]}], got shape {index.shape}")
    if values.ndim != 4 or jnp.dtype(values.dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"values must be int8 or bfloat16 [S, C, O, R], got {values.dtype} {values.shape}")
    stack, chunks, n_out, run = values.shape
    if chunks * run != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} inputs per row, values {values.shape} hold "
                         f"C * R = {chunks * run}")
    operands = [x, index, values]
    if scales is not None:
        if (scales.ndim != 3 or scales.shape[0] != stack or scales.shape[2] != n_out
                or jnp.dtype(scales.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))):
            raise ValueError(f"scales must be float32 or bfloat16 [S, B, O] = [{stack}, B, {n_out}], "
                             f"got {scales.dtype} {scales.shape}")
        blocks = scales.shape[1]
        if blocks < 1 or x.shape[1] % blocks or (x.shape[1] // blocks) % run:
            raise ValueError(f"each chunk of {run} inputs must lie inside one of {blocks} scale "
                             f"blocks of {x.shape[1]} inputs")
        operands.append(scales)
    target = TARGET_SCALED if scales is not None else TARGET_UNSCALED
    out = jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands, threads=np.int64(threads))


def reference(x: np.ndarray, index: np.ndarray, values: np.ndarray,
              scales: Optional[np.ndarray] = None) -> np.ndarray:
    """`rows_times` in numpy float64 (dequantise, then dot): the tests' and benchmarks' check."""
    x = np.asarray(x, np.float64)
    w = np.asarray(np.asarray(values).astype(np.float32), np.float64)        # [S, C, O, R]
    stack, chunks, n_out, run = w.shape
    if scales is not None:
        s = np.asarray(np.asarray(scales).astype(np.float32), np.float64)   # [S, B, O]
        block = (np.arange(chunks) * run) // (chunks * run // s.shape[1])
        w = w * s[:, block, :, None]
    dense = np.transpose(w, (0, 2, 1, 3)).reshape(stack, n_out, chunks * run)   # [S, O, n_in]
    return np.einsum("pi,poi->po", x, dense[np.asarray(index)])


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, layer: jax.Array,
                     mask: jax.Array, multiplier: float, cap: float, masked_logit: float,
                     threads: int = 0) -> jax.Array:
    """Attention of queries q [B, T, N, G, K] over layer `layer` of the stacked cache `keys`,
    `values` [L, B, S, N, K] (float32 or bfloat16) -> float32 [B, T, N, G, K]: softmax over s of
    cap * tanh(multiplier * q.k[s] / cap), `masked_logit` where mask [B, T, S] is False, times
    the values (cpu_attention.cc). Reads the cache in place: pass the whole stack.
    `threads` as for `rows_times`."""
    if not available():
        raise RuntimeError(f"grok1 native kernel unavailable: {unavailable_reason()}")
    q = jnp.asarray(q, jnp.float32)
    if q.ndim != 5 or keys.ndim != 5 or keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(f"q must be [B, T, N, G, K] and keys, values alike [L, B, S, N, K], got "
                         f"{q.shape}, {keys.dtype} {keys.shape}, {values.dtype} {values.shape}")
    B, T, N, G, K = q.shape
    if (keys.shape[1], keys.shape[3], keys.shape[4]) != (B, N, K):
        raise ValueError(f"q {q.shape} does not match the cache {keys.shape}")
    if jnp.dtype(keys.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"the cache must be float32 or bfloat16, got {keys.dtype}")
    if mask.shape != (B, T, keys.shape[2]):
        raise ValueError(f"mask must be [B, T, S] = {(B, T, keys.shape[2])}, got {mask.shape}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET_ATTENTION, out, vmap_method="sequential")(
        q, keys, values, jnp.asarray(layer, jnp.int32), jnp.asarray(mask, bool),
        multiplier=np.float32(multiplier), cap=np.float32(cap), masked_logit=np.float32(masked_logit),
        threads=np.int64(threads))


def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, layer: int,
                        mask: np.ndarray, multiplier: float, cap: float, masked_logit: float
                        ) -> np.ndarray:
    """`cached_attention` in numpy float64: the tests' check."""
    q = np.asarray(q, np.float64)
    k = np.asarray(np.asarray(keys[layer]).astype(np.float32), np.float64)     # [B, S, N, K]
    v = np.asarray(np.asarray(values[layer]).astype(np.float32), np.float64)
    logits = np.einsum("btngk,bsnk->btngs", q, k) * multiplier
    logits = np.where(np.asarray(mask)[:, :, None, None, :], cap * np.tanh(logits / cap), masked_logit)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("btngs,bsnk->btngk", weights, v)
