"""Reading checkpoint files safely: each file's arrays located by its pickle's opcodes
(grok1/checkpoint/pickle_scan.py), checked against the tensor the model expects, and read
straight into aligned host buffers, whole or a box at a time (only what this process's devices
hold)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from grok1.checkpoint import pickle_scan
from grok1.checkpoint.errors import CheckpointError
from grok1.checkpoint.files import TensorSpec, check_tensor, tensor_filename, tensor_specs
from grok1.checkpoint.pickle_scan import ArrayRef, QuantizedPair
from grok1.config import ModelConfig
from grok1.runtime.buffers import aligned_empty
from grok1.weights.quant import QuantizedWeight8bit

# A located tensor: one ArrayRef, or a QuantizedWeight8bit whose weight and scales are ArrayRefs.
Located = Any


def _as_weight(value: Any) -> Any:
    """A scanned or unpickled tensor with its QuantizedPair (if any) as a QuantizedWeight8bit."""
    if isinstance(value, QuantizedPair):
        return QuantizedWeight8bit(weight=value.weight, scales=value.scales)
    return value


def locate_tensor(path: str | os.PathLike) -> Optional[Located]:
    """Where one file's arrays lie, from its pickle opcodes alone (a few hundred bytes are read).

    None when the file uses a pickle layout the scanner does not follow (`read_tensor` then
    unpickles it). Refused globals, truncation and any corruption raise CheckpointError naming
    the file before any data is read.
    """
    return _as_weight(pickle_scan.locate(path))


def _unpickle(path: str) -> np.ndarray | QuantizedWeight8bit:
    """The whole file through the restricted unpickler (after the scanner checked it)."""
    return _as_weight(pickle_scan.unpickle(path))


def _normalise(box: Optional[Sequence[slice]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    box = tuple(box or ()) + (slice(None),) * (len(shape) - len(box or ()))
    out = []
    for s, n in zip(box, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"box slices must have step 1, got {s}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _runs(shape: tuple[int, ...], itemsize: int, box: tuple[slice, ...]) -> Iterator[tuple[int, int]]:
    """(byte offset in the array, byte length) of each contiguous run of `box`, in C order."""
    lens = [s.stop - s.start for s in box]
    strides = [math.prod(shape[i + 1:]) * itemsize for i in range(len(shape))]
    k = len(shape)  # axes k.. are whole, so one run spans them and the slice of axis k-1
    while k > 0 and lens[k - 1] == shape[k - 1]:
        k -= 1
    if k == 0:
        yield 0, math.prod(shape) * itemsize
        return
    run = lens[k - 1] * strides[k - 1]
    base = sum(s.start * st for s, st in zip(box, strides))
    for outer in itertools.product(*(range(n) for n in lens[:k - 1])):
        yield base + sum(i * st for i, st in zip(outer, strides)), run


def _read_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    while buf.nbytes:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise CheckpointError(f"{path}: truncated (no data at byte {offset})")
        buf, offset = buf[n:], offset + n


_FADVISE = hasattr(os, "posix_fadvise")


def read_box(ref: ArrayRef, box: Optional[Sequence[slice]] = None) -> np.ndarray:
    """The part `box` (a slice per axis; None: all) of a located array, read from the file straight
    into a new aligned array: the only copy is the one from the page cache."""
    box = _normalise(box, ref.shape)
    out = aligned_empty(tuple(s.stop - s.start for s in box), ref.dtype)
    if out.size:
        dest = memoryview(out.reshape(-1).view(np.uint8))
        runs = list(_runs(ref.shape, ref.dtype.itemsize, box))
        with open(ref.path, "rb", buffering=0) as f:
            if _FADVISE:  # ask for the whole span at once: more I/O in flight when not cached
                start, (last, size) = runs[0][0], runs[-1]
                os.posix_fadvise(f.fileno(), ref.offset + start, last + size - start,
                                 os.POSIX_FADV_WILLNEED)
            pos = 0
            for offset, size in runs:
                _read_into(f.fileno(), dest[pos:pos + size], ref.offset + offset, ref.path)
                pos += size
    return out


def _read_located(located: Located) -> np.ndarray | QuantizedWeight8bit:
    if isinstance(located, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=read_box(located.weight), scales=read_box(located.scales))
    return read_box(located)


def _rows_reader(entry: CheckedTensor) -> Callable[[Optional[slice]], np.ndarray | QuantizedWeight8bit]:
    """`read(rows)` for `load_params`'s `place`: the tensor, or the slice `rows` of its first axis."""
    located = entry.located
    if located is None:  # an unusual layout: unpickled whole once, then sliced
        value = _unpickle(entry.path)
        check_tensor(value, entry.spec, entry.path)
        return lambda rows=None: value if rows is None else _rows_of(value, rows)

    def read(rows: Optional[slice] = None) -> np.ndarray | QuantizedWeight8bit:
        def part(ref: ArrayRef) -> np.ndarray:
            return read_box(ref, None if rows is None else (rows,))
        if isinstance(located, QuantizedWeight8bit):
            return QuantizedWeight8bit(weight=part(located.weight), scales=part(located.scales))
        return part(located)
    return read


def _rows_of(value: np.ndarray | QuantizedWeight8bit, rows: slice) -> np.ndarray | QuantizedWeight8bit:
    """Rows `rows` of the first axis of a tensor (of weight and scales alike)."""
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=value.weight[rows], scales=value.scales[rows])
    return value[rows]


def read_tensor(path: str | os.PathLike, spec: Optional[TensorSpec] = None
                ) -> np.ndarray | QuantizedWeight8bit:
    """One checkpoint file, safely: a numpy array or a QuantizedWeight8bit of numpy arrays.

    Only the allowed globals are resolved, so a downloaded file cannot run code, and whatever its
    bytes, a file that is not a tensor raises CheckpointError naming it. Plain layouts (all the
    official files) are located by their opcodes and read straight into their arrays; anything
    else goes through the restricted unpickler. With `spec`, the located arrays are checked
    against it before any array data is read.
    """
    path = os.fspath(path)
    located = locate_tensor(path)
    if located is None:
        value = _unpickle(path)
    else:
        if spec is not None:
            check_tensor(located, spec, path)
        value = _read_located(located)
    if spec is not None:
        check_tensor(value, spec, path)
    return value


@dataclasses.dataclass(frozen=True)
class CheckedTensor:
    """A checkpoint file that passed validation: located (None: unusual layout, unpickled later)."""

    spec: TensorSpec
    path: str
    file_bytes: int
    located: Optional[Located]


def check_checkpoint(ckpt: str, config: ModelConfig) -> list[CheckedTensor]:
    """Validate every file of `ckpt` against `config` before any array data is read.

    Checks that each expected file exists and no extra one does, then, from each pickle's opcodes
    alone, that it references only allowed globals, holds the expected shape and dtype, and that
    its array data lies inside the file (an unusual layout: a size check, then the restricted
    unpickler).
    """
    specs = tensor_specs(config)
    paths = [os.path.join(ckpt, s.filename) for s in specs]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(
            f"missing checkpoint file {missing[0]} ({len(missing)} of the {len(specs)} files that "
            f"config num_layers={config.num_layers} expects are missing)")
    extra = os.path.join(ckpt, tensor_filename(len(specs)))
    if os.path.exists(extra):
        raise CheckpointError(f"{ckpt} holds more tensors than config num_layers={config.num_layers} "
                              f"expects ({len(specs)}): found {extra}")
    checked = []
    for spec, path in zip(specs, paths):
        size = os.path.getsize(path)
        located = locate_tensor(path)  # exact: globals, shapes, dtypes, data inside the file
        if located is None:  # unusual layout: a size check, then the restricted unpickler
            least = math.prod(spec.shape) * (1 if spec.quantized else 2)  # int8 / 16-bit floats
            if size < least:
                raise CheckpointError(f"{path}: truncated? {size} bytes cannot hold parameter "
                                      f"{spec.name} of shape {spec.shape} (at least {least} bytes)")
        check_tensor(_unpickle(path) if located is None else located, spec, path)
        checked.append(CheckedTensor(spec, path, size, located))
    return checked


def iter_tensors(ckpt: str, config: ModelConfig
                 ) -> Iterator[tuple[TensorSpec, np.ndarray | QuantizedWeight8bit]]:
    """(spec, numpy value) for every tensor in file order, validated first, one file at a time."""
    for entry in check_checkpoint(ckpt, config):
        value = _unpickle(entry.path) if entry.located is None else _read_located(entry.located)
        check_tensor(value, entry.spec, entry.path)
        yield entry.spec, value
