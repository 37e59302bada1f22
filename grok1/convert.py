"""Checkpoint conversion from the command line.

    python -m grok1.convert quantize SRC DST [--blocks N] [--scale-dtype bfloat16]

turns the float linear weights of a checkpoint (`SRC/ckpt-0/` + `config.json`) into int8 with N
scale blocks along each input axis and writes the result in the official format to DST.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

from grok1 import checkpoint


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grok1.convert",
                                     description="Checkpoint tools for the official Grok-1 format.")
    commands = parser.add_subparsers(dest="command", required=True)
    quant = commands.add_parser("quantize", help="float linear weights -> int8 + block scales")
    quant.add_argument("src", help="folder with ckpt-0/ and config.json")
    quant.add_argument("dst", help="folder to write (ckpt-0/ and config.json)")
    quant.add_argument("--blocks", type=int, default=1, help="scale blocks along each input axis")
    quant.add_argument("--scale-dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    config = checkpoint.read_config(args.src)
    params: dict = {}
    for spec, value in checkpoint.iter_tensors(checkpoint.checkpoint_dir(args.src), config):
        params.setdefault(spec.module, {})[spec.param] = value
    scale_dtype = np.float32 if args.scale_dtype == "float32" else ml_dtypes.bfloat16
    quantized = checkpoint.quantize_params(params, config, args.blocks, scale_dtype)
    checkpoint.save(quantized, args.dst, config)
    print(f"wrote {args.dst}: {len(checkpoint.tensor_specs(config))} tensors, linear weights int8 "
          f"with {args.blocks} scale block(s) of {args.scale_dtype}")


if __name__ == "__main__":
    main()
