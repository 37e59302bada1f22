"""Fuzzing the checkpoint reader: whatever the bytes of a tensor file, reading it ends in a
CheckpointError naming the file, or gives the tensor with its shape and dtypes (the mutation hit
only array data). No other exception, no hang, no allocation beyond the file's size.

The mutations (seeded) go over every tensor file of a tiny int8 checkpoint written by
`checkpoint.save`, the same with float weights, a Fortran-order file (the restricted unpickler's
path) and the shipped small model: byte changes, truncations, insertions, deletions, runs of 0xff
and huge values in length, frame and memo fields.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import pickletools
import random
import shutil
import tempfile
import time
import tracemalloc
from typing import Iterator

import ml_dtypes
import numpy as np
import pytest

from grok1 import checkpoint
from grok1.checkpoint import CheckpointError, TensorSpec
from grok1.config import ModelConfig
from grok1.weights.quant import QuantizedWeight8bit

from conftest import random_params

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = REPO / "checkpoints" / "small"
ONE_LAYER = ModelConfig(vocab_size=64, emb_size=32, num_layers=1, num_q_heads=4, num_kv_heads=2,
                        key_size=8, widening_factor=2, num_experts=4, num_selected_experts=2,
                        sequence_len=16, embedding_multiplier_scale=1.0, attn_output_multiplier=0.25)
MUTATIONS = 3000


class Target:
    """One tensor file to mutate: its bytes, its spec, what it holds, and where its fields lie."""

    def __init__(self, path: str, spec: TensorSpec):
        self.path, self.spec = path, spec
        self.data = pathlib.Path(path).read_bytes()
        self.value = checkpoint.read_tensor(path, spec)
        self.header: list[int] = []   # positions of the bytes that are not array data
        ops = list(pickletools.genops(self.data))
        for (_, arg, pos), (_, _, end) in zip(ops, ops[1:] + [(None, None, len(self.data))]):
            payload = len(arg) if isinstance(arg, (bytes, bytearray)) else 0
            self.header.extend(range(pos, end - payload))
        self.fields = fields_of(self.data)

    def dtypes(self, value) -> tuple:
        if isinstance(value, QuantizedWeight8bit):
            return ("int8", value.weight.shape, value.weight.dtype, value.scales.shape, value.scales.dtype)
        return ("array", value.shape, value.dtype)


def fields_of(data: bytes) -> list[tuple[int, int]]:
    """(start, width) of the length prefix or integer argument of every opcode that has one."""
    fields = []
    for op, _, pos in pickletools.genops(data):
        if op.arg is None:
            continue
        width = op.arg.n if op.arg.n > 0 else {  # length-prefixed arguments
            "unicodestring1": 1, "unicodestring4": 4, "unicodestring8": 8, "bytes1": 1, "bytes4": 4,
            "bytes8": 8, "bytearray8": 8, "string1": 1, "string4": 4, "long1": 1, "long4": 4,
        }.get(op.arg.name, 0)
        if width:
            fields.append((pos + 1, width))
    return fields


def mutate(target: Target, rng: random.Random) -> tuple[str, bytes]:
    """(description, mutated bytes); positions mostly in the pickle's opcodes, some anywhere."""
    data = bytearray(target.data)
    anywhere = rng.random() < 0.15
    pos = rng.randrange(len(data)) if anywhere else rng.choice(target.header)
    kind = rng.choice(["byte", "bytes", "truncate", "insert", "delete", "0xff run", "huge field"])
    if kind == "byte":
        data[pos] = (data[pos] + rng.randrange(1, 256)) % 256
    elif kind == "bytes":
        for p in rng.sample(target.header, min(len(target.header), rng.randrange(2, 9))):
            data[p] = rng.randrange(256)
    elif kind == "truncate":
        del data[pos:]
    elif kind == "insert":
        data[pos:pos] = rng.randbytes(rng.randrange(1, 17))
    elif kind == "delete":
        del data[pos:pos + rng.randrange(1, 17)]
    elif kind == "0xff run":
        data[pos:pos + 20] = b"\xff" * 20
    else:
        start, width = rng.choice(target.fields)
        value = rng.choice([2 ** (8 * width) - 1, 2 ** (8 * width - 1) - 1, len(data) + rng.randrange(1, 9),
                            rng.randrange(2 ** (8 * width))])
        data[start:start + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        pos = start
    return f"{kind} at byte {pos}", bytes(data)


def outcome(target: Target, path: str) -> str:
    """'refused' (CheckpointError naming `path`), 'unchanged' or 'data only'; anything else fails."""
    try:
        value = checkpoint.read_tensor(path, target.spec)
    except CheckpointError as e:
        assert path in str(e), f"the error does not name the file: {e}"
        return "refused"
    assert target.dtypes(value) == target.dtypes(target.value), "loaded with another shape or dtype"
    same = all(a.tobytes() == b.tobytes() for a, b in zip(arrays(value), arrays(target.value)))
    return "unchanged" if same else "data only"


def arrays(value) -> list[np.ndarray]:
    return [value.weight, value.scales] if isinstance(value, QuantizedWeight8bit) else [value]


def checkpoint_targets(path: str, config: ModelConfig) -> list[Target]:
    ckpt = checkpoint.checkpoint_dir(path)
    return [Target(os.path.join(ckpt, spec.filename), spec) for spec in checkpoint.tensor_specs(config)]


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> list[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    params = random_params(ONE_LAYER, seed=0)
    checkpoint.save(checkpoint.quantize_params(params, ONE_LAYER, num_blocks=2,
                                               scale_dtype=ml_dtypes.bfloat16), root / "int8", ONE_LAYER)
    checkpoint.save(params, root / "float", ONE_LAYER)
    fortran = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(4, 6))
    with open(root / "fortran", "wb") as f:  # numpy's own pickling: the unpickler's layout
        pickle.dump(fortran, f, protocol=4)
    found = (checkpoint_targets(str(root / "int8"), ONE_LAYER)
             + checkpoint_targets(str(root / "float"), ONE_LAYER)
             + [Target(str(root / "fortran"), TensorSpec(0, "fortran", "w", (4, 6)))])
    if (SMALL / "config.json").is_file():
        found += checkpoint_targets(str(SMALL), checkpoint.read_config(SMALL))
    return found


@pytest.fixture
def scratch(tmp_path) -> Iterator[pathlib.Path]:
    """A folder in memory when /dev/shm offers one: the fuzz writes about half a GB of files."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="grok1-fuzz-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_every_mutation_of_every_tensor_file_is_refused_naming_it_or_changes_only_data(targets, scratch):
    rng = random.Random(14)
    counts = {"refused": 0, "unchanged": 0, "data only": 0}
    failures, slowest = [], 0.0
    for i in range(MUTATIONS):
        target = targets[i % len(targets)]
        description, data = mutate(target, rng)
        path = str(scratch / os.path.basename(target.path))
        with open(path, "wb") as f:
            f.write(data)
        start = time.perf_counter()
        try:
            counts[outcome(target, path)] += 1
        except Exception as e:  # noqa: BLE001 - collected so that the report lists them all
            failures.append(f"{target.path} {description}: {type(e).__name__}: {e}")
        slowest = max(slowest, time.perf_counter() - start)
    assert not failures, f"{len(failures)} of {MUTATIONS} mutations:\n" + "\n".join(failures[:10])
    assert counts["refused"] > MUTATIONS // 2 and counts["data only"] > 0, counts
    assert slowest < 5, f"one file took {slowest:.1f} s to read"


def test_mutations_reach_the_restricted_unpickler(targets):
    """The fuzz covers both readers: the Fortran-order file goes through the unpickler."""
    fortran = [t for t in targets if t.spec.module == "fortran"]
    assert fortran and checkpoint.locate_tensor(fortran[0].path) is None


@pytest.mark.parametrize("field", ["FRAME", "BINBYTES", "LONG_BINPUT"])
def test_a_huge_length_or_index_field_is_refused_without_allocating_it(tmp_path, field):
    weight = QuantizedWeight8bit(weight=np.zeros((4, 64, 24), np.int8),
                                 scales=np.ones((4, 8, 24), np.float32))
    path = tmp_path / "t"
    checkpoint.write_tensor(path, weight)
    data = bytearray(path.read_bytes())
    if field == "LONG_BINPUT":  # the C unpickler would grow its memo table to twice the index
        data[data.index(pickle.MEMOIZE)] = pickle.LONG_BINPUT[0]
        data[data.index(pickle.LONG_BINPUT) + 1:data.index(pickle.LONG_BINPUT) + 1] = \
            (2 ** 31).to_bytes(4, "little")
    else:
        op = getattr(pickle, field)
        start = data.index(op) + 1
        width = 8 if field == "FRAME" else 4
        data[start:start + width] = (2 ** (8 * width - 1) - 1).to_bytes(width, "little")
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=f"{path}: truncated"):
            checkpoint.read_tensor(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_the_issues_corruptions_fail_grok1_load_naming_the_file(tmp_path):
    """20 bytes of 0xff at byte 10 (was OverflowError: FRAME length exceeds system's maximum), a
    MEMOIZE in an int8 dtype's state turned into NEWFALSE (was SystemError from numpy's dtype
    __setstate__), and a file cut inside its opcodes."""
    import grok1
    if not (SMALL / "config.json").is_file():
        pytest.skip("checkpoints/small is absent")
    for name, change in [("tensor00002_000", lambda d: d[:10] + b"\xff" * 20 + d[30:]),
                         ("tensor00003_000", lambda d: d[:176] + b"\x89" + d[177:]),
                         ("tensor00004_000", lambda d: d[:150])]:
        copy = tmp_path / name
        shutil.copytree(SMALL, copy)
        file = copy / "ckpt-0" / name
        file.write_bytes(change(file.read_bytes()))
        with pytest.raises(CheckpointError, match=f"{file}: truncated"):
            grok1.load(copy, progress=False)


def shared_tuples(levels: int) -> bytes:
    """A dict keyed by a tuple of two references to a tuple of two references to ... (2**levels
    tuples for hash() to visit, in a few hundred bytes)."""
    body = bytearray(pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.MEMOIZE)
    for memo in range(levels):
        body += pickle.BINGET + bytes([memo]) + pickle.BINGET + bytes([memo]) + pickle.TUPLE2 + pickle.MEMOIZE
    return bytes(body + pickle.NONE + pickle.SETITEM + pickle.STOP)


def nested_tuples(depth: int) -> bytes:
    """A dict keyed by ((((...)))) `depth` deep: hash() recurses in C once per level."""
    return (pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth
            + pickle.NONE + pickle.SETITEM + pickle.STOP)


@pytest.mark.parametrize("name,data", [("shared", shared_tuples(60)), ("nested", nested_tuples(1_000_000))])
def test_tuples_too_large_to_hash_are_refused_before_anything_hashes_them(tmp_path, name, data):
    """Hashing the shared one would take 2**60 steps; the nested one overflowed the C stack."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{path}: truncated or corrupt pickle \\(tuples nested"):
        checkpoint.read_tensor(path)


def test_a_file_of_endless_opcodes_is_refused_quickly(tmp_path):
    """A length field cut short makes the scanner read array data as opcodes; 2 MB of EMPTY_TUPLE
    POP pairs would otherwise be walked to the end, and a release file has gigabytes."""
    path = tmp_path / "t"
    path.write_bytes(pickle.PROTO + b"\x04" + (pickle.EMPTY_TUPLE + pickle.POP) * 1_000_000 + pickle.STOP)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{path}: truncated or corrupt pickle \\(no STOP within"):
        checkpoint.read_tensor(path)
    assert time.perf_counter() - start < 5
