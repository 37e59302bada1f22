"""Which kernel a product or attention takes on this platform, and the precision products ask
for: where the kernels branch on the backend (the model never does; the compute layout's chunk
length is the weights' own choice, grok1/weights/layout.py, `max_chunk`).

What XLA:CPU runs fast, measured on this project's 2-core machines (benchmarks/products.py):
- One row times a weight stored [out, in] (`row @ w.T`) is a matrix-vector product that streams
  the weight at memory bandwidth, with the int8 -> float32 convert and the block scales fused
  into it: int8 moves 4x fewer bytes than float32.
- Two to about sixteen rows in one product fall off that path (the convert is no longer fused:
  10-50x slower for int8 and bfloat16 weights), so up to ONE_ROW_PRODUCTS_UP_TO rows run as
  one-row products, each reading the weight again.
- A product fused with what produces its rows or with what consumes its result (an add, a
  multiply) is emitted as a plain loop or reads a transposed copy of the weight (20-50x slower),
  so the rows and each one-row product are fenced by optimization barriers.
Where grok1/kernels/native.py's kernel is available (CPU with AVX2, a C++ compiler), up to
NATIVE_ROWS_UP_TO rows of an int8/bfloat16 weight run through it instead: all rows in one pass
over the weight, on all cores, and each row may pick its own entry of a stack (a layer, an
expert) straight out of the whole stack (`LinearWeight.picked`): nothing is sliced or copied.
Many rows (prompts) run one product with the dequantised weight, which XLA materialises once,
and so do any rows of a float32 weight (a float checkpoint: XLA's float32 product of a few rows
reads the weight once). Accelerators compile one product in every case (weights in one chunk
there, `layout.max_chunk`), and run a decode step's experts as grouped products over the whole
stack (`ragged_products`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from grok1.kernels import native
from grok1.weights.layout import LinearWeight

# Up to this many rows, a product on CPU runs as one-row products (see the module docstring).
ONE_ROW_PRODUCTS_UP_TO = 16
# Up to this many rows (a decode step's rows, or its (token, expert) pairs), a product runs
# through the native kernel where it is available.
NATIVE_ROWS_UP_TO = 64
# Up to this many queries per row and kv head (new tokens x query heads per kv head: a decode
# step), attention over the cache runs through the native kernel where it is available; a
# prompt's many queries are products XLA runs well, and its per-query logits would not fit.
NATIVE_QUERIES_UP_TO = 64
# Up to this many (token, expert) pairs, a MoE layer on one accelerator runs as grouped products
# over the whole expert stack (`ragged_products`); more (a prompt) group rows per expert.
RAGGED_PAIRS_UP_TO = 128
# The smallest matrix tile of a Triton product (rows, columns and contraction).
TRITON_TILE = 16


def precision(dtype) -> jax.lax.Precision:
    """The precision of a product whose operands are `dtype`: on accelerators float32 operands
    in full float32 (HIGHEST), which they otherwise multiply as TensorFloat-32 (10-bit
    mantissas: on an H200 that broke the golden and equivalence tests in float32 and the float32
    attention of bfloat16 compute). CPUs multiply float32 in float32 anyway: DEFAULT there, so
    their compiled programs stay exactly what they were."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32) and jax.default_backend() != "cpu":
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def native_products(w: LinearWeight, rows: int) -> bool:
    """Whether `rows` rows times `w` run through the native kernel (native.py): on CPU, an int8
    or bfloat16 weight, at most NATIVE_ROWS_UP_TO rows, the kernel built and loaded; on one device
    a weight whose input axis is whole (`groups` 1), on a mesh a weight whose every device's
    shard is a weight of its own (`LinearWeight.device_split`)."""
    if (jax.default_backend() != "cpu" or rows > NATIVE_ROWS_UP_TO
            or jnp.dtype(w.dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16))):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        if w.device_split() is None:
            return False
    elif w.groups != 1:
        return False
    return native.available()


def native_attention(q: jax.Array, keys: jax.Array) -> bool:
    """Whether attention of q [B, T, N, G, K] over the cache `keys` runs through the native
    kernel: on CPU, at most NATIVE_QUERIES_UP_TO queries per row and kv head, a float32 or
    bfloat16 cache, the kernel built and loaded."""
    return (jax.default_backend() == "cpu" and q.shape[1] * q.shape[3] <= NATIVE_QUERIES_UP_TO
            and jnp.dtype(keys.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
            and native.available())


def one_row_products(weight_dtype, rows: int) -> bool:
    """Whether `rows` rows times a weight of `weight_dtype` run as one-row products: on CPU, up
    to ONE_ROW_PRODUCTS_UP_TO rows of a weight that needs a convert (int8, bfloat16). A float32
    weight is multiplied by all rows in one product, which reads it once."""
    return (jax.default_backend() == "cpu" and rows <= ONE_ROW_PRODUCTS_UP_TO
            and jnp.dtype(weight_dtype) != jnp.dtype(jnp.float32))


def operand_dtype(dtype):
    """The dtype a product's rows are rounded to in compute `dtype`: `dtype` on accelerators
    (bfloat16 operands run on the matrix units), float32 on CPU. A CPU multiplies in float32
    whatever the rows (`product_dtype`), and so did the official run on XLA:CPU that made the
    golden vectors: it rounded no product's operands (docs/ARCHITECTURE.md, "Where the model
    rounds"), and rounding them here only moved bfloat16 compute away from it."""
    if jax.default_backend() == "cpu":
        return jnp.float32
    return dtype


def product_dtype(weight_dtype, dtype):
    """The dtype a weight of `weight_dtype` is converted to inside a product whose rows are in
    `dtype`. On CPU float32: XLA:CPU fuses that convert into its one-row products. On
    accelerators the compute dtype when it holds the weight's values exactly (int8 or bfloat16
    values into bfloat16): the products of two bfloat16 operands are exact in float32, so the
    float32-accumulated sum is the same, and it runs on the matrix units instead of as a float32
    product."""
    exact = jnp.dtype(weight_dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16))
    if jax.default_backend() != "cpu" and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and exact:
        return jnp.bfloat16
    return jnp.float32


def ragged_products(tokens: int, pairs: int) -> bool:
    """Whether a MoE layer's (token, expert) pairs run as one grouped product per matrix over
    the whole expert stack (`ragged_linear`): on one accelerator, for a decode step of several
    tokens (2 to RAGGED_PAIRS_UP_TO pairs). There XLA's grouped product reads the int8 stack
    once with the convert fused (an H200, one MoE layer: 5.2-5.3 ms at 8 tokens against 7.0-7.6
    for an expert at a time or windows per expert, 6.6-7.0 against 7.8-8.2 at 32;
    benchmarks/gpu_kernels.py), but computes every expert on every row (dense in arithmetic:
    prompts group their rows by expert instead, 12.5 against 20.7 ms at 512 tokens); one token
    reads just its own experts (2.4-2.6 against 7.0 ms). One device only, so each weight's input
    axis is whole (`groups` 1), as `ragged_linear` takes it."""
    mesh = jax.sharding.get_abstract_mesh()
    return (jax.default_backend() != "cpu" and (mesh.empty or mesh.size == 1)
            and 1 < tokens and pairs <= RAGGED_PAIRS_UP_TO)


def pallas_experts(w: LinearWeight) -> bool:
    """Whether a MoE layer over the expert stack `w` runs through the Pallas grouped kernel
    (grok1/kernels/ragged.py), at any number of tokens: on one GPU (its Triton lowering), the
    input axis whole (`groups` 1). Each chosen expert is read once per block of its rows, scaled
    in the kernel, experts without rows are not read, and prompts compute only their chosen
    experts (XLA's grouped product reads and computes all of them there; issue 30). Opt-in
    (GROK1_PALLAS=1 in the environment, read when a step is traced) until a GPU has compiled it
    and timed it against XLA's paths (benchmarks/gpu.sh runs both): no GPU was lent to the
    session that wrote it, and a kernel that fails to compile must not stop every GPU user."""
    mesh = jax.sharding.get_abstract_mesh()
    return (jax.default_backend() == "gpu" and (mesh.empty or mesh.size == 1) and w.groups == 1
            and pallas_tiles_fit(w) and os.environ.get("GROK1_PALLAS") == "1")


def pallas_tiles_fit(w: LinearWeight) -> bool:
    """Whether the Pallas kernel's tiles of `w` are whole Triton matrix tiles: its output axis
    and each chunk of its input axis multiples of TRITON_TILE (the shipped model's 344-wide
    experts are not; Grok-1's are multiples of 128)."""
    return w.shape[-1] % TRITON_TILE == 0 and w.chunk_size % TRITON_TILE == 0


def pallas_interpret() -> bool:
    """Whether Pallas kernels run in interpret mode: on CPU, which has no Pallas lowering (the
    tests run the GPU kernels so, against the XLA path)."""
    return jax.default_backend() == "cpu"


def threads_per_device(mesh: Any) -> int:
    """Threads for each device's native kernel call on `mesh`: this process's cores shared among
    its devices of the mesh, whose programs run side by side (at least one each). Left to take
    all cores each, bench-1b's decode step on 8 forced devices over 2 cores (1x8, batch 1) spent
    72 ms of CPU time per step instead of 53 (wall 42 -> 34 ms; BENCHMARKS.md, session 9)."""
    devices = min(mesh.size // jax.process_count(), jax.local_device_count())
    return max(1, _cores() // max(1, devices))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
