"""Loading a checkpoint onto devices: validated first (files, shapes, dtypes, and whether the
parameters fit the devices and host memory), then read by a few threads, each tensor straight into
its final sharding over the mesh (reading only what this process's devices hold), or handed in
pieces to a `place` callback (the one-device stacked layout, grok1/weights/stacking.py)."""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from grok1.checkpoint.errors import CheckpointError
from grok1.checkpoint.files import TensorSpec, checkpoint_dir, check_tensor
from grok1.checkpoint.pickle_scan import ArrayRef
from grok1.checkpoint.reader import (CheckedTensor, Located, _normalise, _rows_reader, _unpickle,
                                     check_checkpoint, read_box)
from grok1.config import ModelConfig
from grok1.runtime.progress import Progress
from grok1.weights.placement import param_sharding
from grok1.weights.quant import QuantizedWeight8bit


def _arrays(located: Located) -> list[ArrayRef]:
    return [located.weight, located.scales] if isinstance(located, QuantizedWeight8bit) else [located]


def _shardings(located: Any, sharding: Any) -> list[Any]:
    return [sharding.weight, sharding.scales] if isinstance(located, QuantizedWeight8bit) else [sharding]


def host_available_bytes() -> int:
    """Host RAM that can still be allocated (psutil's `available`)."""
    import psutil
    return int(psutil.virtual_memory().available)


def device_available_bytes(device: Any) -> Optional[int]:
    """Free memory of an accelerator (bytes_limit - bytes_in_use), None when it does not say."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def estimate_device_bytes(checked: Sequence[CheckedTensor], shardings: Sequence[Any]) -> dict[Any, int]:
    """Bytes of parameters each local device will hold once loaded (parameters keep their stored
    dtypes: int8 weights, bf16/f32 scales, embeddings and norms)."""
    need: dict[Any, int] = {}
    for entry, sharding in zip(checked, shardings):
        if entry.located is None:  # unusual layout: the file's bytes, split like the weight
            parts = [(entry.spec.shape, sharding, entry.file_bytes / max(1, math.prod(entry.spec.shape)))]
        else:
            parts = [(ref.shape, s, ref.dtype.itemsize)
                     for ref, s in zip(_arrays(entry.located), _shardings(entry.located, sharding))]
        for shape, s, itemsize in parts:
            shard = int(math.prod(s.shard_shape(shape)) * itemsize)
            for device in s.addressable_devices:
                need[device] = need.get(device, 0) + shard
    return need


def check_memory(ckpt: str, checked: Sequence[CheckedTensor], shardings: Sequence[Any],
                 in_flight_bytes: int) -> None:
    """Refuse (CheckpointError: needed vs available) when the parameters cannot fit the devices,
    or host RAM cannot hold the CPU devices' share plus the tensors being read."""
    need = estimate_device_bytes(checked, shardings)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    host_need = in_flight_bytes
    for device, nbytes in sorted(need.items(), key=lambda kv: str(kv[0])):
        if device.platform == "cpu":
            host_need += nbytes
            continue
        available = device_available_bytes(device)
        if available is not None and nbytes > available:
            raise CheckpointError(
                f"{ckpt}: the parameters need {gb(nbytes)} on {device} but only {gb(available)} is "
                f"free there; use a mesh over more devices or devices with more memory")
    available = host_available_bytes()
    if host_need > available:
        cpu = sum(n for d, n in need.items() if d.platform == "cpu")
        raise CheckpointError(
            f"{ckpt}: loading needs {gb(host_need)} of host RAM ({gb(cpu)} of parameters on CPU "
            f"devices + {gb(in_flight_bytes)} for tensors being read) but only {gb(available)} is "
            f"available")


class _ShapeOnly:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _sharding_for(mesh: Any, spec: TensorSpec, value: Any) -> Any:
    """The final sharding of a tensor: from the mesh's table, or the first device without a mesh."""
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        quantized = isinstance(value, QuantizedWeight8bit)
        return QuantizedWeight8bit(weight=single, scales=single) if quantized else single
    return param_sharding(mesh, spec.module, spec.param, value)


def _bounding_box(indices: Iterable[tuple[slice, ...]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    boxes = [_normalise(index, shape) for index in indices]
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes))
                 for i in range(len(shape)))


def _array_from(source: ArrayRef | np.ndarray, sharding: Any) -> Any:
    """A jax.Array with `sharding`, reading from the file only the part this process's devices
    hold (one host buffer, which each device's shard slices; with one device it becomes the
    device array without a copy on CPU)."""
    shape = tuple(source.shape)
    box = _bounding_box(sharding.addressable_devices_indices_map(shape).values(), shape)
    host = read_box(source, box) if isinstance(source, ArrayRef) else source[box]

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        return host[tuple(slice(s.start - b.start, s.stop - b.start)
                          for s, b in zip(_normalise(index, shape), box))]

    return jax.make_array_from_callback(shape, sharding, shard)


def _load_one(entry: CheckedTensor, mesh: Any) -> Any:
    """One tensor on its devices, transfers finished (so its host buffer is free when copied)."""
    value = entry.located
    if value is None:
        value = _unpickle(entry.path)
        check_tensor(value, entry.spec, entry.path)
    sharding = _sharding_for(mesh, entry.spec, value)
    if isinstance(value, QuantizedWeight8bit):
        placed = QuantizedWeight8bit(weight=_array_from(value.weight, sharding.weight),
                                     scales=_array_from(value.scales, sharding.scales))
    else:
        placed = _array_from(value, sharding)
    return jax.block_until_ready(placed)


def _load_in_parallel(checked: Sequence[CheckedTensor], work: Callable[[CheckedTensor], Any],
                      workers: int, progress: Optional[bool]) -> dict:
    """The params dict of `work(tensor)` for every tensor, on `workers` threads with at most
    `workers` tensors in flight (so in host memory)."""
    params: dict[str, dict[str, Any]] = {}
    todo = iter(checked)
    total = sum(e.file_bytes for e in checked)
    # A bar only ever goes to a terminal (so True means "if stderr is one"); False: none.
    with Progress(len(checked), total, enabled=None if progress is not False else False) as bar, \
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckpt") as pool:
        pending: dict[concurrent.futures.Future, CheckedTensor] = {}
        while True:
            while len(pending) < workers and (entry := next(todo, None)) is not None:
                pending[pool.submit(work, entry)] = entry
            if not pending:
                return params
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                entry = pending.pop(future)
                params.setdefault(entry.spec.module, {})[entry.spec.param] = future.result()
                bar.update(entry.file_bytes)


DEFAULT_WORKERS = 4


def load_params(path: str | os.PathLike, config: ModelConfig,
                place: Optional[Callable[[TensorSpec, Any], Any]] = None, *,
                mesh: Any = None, progress: Optional[bool] = None, workers: int = DEFAULT_WORKERS,
                memory_check: bool = True) -> dict:
    """The Haiku params dict {module: {param: jax.Array or QuantizedWeight8bit}}.

    The whole checkpoint is validated first (files, sizes, globals, shapes, dtypes, and whether the
    parameters fit the devices), then `workers` threads read tensors, each straight into its final
    sharding over `mesh` (None: the first device), reading only what this process's devices hold.
    At most `workers` tensors are in host memory at once. `place(spec, read)`, when given,
    replaces the placement: `read(rows)` gives the tensor as numpy, or the slice `rows` of its
    first axis (of weight and scales alike for a QuantizedWeight8bit), each read from the file as
    asked, so a tensor can be taken in pieces. `progress`: a bar (tensors, GB,
    GB/s, ETA) when stderr is a terminal, unless False. The memory check assumes the tensors end
    up as `mesh` (or one device) would hold them, `place` or not.
    """
    ckpt = checkpoint_dir(path)
    checked = check_checkpoint(ckpt, config)
    if memory_check:
        shardings = [_sharding_for(mesh, e.spec, e.located if e.located is not None
                                   else _ShapeOnly(e.spec.shape)) for e in checked]
        largest = max(e.file_bytes for e in checked)
        check_memory(ckpt, checked, shardings, in_flight_bytes=workers * largest)
    if place is not None:
        def work(entry: CheckedTensor) -> Any:
            return place(entry.spec, _rows_reader(entry))
    else:
        def work(entry: CheckedTensor) -> Any:
            return _load_one(entry, mesh)
    return _load_in_parallel(checked, work, workers, progress)
