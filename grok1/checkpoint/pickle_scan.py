"""Reading a checkpoint file's pickle without running it: the fuzzed surface, numpy only.

Each pickle's opcodes are first walked symbolically (`locate`): globals are checked against the
few the format needs (anything else is refused, naming file and global) and each array's raw bytes
are located (offset, shape, dtype) without being read. Files in a layout the walk does not follow
go through an unpickler restricted to the same globals (`unpickle`), and only after the walk has
checked every length in them against the file. Whatever a file's bytes, reading it either gives a
tensor or raises CheckpointError naming the file (tests/test_checkpoint_fuzz.py).

A quantized tensor comes back as a `QuantizedPair` of its weight and scales (arrays or their
located bytes); grok1/checkpoint/reader.py makes the QuantizedWeight8bit of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import struct
from typing import Any, Optional, Union

import ml_dtypes
import numpy as np

from grok1.checkpoint.errors import CheckpointError, Corrupt, Unusual, reading


@dataclasses.dataclass(frozen=True)
class QuantizedPair:
    """A pickled `QuantizedWeight8bit`: its int8 `weight` and float `scales`, as numpy arrays or
    as located ArrayRefs."""

    weight: Any
    scales: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


# ---- reading: what a pickled array may say ----------------------------------------------------
#
# numpy pickles an array as `_reconstruct(ndarray, (0,), b"b")` then BUILD with the state
# (1, shape, dtype, fortran_order, raw_bytes), and a dtype as `dtype(kind, align, copy)` then BUILD
# with (3, byteorder, None, None, None, elsize, alignment, flags). Both readers below check these
# states against what numpy writes and make the dtypes and arrays themselves: numpy's own
# __setstate__ never sees a file's state. A corrupt one made it raise SystemError ("error return
# without exception set"), a fuzz of that reader crashed the interpreter, and with copy=False
# `numpy.dtype` returns its shared instance (np.dtype("i1", False, False) is np.dtype("i1")).


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
            raise Corrupt(f"unknown dtype {kind!r}") from None
    else:
        raise Corrupt(f"unsupported dtype {_short(kind)} (checkpoints hold plain numeric dtypes)")
    if not isinstance(state, tuple) or len(state) != 8:
        raise Corrupt(f"dtype state {_short(state)} is not the 8 fields numpy writes")
    version, order, names, fields, subarray, elsize, alignment, flags = state
    if type(version) is not int or version != 3 or order not in ("<", ">", "=", "|") \
            or (names, fields, subarray) != (None, None, None) \
            or type(elsize) is not int or elsize not in (-1, base.itemsize) \
            or type(alignment) is not int or alignment not in (-1, 1, 2, 4, 8, 16) \
            or type(flags) is not int:
        raise Corrupt(f"dtype state of {base} is not one numpy writes")
    return base.newbyteorder(order) if order in "<>" else base


class _DtypeRecord:
    """What `numpy.dtype(kind, align, copy)` unpickles to; BUILD's state makes `.dtype`."""

    kind: Any = None
    dtype: Optional[np.dtype] = None

    def __init__(self, kind: Any, align: Any = False, copy: Any = False):
        if not isinstance(align, bool) or not isinstance(copy, bool):
            raise Corrupt("dtype flags are not booleans")
        self.kind = kind

    def __setstate__(self, state: Any) -> None:
        self.dtype = _dtype_from(self.kind, state)


def _array_state(state: Any) -> tuple[tuple[int, ...], np.dtype, bool, Any]:
    """(shape, dtype, fortran_order, raw) of an array's BUILD state, checked; raw is unchecked."""
    if not isinstance(state, tuple) or len(state) != 5:
        raise Corrupt(f"array state {_short(state)} is not the 5 fields numpy writes")
    version, shape, dtype, fortran, raw = state
    if type(version) is not int or version != 1:
        raise Corrupt(f"array state version {_short(version)} (numpy writes 1)")
    if not isinstance(shape, tuple) or len(shape) > _MAX_RANK \
            or not all(type(n) is int and 0 <= n < 2 ** 63 for n in shape):
        raise Corrupt(f"array shape is not a tuple of at most {_MAX_RANK} sizes in [0, 2**63)")
    if not isinstance(dtype, _DtypeRecord) or dtype.dtype is None:
        raise Corrupt(f"array dtype is a {_short(dtype)}, not a dtype")
    if not isinstance(fortran, bool):
        raise Corrupt(f"array order flag {_short(fortran)} is not a boolean")
    return shape, dtype.dtype, fortran, raw


class _ArrayRecord:
    """What `_reconstruct(ndarray, ...)` unpickles to; BUILD's state, checked, makes `.array`."""

    array: Optional[np.ndarray] = None

    def __init__(self, subtype: Any, *_: Any):
        if subtype is not _NDARRAY:  # numpy's _reconstruct would allocate the shape it is given
            raise Corrupt(f"_reconstruct of {_short(subtype)}, not of numpy.ndarray")

    def __setstate__(self, state: Any) -> None:
        shape, dtype, fortran, raw = _array_state(state)
        if not isinstance(raw, (bytes, bytearray)):
            raise Corrupt(f"array data is a {_short(raw)}, not bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) != nbytes:
            raise Corrupt(f"an array of shape {shape} {dtype} needs {nbytes} bytes, "
                           f"the file holds {len(raw)}")
        flat = np.frombuffer(raw, dtype)
        self.array = (flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)).copy()


# ---- reading: the restricted unpickler (the general path) -------------------------------------

class _PickledQuantizedWeight:
    """What `__main__.QuantizedWeight8bit` unpickles to: a bare record filled by BUILD."""


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


def unpickle(path: str) -> np.ndarray | QuantizedPair:
    """The whole file through the restricted unpickler: slower, but follows any pickle layout.

    The scanner walks the file first, so every length, frame and memo index the unpickler meets
    has been checked against the file (none can make it allocate more than the file holds)."""
    locate(path)
    with reading(path):
        with open(path, "rb", buffering=1 << 20) as f:
            obj = _RestrictedUnpickler(f, path).load()
        return _unpickled_tensor(obj)


def _unpickled_array(record: Any, what: str) -> np.ndarray:
    if isinstance(record, _ArrayRecord) and isinstance(record.array, np.ndarray):
        return record.array
    names = {_ArrayRecord: "an array without data", _DtypeRecord: "a dtype",
             _PickledQuantizedWeight: "a QuantizedWeight8bit", _Marker: "a global"}
    found = names.get(type(record), f"an object of type {type(record).__name__}")
    raise Corrupt(f"{what} is {found}, not a numpy array")


def _unpickled_tensor(obj: Any) -> np.ndarray | QuantizedPair:
    if isinstance(obj, _PickledQuantizedWeight):
        state = vars(obj)
        return QuantizedPair(weight=_unpickled_array(state.get("weight"), "its weight"),
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


# A located tensor: one ArrayRef, or a QuantizedPair whose weight and scales are ArrayRefs.
Located = Union[ArrayRef, QuantizedPair]


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
            raise Corrupt("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def top(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise Corrupt("stack underflow")
        return self.stack[-1]

    def since_mark(self) -> list[Any]:
        if not self.marks:
            raise Corrupt("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def tuple_of(self, items: list[Any]) -> tuple:
        """tuple(items), refused when hashing it would visit more than _MAX_TUPLE_NODES tuples."""
        nodes = 1 + sum(self.tuple_nodes[id(item)][1] for item in items
                        if isinstance(item, tuple) and id(item) in self.tuple_nodes)
        if nodes > _MAX_TUPLE_NODES:
            raise Corrupt(f"tuples nested or shared more than {_MAX_TUPLE_NODES} times")
        value = tuple(items)
        self.tuple_nodes[id(value)] = (value, nodes)  # the tuple is kept, so its id stays its own
        return value

    def memo_index(self, memo: dict[int, Any], index: int) -> int:
        """Picklers number memo entries 0, 1, 2 ...; a larger index would make the unpickler
        grow its memo table to twice that size."""
        if index > len(memo):
            raise Corrupt(f"memo index {index} out of order (the memo holds {len(memo)} entries)")
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
                    raise Corrupt(f"a frame of {n} bytes at byte {self.file.tell() - 9} runs past "
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
                    raise Corrupt("LONG4 with a negative length")
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
                    raise Corrupt("STACK_GLOBAL of non-strings")
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
                    raise Unusual
                return self.result(result)
            else:  # persistent ids, out-of-band buffers, extension registry, or not an opcode
                raise Corrupt(f"byte {self.file.tell() - 1} holds {op:#04x}, not an opcode a "
                               f"checkpoint uses")
        raise Corrupt(f"no STOP within {_MAX_OPCODES} opcodes (a checkpoint tensor has about 100)")

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
                    raise Corrupt("_reconstruct of something other than numpy.ndarray")
                return _ArrayStub()
            if (fn.module, fn.name) == ("numpy", "dtype") and 1 <= len(args) <= 3:
                kind = args[0]
                if isinstance(kind, _Global) and kind.name == "bfloat16":
                    kind = _BFLOAT16
                return _DtypeRecord(kind, *args[1:])
        return self.opaque()

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, _Global):  # the unpickler would set attributes of this module's classes
            raise Corrupt(f"BUILD on the global {obj.module}.{obj.name}")
        if isinstance(obj, _DtypeRecord):
            obj.__setstate__(state)
        elif isinstance(obj, _ArrayStub):
            shape, dtype, fortran, raw = _array_state(state)
            if fortran or not isinstance(raw, _Payload):
                self.unusual = True
                return
            ref = ArrayRef(self.path, raw.offset, shape, dtype)
            if ref.nbytes != raw.size:
                raise Corrupt(f"an array of shape {ref.shape} {dtype} needs {ref.nbytes} bytes, "
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
                return QuantizedPair(weight=weight.ref, scales=scales.ref)
        raise Unusual


def locate(path: str | os.PathLike) -> Optional[Located]:
    """Where one file's arrays lie, from its pickle opcodes alone (a few hundred bytes are read).

    None when the file uses a pickle layout the scanner does not follow (`unpickle` reads it).
    Refused globals, truncation and any corruption raise CheckpointError naming
    the file before any data is read.
    """
    path = os.fspath(path)
    try:
        with reading(path), open(path, "rb") as f:
            return _Scanner(f, path).run()
    except Unusual:
        return None


