"""`python -m grok1.analyze`: the logit lens, attention patterns, routing statistics, activation
patching and expert ablation of a checkpoint (the shipped model by default), printed as tables
and plotted with --plot (matplotlib). Mistakes are reported in one line, without a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from grok1.inference import load
from grok1.inspect import interventions, lens, plots, routing

PROG = "python -m grok1.analyze"
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "checkpoints", "small")


class UserError(Exception):
    """A mistake in the command line or the files it names."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", default=SHIPPED,
                        help="checkpoint folder (default: the shipped model)")
    common.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    common.add_argument("--mesh", default=None, help="device mesh such as 1x8 (default: one device)")
    common.add_argument("--plot", default=None, metavar="IMAGE",
                        help="also plot to this image, in the format its extension names (.png, .svg ...)")
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    a = sub.add_parser("lens", parents=[common], help="the logit lens of a prompt")
    a.add_argument("--prompt", required=True)
    a.add_argument("--top", type=int, default=5, help="top tokens kept per reading")
    a = sub.add_parser("attention", parents=[common], help="every head's attention pattern on a prompt")
    a.add_argument("--prompt", required=True)
    a.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    a = sub.add_parser("routing", parents=[common], help="expert load, preferred tokens, co-activation")
    a.add_argument("--text", required=True, nargs="+", metavar="FILE",
                   help="text files (or .npy arrays of token ids) routed through the model")
    a.add_argument("--window", type=int, default=0, help="tokens per forward row (default: the context)")
    a.add_argument("--batch", type=int, default=8, help="rows per forward pass")
    a.add_argument("--layer", type=int, default=0,
                   help="the layer whose experts' tokens and pairs are shown")
    a = sub.add_parser("patch", parents=[common],
                       help="patch a clean prompt's residual into a corrupted one")
    a.add_argument("--prompt", required=True, help="the clean prompt")
    a.add_argument("--corrupt", required=True, help="the corrupted prompt (the same number of tokens)")
    a.add_argument("--point", default="hook_resid_pre",
                   help="the layer point patched (default: hook_resid_pre)")
    a = sub.add_parser("ablate", parents=[common], help="the loss with each expert never chosen")
    a.add_argument("--text", required=True, metavar="FILE", help="a text file or a .npy array of token ids")
    a.add_argument("--windows", type=int, default=4, help="rows of --window tokens measured")
    a.add_argument("--window", type=int, default=0, help="tokens per row (default: the context)")
    return p


def check_plot(path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--plot: folder {folder} does not exist")
    try:
        plots.plot_format(path)
    except (ValueError, ImportError) as e:
        raise UserError(f"--plot: {e}") from None


def encode(model: Any, text: str) -> list[int]:
    """`text` as the model's token ids, BOS first when its config says so."""
    if model.tokenizer is None:
        raise UserError("the checkpoint has no tokenizer.model beside it")
    ids = model.tokenizer.encode(text)
    return [model.config.bos_token] + ids if model.config.add_bos else ids


def corpus(model: Any, paths: Sequence[str]) -> np.ndarray:
    """The token ids of text files (tokenized, BOS first) or .npy arrays of ids, concatenated."""
    parts = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--text: {path} is not a file")
        if path.endswith(".npy"):
            parts.append(np.load(path).reshape(-1))
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(np.asarray(encode(model, f.read())))
    return np.concatenate(parts).astype(np.int64)


def check(args: argparse.Namespace) -> None:
    """What can be checked before the model is loaded."""
    check_plot(args.plot)
    if not os.path.isdir(os.path.join(args.checkpoint, "ckpt-0")):
        raise UserError(f"--checkpoint: {args.checkpoint} holds no ckpt-0/ folder")


def run(args: argparse.Namespace, model: Any) -> None:
    """The analysis `args` name on `model` (a grok1.Model), printed, and plotted with --plot."""
    tok = model.tokenizer
    if args.analysis == "lens":
        result = lens.logit_lens(model, encode(model, args.prompt), top=args.top)
        print(lens.format_lens(result, tok))
        draw = lambda: plots.plot_lens(result, args.plot, tok)  # noqa: E731
    elif args.analysis == "attention":
        tokens = encode(model, args.prompt)
        layers = None if args.layers is None else [int(i) for i in args.layers.split(",")]
        patterns = lens.attention_patterns(model, tokens, layers)
        print(lens.format_patterns(patterns, np.asarray(tokens), tok, layers))
        draw = lambda: plots.plot_patterns(patterns, tokens, args.plot, tok, layers)  # noqa: E731
    elif args.analysis == "routing":
        if not 0 <= args.layer < model.config.num_layers:
            raise UserError(f"--layer must lie in [0, {model.config.num_layers}), got {args.layer}")
        result = routing.routing(model, corpus(model, args.text), args.window, args.batch)
        print(routing.format_routing(result, tok, args.layer))
        draw = lambda: plots.plot_routing(result, args.plot, args.layer)  # noqa: E731
    elif args.analysis == "patch":
        result = interventions.patching(model, encode(model, args.prompt), encode(model, args.corrupt),
                                        args.point)
        print(interventions.format_patching(result, tok))
        draw = lambda: plots.plot_patching(result, args.plot, tok)  # noqa: E731
    else:
        window = args.window or model.config.sequence_len
        tokens = corpus(model, [args.text])
        rows = min(args.windows, len(tokens) // window)
        if rows < 1:
            raise UserError(f"--text: {args.text} holds {len(tokens)} tokens, fewer than one window "
                            f"of {window}")
        result = interventions.expert_ablation(model, tokens[:rows * window].reshape(rows, window))
        print(interventions.format_ablation(result))
        draw = lambda: plots.plot_ablation(result, args.plot)  # noqa: E731
    if args.plot:
        draw()
        print(f"plotted to {args.plot}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, check, load the checkpoint (grok1.load), run; 2 on a mistake."""
    args = parser().parse_args(argv)
    try:
        check(args)
        run(args, load(args.checkpoint, dtype=args.dtype, mesh=args.mesh, progress=False))
    except (UserError, ValueError, ImportError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
