"""The official Grok-1 checkpoint format (`ckpt-0/tensor{i:05d}_{host:03d}` pickles): read and write.

Tensor i is the i-th (module path, param name) of the parameter tree flattened the way
`jax.tree_util` flattens a Haiku params dict: module paths sorted as strings, then param names.
The order is derived from the model code, never from an index file (real checkpoints carry none).

Reading never runs code from a file. Each pickle's opcodes are first walked symbolically
(`locate_tensor`): globals are checked against the few the format needs (anything else is refused,
naming file and global) and each array's raw bytes are located (offset, shape, dtype) without being
read. Loading then reads, with a few threads, only the part of each tensor that this process's
devices hold, straight into the buffer that becomes the device array. Files in a layout the walk
does not follow go through an unpickler restricted to the same globals, and only after the walk
has checked every length in them against the file. Whatever a file's bytes, reading it either
gives a tensor or raises CheckpointError naming the file (tests/test_checkpoint_fuzz.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import mmap
import os
import pickle
import re
import shutil
import struct
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from grok1.config import ConfigError, ModelConfig
from grok1.progress import Progress
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
    return list(_tensor_specs(config))


@functools.lru_cache(maxsize=8)
def _tensor_specs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    shapes = _param_shapes(config)
    specs: list[TensorSpec] = []
    for module in sorted(shapes):
        for param in sorted(shapes[module]):
            specs.append(TensorSpec(len(specs), module, param, shapes[module][param]))
    return tuple(specs)


_LAYER = re.compile(r"(^|/)decoder_layer_0(/|$)")


def _param_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """The model's parameter shapes, tracing a one-layer model and repeating its layer: layers are
    identical, and tracing all 64 of Grok-1 would take seconds."""
    from grok1.model import param_shapes  # model imports nothing from here; keep import light

    one = param_shapes(dataclasses.replace(config, num_layers=1))
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for module, params in one.items():
        layer = {name: tuple(value.shape) for name, value in params.items()}
        if _LAYER.search(module):
            for i in range(config.num_layers):
                shapes[_LAYER.sub(rf"\g<1>decoder_layer_{i}\g<2>", module)] = layer
        else:
            shapes[module] = layer
    return shapes


# ---- reading: what a pickled array may say ----------------------------------------------------
#
# numpy pickles an array as `_reconstruct(ndarray, (0,), b"b")` then BUILD with the state
# (1, shape, dtype, fortran_order, raw_bytes), and a dtype as `dtype(kind, align, copy)` then BUILD
# with (3, byteorder, None, None, None, elsize, alignment, flags). Both readers below check these
# states against what numpy writes and make the dtypes and arrays themselves: numpy's own
# __setstate__ never sees a file's state. A corrupt one made it raise SystemError ("error return
# without exception set"), a fuzz of that reader crashed the interpreter, and with copy=False
# `numpy.dtype` returns its shared instance (np.dtype("i1", False, False) is np.dtype("i1")).

class _Corrupt(Exception):
    """A pickle that is not a checkpoint tensor as numpy writes one; the caller names the file."""


class _Unusual(Exception):
    """A well-formed pickle in a layout the scanner does not follow (e.g. a Fortran-order array);
    the restricted unpickler reads such files."""


def _short(value: Any) -> str:
    """A repr for error messages, however large the value a corrupt file made."""
    if isinstance(value, int) and abs(value) > 10 ** 30:  # repr of a huge int can even raise
        return f"a {value.bit_length()}-bit integer"
    text = repr(value) if isinstance(value, (str, bytes, int, float, bool, type(None))) \
        else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class _Marker:
    """A global that a checkpoint only names (as an argument), never calls."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NDARRAY = _Marker("numpy.ndarray")
_BFLOAT16 = _Marker("ml_dtypes.bfloat16")
_SIMPLE_KIND = re.compile(r"[biufc][1-9][0-9]?")  # what numpy writes as a dtype's kind: "f4", "i1"
_MAX_RANK = 32  # numpy's limit


def _dtype_from(kind: Any, state: Any) -> np.dtype:
    """The dtype that `dtype(kind)` + BUILD `state` describes, when it is a plain numeric one."""
    if kind is _BFLOAT16:
        base = np.dtype(ml_dtypes.bfloat16)
    elif isinstance(kind, str) and _SIMPLE_KIND.fullmatch(kind):
        try:
            base = np.dtype(kind)
        except TypeError:
            raise _Corrupt(f"unknown dtype {kind!r}") from None
    else:
        raise _Corrupt(f"unsupported dtype {_short(kind)} (checkpoints hold plain numeric dtypes)")
    if not isinstance(state, tuple) or len(state) != 8:
        raise _Corrupt(f"dtype state {_short(state)} is not the 8 fields numpy writes")
    version, order, names, fields, subarray, elsize, alignment, flags = state
    if type(version) is not int or version != 3 or order not in ("<", ">", "=", "|") \
            or (names, fields, subarray) != (None, None, None) \
            or type(elsize) is not int or elsize not in (-1, base.itemsize) \
            or type(alignment) is not int or alignment not in (-1, 1, 2, 4, 8, 16) \
            or type(flags) is not int:
        raise _Corrupt(f"dtype state of {base} is not one numpy writes")
    return base.newbyteorder(order) if order in "<>" else base


class _DtypeRecord:
    """What `numpy.dtype(kind, align, copy)` unpickles to; BUILD's state makes `.dtype`."""

    kind: Any = None
    dtype: Optional[np.dtype] = None

    def __init__(self, kind: Any, align: Any = False, copy: Any = False):
        if not isinstance(align, bool) or not isinstance(copy, bool):
            raise _Corrupt("dtype flags are not booleans")
        self.kind = kind

    def __setstate__(self, state: Any) -> None:
        self.dtype = _dtype_from(self.kind, state)


def _array_state(state: Any) -> tuple[tuple[int, ...], np.dtype, bool, Any]:
    """(shape, dtype, fortran_order, raw) of an array's BUILD state, checked; raw is unchecked."""
    if not isinstance(state, tuple) or len(state) != 5:
        raise _Corrupt(f"array state {_short(state)} is not the 5 fields numpy writes")
    version, shape, dtype, fortran, raw = state
    if type(version) is not int or version != 1:
        raise _Corrupt(f"array state version {_short(version)} (numpy writes 1)")
    if not isinstance(shape, tuple) or len(shape) > _MAX_RANK \
            or not all(type(n) is int and 0 <= n < 2 ** 63 for n in shape):
        raise _Corrupt(f"array shape is not a tuple of at most {_MAX_RANK} sizes in [0, 2**63)")
    if not isinstance(dtype, _DtypeRecord) or dtype.dtype is None:
        raise _Corrupt(f"array dtype is a {_short(dtype)}, not a dtype")
    if not isinstance(fortran, bool):
        raise _Corrupt(f"array order flag {_short(fortran)} is not a boolean")
    return shape, dtype.dtype, fortran, raw


class _ArrayRecord:
    """What `_reconstruct(ndarray, ...)` unpickles to; BUILD's state, checked, makes `.array`."""

    array: Optional[np.ndarray] = None

    def __init__(self, subtype: Any, *_: Any):
        if subtype is not _NDARRAY:  # numpy's _reconstruct would allocate the shape it is given
            raise _Corrupt(f"_reconstruct of {_short(subtype)}, not of numpy.ndarray")

    def __setstate__(self, state: Any) -> None:
        shape, dtype, fortran, raw = _array_state(state)
        if not isinstance(raw, (bytes, bytearray)):
            raise _Corrupt(f"array data is a {_short(raw)}, not bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) != nbytes:
            raise _Corrupt(f"an array of shape {shape} {dtype} needs {nbytes} bytes, "
                           f"the file holds {len(raw)}")
        flat = np.frombuffer(raw, dtype)
        self.array = (flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)).copy()


# ---- reading: the restricted unpickler (the general path) -------------------------------------

class _PickledQuantizedWeight:
    """What `__main__.QuantizedWeight8bit` unpickles to: a bare record filled by BUILD."""


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


# The globals a checkpoint may name, and what each resolves to when unpickling: records and
# markers of this module, never numpy's own constructors.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayRecord,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayRecord,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeRecord,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _PickledQuantizedWeight,
}


def _refused_global(source: str, module: str, name: str) -> CheckpointError:
    allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
    return CheckpointError(f"{source}: refused pickle global {str(module)[:80]}.{str(name)[:80]} "
                           f"(a checkpoint may only reference {allowed})")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _refused_global(self.source, module, name)
        return _ALLOWED_GLOBALS[module, name]


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Whatever reading `path` raises becomes a CheckpointError naming it: a parser of untrusted
    bytes fails in many ways (the C unpickler alone raises a dozen exception types)."""
    try:
        yield
    except (CheckpointError, _Unusual):
        raise
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except _Corrupt as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 - any other failure of parsing is a corrupt file
        detail = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {detail})") \
            from None


def _unpickle(path: str) -> np.ndarray | QuantizedWeight8bit:
    """The whole file through the restricted unpickler: slower, but follows any pickle layout.

    The scanner walks the file first, so every length, frame and memo index the unpickler meets
    has been checked against the file (none can make it allocate more than the file holds)."""
    locate_tensor(path)
    with _reading(path):
        with open(path, "rb", buffering=1 << 20) as f:
            obj = _RestrictedUnpickler(f, path).load()
        return _unpickled_tensor(obj)


def _unpickled_array(record: Any, what: str) -> np.ndarray:
    if isinstance(record, _ArrayRecord) and isinstance(record.array, np.ndarray):
        return record.array
    names = {_ArrayRecord: "an array without data", _DtypeRecord: "a dtype",
             _PickledQuantizedWeight: "a QuantizedWeight8bit", _Marker: "a global"}
    found = names.get(type(record), f"an object of type {type(record).__name__}")
    raise _Corrupt(f"{what} is {found}, not a numpy array")


def _unpickled_tensor(obj: Any) -> np.ndarray | QuantizedWeight8bit:
    if isinstance(obj, _PickledQuantizedWeight):
        state = vars(obj)
        return QuantizedWeight8bit(weight=_unpickled_array(state.get("weight"), "its weight"),
                                   scales=_unpickled_array(state.get("scales"), "its scales"))
    return _unpickled_array(obj, "the pickled object")


# ---- reading: locating arrays without reading them (the fast path) ----------------------------

@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """A pickled array's raw C-order bytes, located but not read: they start at `offset` in `path`."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# A located tensor: one ArrayRef, or a QuantizedWeight8bit whose weight and scales are ArrayRefs.
Located = Union[ArrayRef, QuantizedWeight8bit]


@dataclasses.dataclass
class _Global:
    module: str
    name: str


@dataclasses.dataclass
class _Payload:
    offset: int
    size: int


class _ArrayStub:
    ref: Optional[ArrayRef] = None


class _QuantizedStub:
    state: Optional[dict] = None


class _Opaque:
    """Anything the scanner does not model (lists, unexpected calls): the file is then unusual."""


_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_op = {name: getattr(pickle, name)[0] for name in dir(pickle)
       if name.isupper() and isinstance(getattr(pickle, name), bytes) and len(getattr(pickle, name)) == 1}
_LENGTH_BYTES = {_op["SHORT_BINUNICODE"]: 1, _op["BINUNICODE"]: 4, _op["BINUNICODE8"]: 8,
                 _op["SHORT_BINBYTES"]: 1, _op["BINBYTES"]: 4, _op["BINBYTES8"]: 8,
                 _op["SHORT_BINSTRING"]: 1, _op["BINSTRING"]: 4, _op["BYTEARRAY8"]: 8}
_TEXT_OPS = {_op["SHORT_BINUNICODE"], _op["BINUNICODE"], _op["BINUNICODE8"]}
_CONSTANTS = {_op["NONE"]: None, _op["NEWTRUE"]: True, _op["NEWFALSE"]: False}
_FIXED_INTS = {_op["BININT1"]: (1, False), _op["BININT2"]: (2, False), _op["BININT"]: (4, True)}
_EMPTY = {_op["EMPTY_TUPLE"]: tuple, _op["EMPTY_LIST"]: list, _op["EMPTY_DICT"]: dict,
          _op["EMPTY_SET"]: set}
_TUPLE_N = {_op["TUPLE1"]: 1, _op["TUPLE2"]: 2, _op["TUPLE3"]: 3}
_MAX_LINE = 4096  # text arguments (module and class names, protocol-0 numbers) are short
# Hashing a tuple (a dict key, a set item) visits every tuple inside it, recursively in C and once
# per reference: a few hundred bytes of memo references or a million nested TUPLE1s would hang or
# overflow the C stack. A checkpoint's tuples hold a handful of items.
_MAX_TUPLE_NODES = 1 << 14
# A checkpoint tensor's pickle has about 65 (an array) to 130 (an int8 weight) opcodes; the cap
# bounds the time a corrupt file takes to be refused (0.3 s: the scanner walks about 200k a second).
_MAX_OPCODES = 1 << 16
_LINE_VALUES = {_op["INT"], _op["LONG"], _op["FLOAT"], _op["STRING"], _op["UNICODE"]}


class _Scanner:
    """Runs a pickle's opcodes symbolically up to STOP: every global is checked against the
    allow-list, array payloads become (offset, size) and are skipped with a seek, so no array
    data is read. Calls other than the few the format needs are not made, only noted (unusual).

    It is also the gate of the restricted unpickler: every length, frame and memo index is checked
    against the file here, and opcodes no checkpoint uses (persistent ids, the extension registry,
    out-of-band buffers) are refused, so the unpickler only ever sees a file that walked to STOP."""

    def __init__(self, file, path: str):
        self.file, self.path = file, path
        self.size = os.fstat(file.fileno()).st_size
        self.unusual = False
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.tuple_nodes: dict[int, tuple[tuple, int]] = {}  # id -> (tuple, tuples it reaches)

    def take(self, n: int) -> bytes:
        data = self.file.read(n) if n <= self.size - self.file.tell() else b""
        if len(data) < n:
            raise CheckpointError(f"{self.path}: truncated pickle (ends at byte {self.size} "
                                  f"before its STOP opcode)")
        return data

    def line(self) -> str:
        data = self.file.readline(_MAX_LINE)
        if not data.endswith(b"\n"):
            raise CheckpointError(f"{self.path}: truncated or corrupt pickle (no end of line within "
                                  f"{_MAX_LINE} bytes of byte {self.file.tell() - len(data)})")
        return data[:-1].decode("utf-8")

    def opaque(self) -> _Opaque:
        self.unusual = True
        return _Opaque()

    def pop(self, n: int = 1) -> list[Any]:
        """The top `n` items, which must lie above the last MARK (as the unpickler requires)."""
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - n < floor:
            raise _Corrupt("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def top(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Corrupt("stack underflow")
        return self.stack[-1]

    def since_mark(self) -> list[Any]:
        if not self.marks:
            raise _Corrupt("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def tuple_of(self, items: list[Any]) -> tuple:
        """tuple(items), refused when hashing it would visit more than _MAX_TUPLE_NODES tuples."""
        nodes = 1 + sum(self.tuple_nodes[id(item)][1] for item in items
                        if isinstance(item, tuple) and id(item) in self.tuple_nodes)
        if nodes > _MAX_TUPLE_NODES:
            raise _Corrupt(f"tuples nested or shared more than {_MAX_TUPLE_NODES} times")
        value = tuple(items)
        self.tuple_nodes[id(value)] = (value, nodes)  # the tuple is kept, so its id stays its own
        return value

    def memo_index(self, memo: dict[int, Any], index: int) -> int:
        """Picklers number memo entries 0, 1, 2 ...; a larger index would make the unpickler
        grow its memo table to twice that size."""
        if index > len(memo):
            raise _Corrupt(f"memo index {index} out of order (the memo holds {len(memo)} entries)")
        return index

    def run(self) -> Located:
        stack, marks, pop, top = self.stack, self.marks, self.pop, self.top
        memo: dict[int, Any] = {}

        for _ in range(_MAX_OPCODES):
            op = self.take(1)[0]
            if op == _op["PROTO"]:
                self.take(1)
            elif op == _op["FRAME"]:  # frames only group opcodes; we read the raw file
                n = int.from_bytes(self.take(8), "little")
                if n > self.size - self.file.tell():
                    raise _Corrupt(f"a frame of {n} bytes at byte {self.file.tell() - 9} runs past "
                                   f"the end of the file ({self.size} bytes)")
            elif op in _LENGTH_BYTES:
                n = int.from_bytes(self.take(_LENGTH_BYTES[op]), "little")
                stack.append(self.take(n).decode("utf-8") if op in _TEXT_OPS else self.skip(n))
            elif op in _FIXED_INTS:
                width, signed = _FIXED_INTS[op]
                stack.append(int.from_bytes(self.take(width), "little", signed=signed))
            elif op == _op["LONG1"]:
                stack.append(int.from_bytes(self.take(self.take(1)[0]), "little", signed=True))
            elif op == _op["LONG4"]:
                n = int.from_bytes(self.take(4), "little", signed=True)
                if n < 0:
                    raise _Corrupt("LONG4 with a negative length")
                stack.append(int.from_bytes(self.take(n), "little", signed=True))
            elif op == _op["BINFLOAT"]:
                stack.append(struct.unpack(">d", self.take(8))[0])
            elif op in _LINE_VALUES:
                self.line()
                stack.append(self.opaque())
            elif op in _CONSTANTS:
                stack.append(_CONSTANTS[op])
            elif op == _op["MEMOIZE"]:
                memo[len(memo)] = top()
            elif op == _op["BINPUT"]:
                memo[self.memo_index(memo, self.take(1)[0])] = top()
            elif op == _op["LONG_BINPUT"]:
                memo[self.memo_index(memo, int.from_bytes(self.take(4), "little"))] = top()
            elif op == _op["PUT"]:
                memo[self.memo_index(memo, int(self.line()))] = top()
            elif op == _op["BINGET"]:
                stack.append(memo[self.take(1)[0]])
            elif op == _op["LONG_BINGET"]:
                stack.append(memo[int.from_bytes(self.take(4), "little")])
            elif op == _op["GET"]:
                stack.append(memo[int(self.line())])
            elif op == _op["STACK_GLOBAL"]:
                module, name = pop(2)
                if not isinstance(module, str) or not isinstance(name, str):
                    raise _Corrupt("STACK_GLOBAL of non-strings")
                stack.append(self.global_(module, name))
            elif op == _op["GLOBAL"]:
                module = self.line()
                stack.append(self.global_(module, self.line()))
            elif op == _op["INST"]:
                module = self.line()
                self.global_(module, self.line())
                self.since_mark()
                stack.append(self.opaque())
            elif op == _op["MARK"]:
                marks.append(len(stack))
            elif op in _EMPTY:
                stack.append(_EMPTY[op]())
            elif op in _TUPLE_N:
                stack.append(self.tuple_of(pop(_TUPLE_N[op])))
            elif op == _op["TUPLE"]:
                stack.append(self.tuple_of(self.since_mark()))
            elif op == _op["LIST"]:
                stack.append(self.since_mark())
            elif op == _op["DICT"]:
                items = self.since_mark()
                stack.append(self.dict_of(items))
            elif op == _op["FROZENSET"]:
                self.since_mark()
                stack.append(self.opaque())
            elif op == _op["APPEND"]:
                item, = pop()
                self.add(top(), [item])
            elif op in (_op["APPENDS"], _op["ADDITEMS"]):
                items = self.since_mark()
                self.add(top(), items)
            elif op == _op["SETITEM"]:
                key, value = pop(2)
                self.setitems(top(), [key, value])
            elif op == _op["SETITEMS"]:
                items = self.since_mark()
                self.setitems(top(), items)
            elif op == _op["POP"]:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop()
            elif op == _op["POP_MARK"]:
                self.since_mark()
            elif op == _op["DUP"]:
                stack.append(top())
            elif op == _op["REDUCE"]:
                fn, args = pop(2)
                stack.append(self.reduce(fn, args))
            elif op == _op["NEWOBJ"]:
                cls, args = pop(2)
                if isinstance(cls, _Global) and cls.name == "QuantizedWeight8bit" and args == ():
                    stack.append(_QuantizedStub())
                else:
                    stack.append(self.opaque())
            elif op == _op["NEWOBJ_EX"]:
                pop(3)
                stack.append(self.opaque())
            elif op == _op["OBJ"]:
                self.since_mark()
                stack.append(self.opaque())
            elif op == _op["BUILD"]:
                state, = pop()
                self.build(top(), state)
            elif op == _op["STOP"]:
                result, = pop()
                if self.unusual:
                    raise _Unusual
                return self.result(result)
            else:  # persistent ids, out-of-band buffers, extension registry, or not an opcode
                raise _Corrupt(f"byte {self.file.tell() - 1} holds {op:#04x}, not an opcode a "
                               f"checkpoint uses")
        raise _Corrupt(f"no STOP within {_MAX_OPCODES} opcodes (a checkpoint tensor has about 100)")

    def skip(self, n: int) -> _Payload:
        offset = self.file.tell()
        if offset + n > self.size:
            raise CheckpointError(f"{self.path}: truncated pickle (an array's data runs to byte "
                                  f"{offset + n} but the file has {self.size} bytes)")
        self.file.seek(n, os.SEEK_CUR)
        return _Payload(offset, n)

    def global_(self, module: str, name: str) -> _Global:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _refused_global(self.path, module, name)
        return _Global(module, name)

    def dict_of(self, items: list[Any]) -> Any:
        try:
            return dict(zip(items[::2], items[1::2]))
        except TypeError:  # unhashable symbolic key
            return self.opaque()

    def add(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(items)
        else:
            self.unusual = True

    def setitems(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, dict):
            try:
                target.update(zip(items[::2], items[1::2]))
                return
            except TypeError:  # unhashable symbolic key
                pass
        self.unusual = True

    def reduce(self, fn: Any, args: Any) -> Any:
        if isinstance(fn, _Global) and isinstance(args, tuple):
            if (fn.module, fn.name) in _RECONSTRUCT:
                if not args or not (isinstance(args[0], _Global) and args[0].name == "ndarray"):
                    raise _Corrupt("_reconstruct of something other than numpy.ndarray")
                return _ArrayStub()
            if (fn.module, fn.name) == ("numpy", "dtype") and 1 <= len(args) <= 3:
                kind = args[0]
                if isinstance(kind, _Global) and kind.name == "bfloat16":
                    kind = _BFLOAT16
                return _DtypeRecord(kind, *args[1:])
        return self.opaque()

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, _Global):  # the unpickler would set attributes of this module's classes
            raise _Corrupt(f"BUILD on the global {obj.module}.{obj.name}")
        if isinstance(obj, _DtypeRecord):
            obj.__setstate__(state)
        elif isinstance(obj, _ArrayStub):
            shape, dtype, fortran, raw = _array_state(state)
            if fortran or not isinstance(raw, _Payload):
                self.unusual = True
                return
            ref = ArrayRef(self.path, raw.offset, shape, dtype)
            if ref.nbytes != raw.size:
                raise _Corrupt(f"an array of shape {ref.shape} {dtype} needs {ref.nbytes} bytes, "
                               f"the file holds {raw.size}")
            obj.ref = ref
        elif isinstance(obj, _QuantizedStub) and isinstance(state, dict):
            obj.state = state
        else:
            self.unusual = True

    def result(self, obj: Any) -> Located:
        if isinstance(obj, _ArrayStub) and obj.ref is not None:
            return obj.ref
        if isinstance(obj, _QuantizedStub) and obj.state is not None:
            weight, scales = obj.state.get("weight"), obj.state.get("scales")
            if isinstance(weight, _ArrayStub) and isinstance(scales, _ArrayStub) \
                    and weight.ref is not None and scales.ref is not None:
                return QuantizedWeight8bit(weight=weight.ref, scales=scales.ref)
        raise _Unusual


def locate_tensor(path: str | os.PathLike) -> Optional[Located]:
    """Where one file's arrays lie, from its pickle opcodes alone (a few hundred bytes are read).

    None when the file uses a pickle layout the scanner does not follow (`read_tensor` then
    unpickles it). Refused globals, truncation and any corruption raise CheckpointError naming
    the file before any data is read.
    """
    path = os.fspath(path)
    try:
        with _reading(path), open(path, "rb") as f:
            return _Scanner(f, path).run()
    except _Unusual:
        return None


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


def check_tensor(value: np.ndarray | QuantizedWeight8bit | Located, spec: TensorSpec, path: str) -> None:
    """Raise CheckpointError naming the parameter and file when `value` (read or only located)
    does not fit `spec`."""
    where = f"parameter {spec.name} ({path})"
    if tuple(value.shape) != spec.shape:
        raise CheckpointError(f"{where}: expected shape {spec.shape}, found {tuple(value.shape)}")
    if isinstance(value, QuantizedWeight8bit):
        if value.weight.dtype != np.int8:
            raise CheckpointError(f"{where}: expected int8 quantized weight, found {value.weight.dtype}")
        if value.scales.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: expected float scales (bfloat16, float16, float32), "
                                  f"found {value.scales.dtype}")
        problem = check_block_layout(value.shape, tuple(value.scales.shape))
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    elif value.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected dtype bfloat16, float16 or float32, found {value.dtype}")


def _check_folder(path: str) -> None:
    """CheckpointError saying what `path` is when it is not a folder: missing, or a file."""
    if os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(parent) == CKPT_DIR:  # one of the tensor files
        folder = os.path.dirname(os.path.dirname(os.path.normpath(path))) or "."
        raise CheckpointError(f"{path} is a file of a checkpoint; pass the folder that holds "
                              f"{CKPT_DIR}/: {folder}")
    raise CheckpointError(f"{path} is a file, not a checkpoint folder; pass the folder that holds "
                          f"{CKPT_DIR}/ and {CONFIG_FILE}")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """`path/ckpt-0` (or `path` itself when it is the ckpt-0 folder), with clear errors."""
    path = os.fspath(path)
    _check_folder(path)
    ckpt = os.path.join(path, CKPT_DIR)
    if os.path.isdir(ckpt):
        return ckpt
    if os.path.isfile(os.path.join(path, tensor_filename(0))):
        return path
    raise CheckpointError(f"{path} holds no {CKPT_DIR}/ folder with {tensor_filename(0)}")


def is_ckpt_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a `ckpt-0` folder itself (tensor files, no ckpt-0/ inside) rather than
    the checkpoint folder that holds it with config.json and tokenizer.model."""
    path = os.fspath(path)
    return (not os.path.isdir(os.path.join(path, CKPT_DIR))
            and os.path.isfile(os.path.join(path, tensor_filename(0))))


# ---- validation before loading ----------------------------------------------------------------

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


# ---- loading ----------------------------------------------------------------------------------

class _ShapeOnly:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _sharding_for(mesh: Any, spec: TensorSpec, value: Any) -> Any:
    """The final sharding of a tensor: from the mesh's table, or the first device without a mesh."""
    import jax
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        quantized = isinstance(value, QuantizedWeight8bit)
        return QuantizedWeight8bit(weight=single, scales=single) if quantized else single
    from grok1.sharding import param_sharding
    return param_sharding(mesh, spec.module, spec.param, value)


def _bounding_box(indices: Iterable[tuple[slice, ...]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    boxes = [_normalise(index, shape) for index in indices]
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes))
                 for i in range(len(shape)))


def _array_from(source: ArrayRef | np.ndarray, sharding: Any) -> Any:
    """A jax.Array with `sharding`, reading from the file only the part this process's devices
    hold (one host buffer, which each device's shard slices; with one device it becomes the
    device array without a copy on CPU)."""
    import jax
    shape = tuple(source.shape)
    box = _bounding_box(sharding.addressable_devices_indices_map(shape).values(), shape)
    host = read_box(source, box) if isinstance(source, ArrayRef) else source[box]

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        return host[tuple(slice(s.start - b.start, s.stop - b.start)
                          for s, b in zip(_normalise(index, shape), box))]

    return jax.make_array_from_callback(shape, sharding, shard)


def _load_one(entry: CheckedTensor, mesh: Any) -> Any:
    """One tensor on its devices, transfers finished (so its host buffer is free when copied)."""
    import jax
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


def iter_tensors(ckpt: str, config: ModelConfig
                 ) -> Iterator[tuple[TensorSpec, np.ndarray | QuantizedWeight8bit]]:
    """(spec, numpy value) for every tensor in file order, validated first, one file at a time."""
    for entry in check_checkpoint(ckpt, config):
        value = _unpickle(entry.path) if entry.located is None else _read_located(entry.located)
        check_tensor(value, entry.spec, entry.path)
        yield entry.spec, value


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
    """`config.json` beside `ckpt-0/`; errors name the file once and say what to pass instead."""
    path = os.fspath(path)
    _check_folder(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        if is_ckpt_folder(path):
            parent = os.path.dirname(os.path.normpath(path)) or "."
            raise CheckpointError(f"{path} is the {CKPT_DIR} folder itself; pass the folder that "
                                  f"holds it and {CONFIG_FILE}: {parent}")
        raise CheckpointError(f"{path} holds no {CONFIG_FILE} (the model config beside {CKPT_DIR}/); "
                              f"for a checkpoint that ships none, pass config= a ModelConfig or a "
                              f"preset name (the release: config='grok-1')")
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a valid JSON config ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: a config must be a JSON object, got {type(values).__name__}")
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except TypeError as e:  # e.g. a key JSON allows but a dataclass does not
        raise ConfigError(f"{file}: {e}") from None


# ---- quantisation -----------------------------------------------------------------------------

def quantize_params(params: dict, config: ModelConfig, num_blocks: int = 1,
                    scale_dtype: Any = np.float32) -> dict:
    """A copy of `params` whose float linear weights (the tensors the release stores as int8) are
    int8 with `num_blocks` scale blocks along their input axis; everything else is kept as is,
    as are weights that are already quantized. The result can be `save`d in the official format."""
    from grok1.quant import quantize
    out = {module: dict(values) for module, values in params.items()}
    for spec in tensor_specs(config):
        value = params.get(spec.module, {}).get(spec.param)
        if value is None:
            raise CheckpointError(f"params lack parameter {spec.name} that config expects")
        if not spec.quantized or isinstance(value, QuantizedWeight8bit):
            continue
        n_in = spec.shape[-2]
        if num_blocks < 1 or n_in % num_blocks:
            raise CheckpointError(f"parameter {spec.name}: num_blocks={num_blocks} does not divide its "
                                  f"input axis of size {n_in} (shape {spec.shape})")
        out[spec.module][spec.param] = quantize(np.asarray(value), num_blocks, scale_dtype=scale_dtype)
    return out
