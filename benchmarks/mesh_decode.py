"""Decode ms/step of bench-1b on one device and on meshes of forced CPU devices, back to back.

    python benchmarks/mesh_decode.py                       # one device, 1x1, 1x8, 2x4
    python benchmarks/mesh_decode.py none 1x8 --rounds 2   # alternate rounds: timings drift
    python benchmarks/mesh_decode.py --checkpoint checkpoints/small

Each mesh loads the checkpoint with `grok1.load(path, mesh=...)` and times the sampler's jitted
decode step (greedy, cache donated; `bench.measure_decode`) at batch 1 and 8 with 64 positions
already in the cache: two warm-up calls, then the median of --repeat. The 8 devices are forced onto this machine's
cores (`--xla_force_host_platform_device_count=8`, set here before jax is imported), so a mesh
shows its programs' and collectives' cost, not more compute. The first run writes bench-1b's
checkpoint (benchmarks/bench.py) if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py, beside this script)
import grok1  # noqa: E402
from grok1.config import PRESETS  # noqa: E402
from grok1.mesh import make_mesh  # noqa: E402

CONTEXT = 64  # positions already in the cache while decoding


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("meshes", nargs="*", default=["none", "1x1", "1x8", "2x4"],
                        help="'none' (one device, no mesh) or mesh specs such as 1x8, 2x4")
    parser.add_argument("--checkpoint", default=None, help="default: bench-1b's, written if missing")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    path = args.checkpoint or bench.bench_checkpoint(PRESETS["bench-1b"], "bench-1b")
    results: dict = {}
    for round_ in range(args.rounds):
        for spec in args.meshes:
            mesh = None if spec == "none" else make_mesh(spec, jax.devices()[:1] if spec == "1x1" else None)
            model = grok1.load(path, mesh=mesh, progress=False)
            for batch in args.batch:
                ms = round(1e3 * bench.measure_decode(model, batch, 1, args.repeat, CONTEXT)[1], 1)
                results.setdefault(f"{spec} b{batch}", []).append(ms)
                print(f"round {round_ + 1}  {spec:>5}  batch {batch:>2}  {ms:7.1f} ms/step  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
            del model
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
