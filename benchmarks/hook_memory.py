"""What asking for hook points adds to device memory on a 64-layer config (issue 28).

Compiles `run_with_cache`'s program from abstract parameters (no weights) for: no names, a few
names, and one point at every layer, and prints XLA's memory analysis of each (bytes of the
outputs and of the temporaries), beside the bytes of the arrays asked for:
    python benchmarks/hook_memory.py [--layers 64] [--batch 2] [--tokens 256]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grok1.config import ModelConfig  # noqa: E402
from grok1.inspect.activations import abstract_program, all_layers  # noqa: E402
from grok1.model import param_shapes  # noqa: E402
from grok1.weights.stacking import stack_layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    config = ModelConfig(vocab_size=4096, emb_size=256, num_layers=args.layers, num_q_heads=8,
                         num_kv_heads=2, key_size=32, widening_factor=2, num_experts=8,
                         num_selected_experts=2, sequence_len=args.tokens)
    params = jax.eval_shape(stack_layers, param_shapes(config))
    tokens = jax.ShapeDtypeStruct((args.batch, args.tokens), np.int32)
    L = args.layers
    cases = {"no names": [],
             "3 names": [f"blocks.{L // 6}.hook_resid_post", f"blocks.{L - 1}.hook_resid_post",
                         f"blocks.{L // 2}.mlp.hook_expert_indices"],
             "hook_resid_post x all layers": all_layers(config, "hook_resid_post")}
    residual = args.batch * args.tokens * config.emb_size * 4
    asked = {"no names": 0, "3 names": 2 * residual + args.batch * args.tokens * 2 * 4,
             "hook_resid_post x all layers": L * residual}
    print(f"{L} layers, d={config.emb_size}, batch {args.batch} x {args.tokens} tokens, float32; "
          f"one residual [B, T, d] = {residual:,} bytes")
    print(f"{'names':<30} {'asked (bytes)':>14} {'outputs':>12} {'temporaries':>12}")
    for name, names in cases.items():
        m = abstract_program(config, np.float32, params, tokens, names).memory_analysis()
        print(f"{name:<30} {asked[name]:>14,} {m.output_size_in_bytes:>12,} {m.temp_size_in_bytes:>12,}")


if __name__ == "__main__":
    main()
