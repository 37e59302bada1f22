"""Rows of a batch over the mesh's `data` axis, inside the model's steps.

The weights are split over every mesh axis, `data` included (sharding.py), so nothing in the
weights tells XLA to split the *work* by rows: left alone, a 2x4 mesh computes like 1x8 and
every device holds the hidden states and temporaries of all rows. `split_rows` pins the residual
stream [B, ...] to rows over `data`, each row whole on its devices, where the layer loop takes it
in and gives it back; each data group then computes only its rows, with the weights gathered
over `data` per layer when used.

Each row is whole because the products need it so: column-parallel products take their rows
whole and row-parallel ones give them back whole (one all-reduce per sublayer). Left to XLA, the
residual stream stayed split along d in the layer loop (as the embedding table then was), and
each layer reduced its norms and gathered its rows between devices: with the new keys' RoPE
(grok1/kernels.py, `split_like_cache`), 16 collectives per layer of bench-1b's decode step on
1x8, now 4.

It needs to know the mesh while the step is traced: `on_mesh(fn, mesh)` wraps a function (a
model's `apply`) so that it is traced with the mesh in context. Without one, or on a mesh of
one device, `split_rows` returns its input unchanged, so single-device programs are untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


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
    product that takes its rows one at a time (grok1/kernels.py), a row sliced out of rows split
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


def on_mesh(fn: Callable[..., Any], mesh: Optional[jax.sharding.Mesh]) -> Callable[..., Any]:
    """`fn`, traced with `mesh` in context so that `split_rows` applies (`fn` itself if no mesh)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced_on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_on_mesh
