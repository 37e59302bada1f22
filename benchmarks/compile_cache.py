"""Time to first token of `python run.py` with an empty compilation cache, then with it filled.

    python benchmarks/compile_cache.py                 # the shipped model, 2 runs in a fresh folder
    python benchmarks/compile_cache.py --mesh 1x8 --cpu-devices 8

Each run is a fresh `run.py` process (greedy, 8 new tokens) with --compilation-cache pointing at
a temporary folder; the figure is run.py's own "first after X s" (from the start of generation:
compiling the prefill and decode steps, prefill, first token), plus the whole process's wall time.
The second run should find every step in the cache. Timings on a shared machine are noisy: the
runs go back to back, and the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_TOKEN = re.compile(r"first after ([\d.]+) s")


def timed_run(cache: str, extra: Sequence[str]) -> dict[str, float]:
    """One run.py process: seconds to its first token and in all."""
    command = [sys.executable, os.path.join(REPO, "run.py"), "--temperature", "0", "--max-new-tokens", "8",
               "--compilation-cache", cache, *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    match = FIRST_TOKEN.search(proc.stderr)
    if match is None:
        raise RuntimeError(f"no 'first after' figure in run.py's report: {proc.stderr[-500:]}")
    return {"first_token_s": float(match.group(1)), "wall_s": round(wall, 2)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", help="run.py --mesh")
    parser.add_argument("--cpu-devices", type=int, help="run.py --cpu-devices")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    extra = (["--mesh", args.mesh] if args.mesh else []) + \
            (["--cpu-devices", str(args.cpu_devices)] if args.cpu_devices else [])
    with tempfile.TemporaryDirectory(prefix="grok1-cache-bench-") as cache:
        load = os.getloadavg()[0]
        cold = timed_run(cache, extra)
        warm = timed_run(cache, extra)
        entries = len(os.listdir(cache))
    result = {"cold": cold, "warm": warm, "cache_entries": entries,
              "first_token_ratio": round(warm["first_token_s"] / cold["first_token_s"], 3),
              "load_average": [round(load, 1), round(os.getloadavg()[0], 1)], "extra_args": extra}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"first token: {cold['first_token_s']:.2f} s with an empty cache, {warm['first_token_s']:.2f} s "
              f"with it filled ({result['first_token_ratio']:.0%}); whole run {cold['wall_s']:.1f} s -> "
              f"{warm['wall_s']:.1f} s; {entries} cache entries; load average {result['load_average']}")
    return result


if __name__ == "__main__":
    main()
