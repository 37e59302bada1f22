"""The kernels: how rows are multiplied by weights, how a decode step attends over the cache, and
how the chosen experts run. The model calls these names and nothing below them; which kernel
runs (native CPU, XLA, grouped products on accelerators) is decided inside, per platform.

- products.py    `linear` (any weight form), `times_table` and `table_rows` (the embedding table)
- attention.py   `attention_over_cache` (a decode step's attention over the stacked cache)
- experts.py     `moe` (the chosen experts of each token; GROUPED_PRODUCTS for the official tree)
- platform.py    which kernel where, and `precision` (full float32 products on accelerators)
- xla.py         the XLA bodies; native.py and the .cc files beside it, the native CPU kernels
- ragged.py      the Pallas grouped expert kernel (GPUs' MoE path with GROK1_PALLAS=1; interpret mode on CPU)
"""

from grok1.kernels.attention import attention_over_cache
from grok1.kernels.experts import GROUPED_PRODUCTS, moe
from grok1.kernels.platform import precision
from grok1.kernels.products import linear, table_rows, times_table

__all__ = ["GROUPED_PRODUCTS", "attention_over_cache", "linear", "moe", "precision", "table_rows",
           "times_table"]
