"""Device meshes and the rules that split every array over them: one place for the mesh.

`LOGICAL_TO_MESH` maps logical axes to mesh axes. Each parameter declares its logical axes once
(grok1/params.py, `PARAM_AXES`), and so do the KV cache and the step inputs/outputs
(`ACTIVATION_AXES`, here); `partition_spec` turns them into PartitionSpecs. To try another
sharding strategy, change that mapping. No regexes over parameter paths.

Inside the model's steps a few activations are constrained as well (XLA propagates shardings
from the weights and the step inputs to the rest):

- Rows of a batch over `data`. The weights are split over every mesh axis, `data` included, so
  nothing in the weights tells XLA to split the *work* by rows: left alone, a 2x4 mesh computes
  like 1x8 and every device holds the hidden states and temporaries of all rows. `split_rows`
  pins the residual stream [B, ...] to rows over `data`, each row whole, where the layer loop
  takes it in and gives it back; each data group then computes only its rows, with the weights
  gathered over `data` per layer when used. Each row is whole because the products need it so:
  column-parallel products take their rows whole and row-parallel ones give them back whole (one
  all-reduce per sublayer). Left to XLA, the residual stream stayed split along d in the layer
  loop (as the embedding table then was), and each layer reduced its norms and gathered its rows
  between devices: with the new keys' RoPE held to the cache's split (`split_like_cache`), 16
  collectives per layer of bench-1b's decode step on 1x8, now 4.
- New keys and values held to the cache's split (`split_like_cache`), and per-row work that no
  weight splits spread over the devices (`spread_rows`, `each_row_whole`).

These constraints need to know the mesh while the step is traced: `on_mesh(fn, mesh)` wraps a
function (a model's `apply`) so that it is traced with the mesh in context. Without one, or on a
mesh of one device, they return their input unchanged, so single-device programs are untouched.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grok1.params import PARAM_AXES

MESH_AXES = ("data", "expert", "model")

DATA_AXIS = "data"

# Logical axes of the KV cache and of the arrays that enter and leave a forward step.
ACTIVATION_AXES: dict[str, tuple[Optional[str], ...]] = {
    "tokens": ("batch", "seq"),                          # [B, T]
    "logits": ("batch", "seq", "vocab"),                 # [B, T, V]
    "last_logits": ("batch", "vocab"),                   # [B, V]
    "cache_kv": ("layers", "batch", "seq", "cache_heads", None),  # [L, B, S, N, K]
    "cache_valid": ("batch", "seq"),                     # [B, S]
    "cache_length": ("batch",),                          # [B]
}


# Logical axis -> the mesh axes it is split over, jointly and in this order (None: replicated).
# Every large weight is split over ALL mesh axes together, so each of n devices holds 1/n of it:
# Grok-1's 314 GB of int8 only fits when nothing big is replicated. A mesh axis splits at most one
# axis of an array (the first that claims it), and only where the sizes divide (see partition_spec).
LOGICAL_TO_MESH: dict[str, Any] = {
    # Attention heads and the expert hidden (ffn) axis: Megatron-style column-parallel in and
    # row-parallel out, one all-reduce per sublayer. They are also split over "data" (ZeRO-3 /
    # FSDP style): data-parallel replicas share one copy of the weights, which XLA gathers per layer.
    "heads": ("data", "expert", "model"),
    # The key and value projections are the exception: split over data too, their few heads get
    # cut within a head once the devices outnumber them (bench-1b's 4 x 64 on 2x4: 32 columns
    # each; Grok-1's 8 x 128 on 2x8), and every decode step then reshards each row's new keys for
    # RoPE and the cache write (about 30 collectives per layer on 2x4, measured 15 % of a step).
    # They are small (Grok-1: 0.8 GB in all), so data-parallel replicas each hold them. (The
    # model axis alone still cuts heads where it outnumbers them: bench-1b's 4 on 1x8.)
    "kv_heads": ("expert", "model"),
    "ffn": ("data", "model"),
    # Experts go to the expert axis (expert parallelism); with no expert axis it has size 1.
    "experts": "expert",
    # The embedding table is split by vocabulary (the official code splits it along d): each
    # device's share of the output projection is whole rows of the table, the product's fast
    # case, and the logits come out split by vocabulary; the input lookup costs an all-reduce of
    # the looked-up rows. Along d, a device's rows were 1/n of d long (bench-1b on 1x8: 128), and
    # the logits were summed over devices: bench-1b's decode step on 1x8 took 29 / 93 ms at
    # batch 1 / 8 that way against 26 / 88 split by vocabulary (2x4 batch 8: 81 -> 66 ms).
    "vocab": ("data", "expert", "model"),
    "embed": None,
    # Norm scales and the router are tiny ([d] and [d, 8]): replicated everywhere.
    "norm": None,
    "router_experts": None,
    # The d axis of a weight that is already split along its other axis stays whole.
    "embed_in": None,
    "embed_out": None,
    # Rows of a batch are independent: data parallelism. The KV cache is split by rows first and
    # then by kv heads over whatever mesh axes remain, so even batch 1 spreads its cache over all
    # devices (Grok-1 has 8 kv heads: one per device on an 8-way model axis).
    "batch": "data",
    "cache_heads": ("data", "expert", "model"),
    "seq": None,
    # The leading axis of the stacked decoder layers (grok1/weights/stacking.py) and of the KV cache: never
    # split, each device holds its part of every layer, and the layer loop runs on all of them.
    "layers": None,
}


# ---- meshes and partition specs ----------------------------------------------------------------


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"1x8" -> data=1, model=8; "1x2x4" -> data=1, expert=2, model=4; "data=2,model=4" too."""
    text = spec.strip()
    if re.fullmatch(r"\d+(x\d+){1,2}", text):
        sizes = [int(n) for n in text.split("x")]
        names = ("data", "model") if len(sizes) == 2 else MESH_AXES
        shape = dict(zip(names, sizes))
    elif re.fullmatch(r"\s*\w+\s*=\s*\d+(\s*,\s*\w+\s*=\s*\d+)*\s*", text):
        shape = {}
        for part in text.split(","):
            name, value = (s.strip() for s in part.split("="))
            if name not in MESH_AXES:
                raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; allowed: {', '.join(MESH_AXES)}")
            if name in shape:
                raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
            shape[name] = int(value)
    else:
        raise ValueError(f"mesh spec {spec!r} is not DATAxMODEL, DATAxEXPERTxMODEL or "
                         f"axis=size,... (axes: {', '.join(MESH_AXES)})")
    if any(n < 1 for n in shape.values()):
        raise ValueError(f"mesh axis sizes must be positive, got {spec!r}")
    return {name: shape.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "1x1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, expert, model) from a spec such as "1x8" or "data=2,model=4".

    With several processes, `jax.devices()` lists every process's devices, so the mesh spans
    them all; the model axis varies fastest, keeping tensor-parallel groups on one host.
    """
    shape = parse_mesh_spec(spec) if isinstance(spec, str) else {n: spec.get(n, 1) for n in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(shape.values())
    if needed != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {needed} devices but {len(devices)} are available "
            f"({jax.default_backend()}); choose a mesh whose sizes multiply to {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape([shape[n] for n in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def partition_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for `shape` with logical `axes`.

    Each array axis takes, in order, the mesh axes its logical axis maps to, skipping mesh axes
    of size 1, those an earlier array axis already took, and those that would not divide it.
    """
    used: set[str] = set()
    out = []
    for axis, size in zip(axes, shape):
        rule = LOGICAL_TO_MESH.get(axis) if axis else None
        wanted = (rule,) if isinstance(rule, str) else tuple(rule or ())
        taken: list[str] = []
        for mesh_axis in wanted:
            n = mesh.shape[mesh_axis]
            if n > 1 and mesh_axis not in used and size % (math.prod(mesh.shape[a] for a in taken) * n) == 0:
                taken.append(mesh_axis)
        used.update(taken)
        out.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return P(*out)


def activation_sharding(mesh: Mesh, kind: str, shape: Sequence[int]) -> NamedSharding:
    """NamedSharding of a step input/output or cache array named in ACTIVATION_AXES."""
    if kind not in ACTIVATION_AXES:
        raise KeyError(f"unknown activation {kind!r}; known: {sorted(ACTIVATION_AXES)}")
    return NamedSharding(mesh, partition_spec(ACTIVATION_AXES[kind], shape, mesh))


def penalty_counts_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """How per-row token counts [B, V] are split: as a step's logits are when the counts
    penalise them, by rows over every device where the rows divide (`spread_rows`), else by
    vocabulary as the output projection leaves them (the table's "vocab" rule). Replicated,
    each step gathered the counts twice (2 x B x V int32)."""
    axes = tuple(name for name in mesh.axis_names if mesh.shape[name] > 1)
    rows, vocab = shape
    spec = (P(axes, None) if rows % mesh.size == 0
            else P(None, axes) if vocab % mesh.size == 0 else P())
    return NamedSharding(mesh, spec)


def axes_of(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def cache_split(mesh: Any, shape: tuple[int, ...]) -> Optional[P]:
    """The split of a cache of `shape` on `mesh` (`ACTIVATION_AXES`: rows over data, kv heads over what
    divides them) when it uses every mesh axis, so that each device's shard is its own; else
    None: a cache replicated over some axis would have each of its devices repeat the whole
    attention (measured on bench-1b's 4 kv heads on 1x8: 1.7x slower than XLA's split of the
    query heads)."""
    spec = partition_spec(ACTIVATION_AXES["cache_kv"], shape, mesh)
    used = math.prod(mesh.shape[axis] for entry in spec for axis in axes_of(entry))
    return spec if used == mesh.size else None


# ---- host <-> mesh -----------------------------------------------------------------------------


def from_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.sharding.is_fully_replicated:  # every process holds it all: no communication
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ---- activation constraints inside a step -----------------------------------------------------


def on_mesh(fn: Callable[..., Any], mesh: Optional[jax.sharding.Mesh]) -> Callable[..., Any]:
    """`fn`, traced with `mesh` in context so that `split_rows` applies (`fn` itself if no mesh)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced_on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_on_mesh


def split_rows(x: jax.Array) -> jax.Array:
    """`x` [B, ...] constrained to rows over the data axis of the mesh in context (where they
    divide; else every row on every device), each row whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    size = mesh.shape.get(DATA_AXIS, 1)
    rows = DATA_AXIS if size > 1 and x.shape[0] % size == 0 else None
    return jax.lax.with_sharding_constraint(x, P(rows, *[None] * (x.ndim - 1)))


def whole_rows(x: jax.Array) -> jax.Array:
    """`x` [rows, ...] with every row on every device of the mesh in context (if any): for a
    product that takes its rows one at a time (grok1/kernels/), a row sliced out of rows split
    over `data` makes XLA gather the whole weight instead, once per row (measured: eight float32
    copies of the gathered embedding table per device for batch 8 on 2x4), where gathering the
    few rows costs nothing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(None, *[P.UNCONSTRAINED] * (x.ndim - 1)))


def spread_rows(x: jax.Array) -> jax.Array:
    """`x` [rows, ...] split by rows over every axis of the mesh in context, when they divide:
    for per-row work that no weight splits (sampling over the vocabulary), which otherwise every
    device would repeat for all rows. (Identity without a mesh, or when the rows do not divide.)"""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, P(tuple(mesh.axis_names), *[None] * (x.ndim - 1)))


def each_row_whole(x: jax.Array) -> jax.Array:
    """`x` [rows, ...] with each row whole on the devices that hold it: split by rows over every
    axis of the mesh in context where they divide (as `spread_rows`), else every row on every
    device. For per-row work with many steps over the vocabulary (sampling's partial sorts and
    cumulative sums): on logits split by vocabulary, XLA spent a collective on nearly every step
    (bench-1b's batch 1 on 1x8: 15 in the draw, about 0.25 ms each on 8 forced CPU devices);
    gathering the rows costs one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.shape[0] % mesh.size == 0:
        return spread_rows(x)
    return jax.lax.with_sharding_constraint(x, P(*[None] * x.ndim))


def split_like_cache(x: jax.Array) -> jax.Array:
    """New keys or values [B, T, N, K], straight from their projections, or the stacked cache
    [L, B, S, N, K] they were written into, held to the cache's split wherever the key/value
    projections split the kv heads over other mesh axes than the cache does (`LOGICAL_TO_MESH`): where
    they cut heads the cache keeps whole (bench-1b's 4 on 1x8, the shipped model's 2), or where
    a batch too small for the data axis leaves it to the cache's heads (bench-1b's batch 1 on
    2x4). Left to XLA, the projections' split spreads into the cache inside the layer loop and
    the cache is moved back at every step's end, and each layer's keys inside attention:
    bench-1b on 1x8, 47 / 246 ms per decode step (batch 1 / 8) -> 33 / 95-108 (one device
    16.6 / 61-66). Both places are needed (the stack alone: 72 / 428 ms). Holding the new
    entries so before RoPE, not only at the write, keeps RoPE's halves of a head on one device:
    two gathers of a row's keys and values instead of seven collectives per layer. Where both
    split the heads alike XLA's choice stays (the constraint made bench-1b's 2x4 batch 8
    slower there: 92-95 vs 81-84 ms)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    *_, N, K = x.shape
    lead = 5 - x.ndim  # 1 for new entries (no layer axis), 0 for the stack
    spec = partition_spec(ACTIVATION_AXES["cache_kv"], (1,) * lead + x.shape, mesh)
    projection = partition_spec(PARAM_AXES["key"], (1, N * K), mesh)[-1]
    if axes_of(projection) == axes_of(spec[-2]):
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec[lead:]))
