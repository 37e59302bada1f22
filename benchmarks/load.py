"""Checkpoint loading speed and memory against a plain read of the same files.

    python benchmarks/load.py --gb 2 --repeat 5 [--cold] [--workers 4]

Writes (once, cached in benchmarks/.cache/) an int8 checkpoint of about `--gb` GB in the official
format, then measures, each run in a fresh process, median of `--repeat`:
  - plain read: every file read sequentially into one reused buffer (`cat > /dev/null`);
  - fresh: every file read into its own new buffer, all kept: the least any loader must do to
    hold the data in RAM (new pages are faulted in and zeroed by the kernel first);
  - load: `grok1.checkpoint.load_params` onto one CPU device (the loader of this project);
  - unpickle: each file through the restricted unpickler, then `jax.device_put` (the simple way);
and reports GB/s, load/plain ratio, and peak RSS (ru_maxrss) against the checkpoint size.
`--cold` drops the page cache before every run (needs root), otherwise all runs are warm.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
sys.path.insert(0, str(REPO))


def bench_config(gb: float):
    """A Grok-1-shaped config (8 experts, int8 linear weights) of about `gb` GB: d=1024, and as
    many layers as the size asks; the largest tensor is then about 2% of the total."""
    from grok1.config import ModelConfig
    base = dict(vocab_size=32768, emb_size=1024, num_q_heads=8, num_kv_heads=8, key_size=128,
                widening_factor=8, num_experts=8, num_selected_experts=2, sequence_len=1024)
    one, two = (ModelConfig(num_layers=n, **base).param_count for n in (1, 2))
    per_layer, embeddings = two - one, 2 * (2 * one - two)  # int8 layers, bf16 embeddings
    return ModelConfig(num_layers=max(1, round((gb * 1e9 - embeddings) / per_layer)), **base)


def write_checkpoint(gb: float) -> tuple[pathlib.Path, object]:
    """Random int8 weights with bf16 block scales (8 blocks where they divide), bf16 elsewhere."""
    import ml_dtypes
    import numpy as np
    from grok1 import checkpoint
    from grok1.weights.quant import QuantizedWeight8bit

    config = bench_config(gb)
    path = CACHE / f"load-{config.num_layers}L-{config.emb_size}d"
    if (path / checkpoint.CONFIG_FILE).is_file():
        return path, config
    rng = np.random.default_rng(0)
    params: dict = {}
    for spec in checkpoint.tensor_specs(config):
        if spec.quantized:
            blocks = 8 if spec.shape[-2] % 8 == 0 else 1
            value = QuantizedWeight8bit(
                weight=rng.integers(-127, 128, spec.shape, dtype=np.int8),
                scales=rng.random((*spec.shape[:-2], blocks, spec.shape[-1]), np.float32)
                .astype(ml_dtypes.bfloat16))
        else:
            dtype = np.float32 if spec.module.endswith("router") else ml_dtypes.bfloat16
            value = rng.random(spec.shape, np.float32).astype(dtype)
        params.setdefault(spec.module, {})[spec.param] = value
    checkpoint.save(params, path, config)
    return path, config


def files_of(path: pathlib.Path) -> list[str]:
    ckpt = path / "ckpt-0"
    return [str(ckpt / name) for name in sorted(os.listdir(ckpt))]


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, path: str, workers: int) -> dict:
    """One measurement in this (fresh) process, after imports and backend start-up: seconds and
    peak RSS."""
    if mode != "plain":
        import jax
        from grok1 import checkpoint
        from grok1.checkpoint import reader
        jax.devices()
        config = checkpoint.read_config(path)
    start = time.perf_counter()
    if mode == "plain":
        buffer = bytearray(16 << 20)
        for file in files_of(pathlib.Path(path)):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    elif mode == "fresh":
        kept = []
        for file in files_of(pathlib.Path(path)):
            buffer = mmap.mmap(-1, os.path.getsize(file))
            with open(file, "rb", buffering=0) as f:
                f.readinto(buffer)
            kept.append(buffer)
    else:
        if mode == "load":
            params = checkpoint.load_params(path, config, workers=workers, progress=False)
        else:  # unpickle
            params = {}
            for spec in checkpoint.tensor_specs(config):
                file = os.path.join(path, "ckpt-0", spec.filename)
                value = jax.device_put(reader._unpickle(file))
                params.setdefault(spec.module, {})[spec.param] = value
        jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": peak_rss()}


def measure(mode: str, path: pathlib.Path, workers: int, cold: bool) -> dict:
    if cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--path", str(path),
                          "--workers", str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size to write (GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median reported)")
    parser.add_argument("--workers", type=int, default=4, help="reader threads of load_params")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    parser.add_argument("--modes", default="plain,fresh,load,unpickle")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.workers)))
        return

    path, config = write_checkpoint(args.gb)
    size = sum(os.path.getsize(f) for f in files_of(path))
    print(f"checkpoint {path} : {size / 1e9:.2f} GB in {len(files_of(path))} files "
          f"({config.num_layers} layers); {'cold' if args.cold else 'warm'} page cache; "
          f"{args.repeat} runs each; {os.cpu_count()} CPUs, {platform.machine()}")
    runs: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
    for _ in range(args.repeat):  # interleave modes so that machine load affects each alike
        for mode in runs:
            runs[mode].append(measure(mode, path, args.workers, args.cold))
    summary = {}
    for mode, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rss = statistics.median(r["peak_rss"] for r in results)
        summary[mode] = size / seconds / 1e9
        print(f"{mode:9s} {seconds:6.2f} s  {summary[mode]:5.2f} GB/s  peak RSS {rss / 1e9:5.2f} GB "
              f"= {rss / size:4.2f} x checkpoint  (runs: "
              f"{', '.join(format(r['seconds'], '.2f') for r in results)} s)")
    for base in ("plain", "fresh"):
        for mode in [m for m in summary if base in summary and m not in ("plain", base)]:
            print(f"{mode} throughput = {summary[mode] / summary[base]:.0%} of {base} read")


if __name__ == "__main__":
    main()
