"""The official Grok-1 checkpoint format (`ckpt-0/tensor{i:05d}_{host:03d}` pickles): read and write.

Tensor i is the i-th (module path, param name) of the parameter tree flattened the way
`jax.tree_util` flattens a Haiku params dict: module paths sorted as strings, then param names.
The order is derived from the model code, never from an index file (real checkpoints carry none).

Each file is unpickled by an unpickler that only resolves the few globals the format needs, so a
downloaded file cannot run code; anything else is refused with the file and the global named.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from typing import Any, Callable, Iterator, Optional

import ml_dtypes
import numpy as np

from grok1.config import ModelConfig
from grok1.quant import QuantizedWeight8bit, check_block_layout

CKPT_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
FLOAT_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or parameter at fault."""


def tensor_filename(index: int, host: int = 0) -> str:
    return f"tensor{index:05d}_{host:03d}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint file: which parameter it holds and the shape the model expects."""

    index: int
    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def filename(self) -> str:
        return tensor_filename(self.index)

    @property
    def name(self) -> str:
        return f"{self.module}/{self.param}"

    @property
    def quantized(self) -> bool:
        """Linear weights are int8 in the release; embeddings, norms and the router are not."""
        return self.param == "w" and not self.module.endswith("/router")


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in file order (sorted module paths, then param names)."""
    from grok1.model import param_shapes  # model imports nothing from here; keep import light

    shapes = param_shapes(config)
    specs = []
    for module in sorted(shapes):
        for param in sorted(shapes[module]):
            specs.append(TensorSpec(len(specs), module, param, tuple(shapes[module][param].shape)))
    return specs


# ---- reading ----------------------------------------------------------------------------------

class _PickledQuantizedWeight:
    """What `__main__.QuantizedWeight8bit` unpickles to: a bare record filled by BUILD."""


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("ml_dtypes", "bfloat16"): lambda: ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): lambda: _PickledQuantizedWeight,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise CheckpointError(f"{self.source}: refused pickle global {module}.{name} "
                                  f"(a checkpoint may only reference {allowed})")
        return resolve()


def read_tensor(path: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Unpickle one checkpoint file safely: a numpy array or a QuantizedWeight8bit of numpy arrays."""
    path = os.fspath(path)
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            obj = _RestrictedUnpickler(f, path).load()
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, _PickledQuantizedWeight):
        weight, scales = getattr(obj, "weight", None), getattr(obj, "scales", None)
        if not isinstance(weight, np.ndarray) or not isinstance(scales, np.ndarray):
            raise CheckpointError(f"{path}: QuantizedWeight8bit without numpy 'weight' and 'scales'")
        return QuantizedWeight8bit(weight=weight, scales=scales)
    if not isinstance(obj, np.ndarray):
        raise CheckpointError(f"{path}: expected a numpy array or QuantizedWeight8bit, "
                              f"found {type(obj).__name__}")
    return obj


def check_tensor(value: np.ndarray | QuantizedWeight8bit, spec: TensorSpec, path: str) -> None:
    """Raise CheckpointError naming the parameter and file when `value` does not fit `spec`."""
    where = f"parameter {spec.name} ({path})"
    if tuple(value.shape) != spec.shape:
        raise CheckpointError(f"{where}: expected shape {spec.shape}, found {tuple(value.shape)}")
    if isinstance(value, QuantizedWeight8bit):
        if value.weight.dtype != np.int8:
            raise CheckpointError(f"{where}: expected int8 quantized weight, found {value.weight.dtype}")
        if value.scales.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: expected float scales (bfloat16, float16, float32), "
                                  f"found {value.scales.dtype}")
        problem = check_block_layout(value.shape, value.scales.shape)
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    elif value.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected dtype bfloat16, float16 or float32, found {value.dtype}")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """`path/ckpt-0` (or `path` itself when it is the ckpt-0 folder), with clear errors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    ckpt = os.path.join(path, CKPT_DIR)
    if os.path.isdir(ckpt):
        return ckpt
    if os.path.isfile(os.path.join(path, tensor_filename(0))):
        return path
    raise CheckpointError(f"{path} holds no {CKPT_DIR}/ folder with {tensor_filename(0)}")


def iter_tensors(ckpt: str, config: ModelConfig) -> Iterator[tuple[TensorSpec, np.ndarray | QuantizedWeight8bit]]:
    """(spec, value) for every tensor, checked, reading one file at a time."""
    specs = tensor_specs(config)
    missing = [s.filename for s in specs if not os.path.isfile(os.path.join(ckpt, s.filename))]
    if missing:
        raise CheckpointError(
            f"missing checkpoint file {os.path.join(ckpt, missing[0])} ({len(missing)} of the "
            f"{len(specs)} files that num_layers={config.num_layers} expects are missing)")
    extra = os.path.join(ckpt, tensor_filename(len(specs)))
    if os.path.exists(extra):
        raise CheckpointError(f"{ckpt} holds more tensors than config num_layers={config.num_layers} "
                              f"expects ({len(specs)}): found {extra}")
    for spec in specs:
        path = os.path.join(ckpt, spec.filename)
        value = read_tensor(path)
        check_tensor(value, spec, path)
        yield spec, value


def load_params(path: str | os.PathLike, config: ModelConfig,
                place: Callable[[TensorSpec, Any], Any] = lambda spec, value: value) -> dict:
    """The Haiku params dict {module: {param: value}}, each tensor passed through `place`
    (e.g. onto devices) as soon as it is read, so at most one tensor is held in host memory."""
    params: dict[str, dict[str, Any]] = {}
    for spec, value in iter_tensors(checkpoint_dir(path), config):
        params.setdefault(spec.module, {})[spec.param] = place(spec, value)
    return params


# ---- writing ----------------------------------------------------------------------------------

class _OfficialQuantizedWeight8bit:
    """Pickled as `__main__.QuantizedWeight8bit` with `weight` and `scales`, like the release."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight = weight
        self.scales = scales


# Names as numpy 1.x and the official code resolve them, whatever numpy writes today.
_WRITE_ALIASES = {
    _reconstruct(): ("numpy.core.multiarray", "_reconstruct"),
    _OfficialQuantizedWeight8bit: ("__main__", "QuantizedWeight8bit"),
}


class _OfficialPickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        alias = _WRITE_ALIASES.get(obj)
        if alias is None:
            return super().save_global(obj, name)
        self.save(alias[0])
        self.save(alias[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def write_tensor(path: str | os.PathLike, value: Any) -> None:
    """Pickle one tensor (numpy array or QuantizedWeight8bit) in the official layout."""
    if isinstance(value, QuantizedWeight8bit):
        obj = _OfficialQuantizedWeight8bit(np.asarray(value.weight), np.asarray(value.scales))
    else:
        obj = np.asarray(value)
    with open(path, "wb") as f:
        _OfficialPickler(f, protocol=4).dump(obj)


def save(params: dict, path: str | os.PathLike, config: ModelConfig) -> None:
    """Write `params` as `path/ckpt-0/` plus `path/config.json`, atomically.

    Everything goes to a temporary folder beside `path` first and is renamed into place at the
    end, so an interrupted save never leaves a half-written checkpoint behind.
    """
    path = os.fspath(path)
    specs = tensor_specs(config)
    for spec in specs:
        value = params.get(spec.module, {}).get(spec.param)
        if value is None:
            raise CheckpointError(f"params lack parameter {spec.name} that config expects")
        check_tensor(_as_numpy(value), spec, "params")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, CKPT_DIR))
        for spec in specs:
            write_tensor(os.path.join(tmp, CKPT_DIR, spec.filename),
                         _as_numpy(params[spec.module][spec.param]))
        config.to_json(os.path.join(tmp, CONFIG_FILE))
        if os.path.isdir(path):  # keep anything else the folder holds (e.g. tokenizer.model)
            for name in (CKPT_DIR, CONFIG_FILE):
                _replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: str, target: str) -> None:
    """Move `new` over `target` (file or folder); the old one is removed only once `new` is in."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(new, target)
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)


def _as_numpy(value: Any) -> np.ndarray | QuantizedWeight8bit:
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=np.asarray(value.weight), scales=np.asarray(value.scales))
    return np.asarray(value)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """`config.json` beside `ckpt-0/`, with a clear error when absent."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} holds no {CONFIG_FILE} (the model config beside {CKPT_DIR}/)")
    return ModelConfig.from_json(file)


