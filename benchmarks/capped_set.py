"""A strongly capped golden set: how far bfloat16 compute is from the official model where almost
every attention logit is capped (issue 31, item 16).

    python benchmarks/capped_set.py make OUT      # two_layer's weights, query and key scales x 8
    (run the official Grok-1 code on OUT, full forward in bfloat16 on a 1x8 mesh, each prompt of
     OUT/golden.json; save the float32 logits as OUT/golden.npz, keys logits_0, logits_1, ...)
    python benchmarks/capped_set.py measure OUT   # mean |error| / std per prompt, float32 and bfloat16

`make` copies ../shared/golden/two_layer (prompts, config, checkpoint) and multiplies the block
scales of every query and key projection by 8 (a power of two: the int8 values and every other
rounding stay as they were), so the attention logits before the cap reach about 240 instead of
3.7. The official code is not part of this project: run it from its own repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOLDEN = REPO.parent / "shared" / "golden" / "two_layer"
SCALE = 8.0  # query and key scales x 8: attention logits x 64


def make(out: Path) -> None:
    """Write the capped set's checkpoint, config and prompts to `out` (not its golden logits)."""
    from grok1.checkpoint import read_config, read_tensor, tensor_specs, write_tensor

    if not GOLDEN.is_dir():
        sys.exit(f"capped_set.py: {GOLDEN} is missing; it needs ../shared/golden/two_layer")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(GOLDEN, tmp, ignore=shutil.ignore_patterns("golden.npz", "tensor_index.json"))
    for spec in tensor_specs(read_config(tmp)):
        if spec.module.endswith(("/query", "/key")):
            file = tmp / "ckpt-0" / spec.filename
            weight = read_tensor(file)
            scales = (weight.scales.astype(np.float32) * SCALE).astype(weight.scales.dtype)
            write_tensor(file, dataclasses.replace(weight, scales=scales))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"capped_set.py: wrote {out}; now run the official code on it to write {out}/golden.npz")


def measure(folder: Path) -> dict:
    """Mean |logit error| / std of the reference, per prompt, for float32 and bfloat16 compute,
    and the largest attention logit before the cap per prompt (float32 trace)."""
    import grok1

    prompts = json.loads((folder / "golden.json").read_text())["prompts"]
    reference = np.load(folder / "golden.npz")
    models = {dtype: grok1.load(folder, dtype=dtype, progress=False) for dtype in ("float32", "bfloat16")}
    result = {"max_logit_before_cap": [max(float(layer.logit_max_abs_before_cap)
                                           for layer in models["float32"].trace([p]).layers)
                                       for p in prompts]}
    for dtype, model in models.items():
        result[dtype] = [float(np.abs(model.logits([p])[0] - reference[f"logits_{i}"]).mean()
                               / reference[f"logits_{i}"].std()) for i, p in enumerate(prompts)]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["make", "measure"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.step == "make":
        make(args.folder)
    else:
        print(json.dumps(measure(args.folder), indent=1))


if __name__ == "__main__":
    main()
