"""Host buffers that XLA:CPU takes over as device arrays without a copy (checkpoint reads and the
one-device stacked weights are written straight into them)."""

from __future__ import annotations

import math
import mmap
from typing import Any

import numpy as np

# jax's CPU client adopts (does not copy) host buffers with this alignment.
_ALIGNMENT = 64
# Above this size a buffer is its own anonymous mapping: page aligned, and without the huge-page
# advice numpy gives large arrays, whose compaction stalls made fresh buffers 2x slower to fill.
_MAPPED_BYTES = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised host array aligned for XLA:CPU, which then takes it over without a copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _MAPPED_BYTES:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)
