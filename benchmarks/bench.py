"""Speed of grok1 on this machine, against the machine's own limits measured in the same run.

    python benchmarks/bench.py                    # bench-1b, as grok1.load sets it up by default
    python benchmarks/bench.py --json out.json    # also write the results as JSON
    python benchmarks/bench.py --preset tiny-... --dtype bfloat16 --layers 2   (see gpu.sh)

The "bench-1b" checkpoint (random weights in the official format: int8 linear weights with one
bf16 scale block, bf16 embeddings) is written once to benchmarks/.cache/ and loaded with
`grok1.load` defaults. Reported: prefill tokens/s (prompts of 128 and 512), decode tokens/s at
batch 1, 8 and 32 (the sampler's decode step, greedy) and at batch 1 and 8 sampled as run.py
samples by default (temperature 0.8, top-p 0.95, top-k 40, frequency penalty 0.2), time to first
token through `Model.generate`, peak RSS, and two ratios against limits measured here and now:

- MBU: bytes a decode step must read (the weights it touches, in their loaded dtype, plus the
  whole KV cache) / step time / the machine's read bandwidth (best of a numpy and an XLA sum
  over a 512 MiB array).
- MFU: prefill FLOPs (matmuls of the chosen experts, attention, router, one output row) / time /
  the matmul rate of `jnp.dot` at prefill shape in the compute dtype (bfloat16 shown too).

Every timing is the median of several repetitions. Other processes distort timings: the load
average at start and end is part of the report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CACHE = os.path.join(REPO, "benchmarks", ".cache")
READ_BYTES = 512 * 2 ** 20


def write_atomically(path: str, text: str) -> None:
    """Write `path` under a temporary name, then rename it: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the checkpoint ---------------------------------------------------------------------------

def random_params(config, seed: int = 0) -> dict:
    """Random weights in the release's layout: int8 linear weights (one bf16 scale block, drawn
    uniform so the float weight has std fan_in^-0.5), bf16 embeddings and norm scales, float32
    router. Drawing int8 directly keeps a grok-1-width checkpoint quick to create."""
    import ml_dtypes
    from grok1 import checkpoint
    from grok1.weights.quant import QuantizedWeight8bit

    rng = np.random.default_rng(seed)
    params: dict = {}
    for spec in checkpoint.tensor_specs(config):
        std = spec.shape[-2] ** -0.5 if len(spec.shape) >= 2 else 0.1
        if spec.param == "scale":
            value = (1 + std * rng.standard_normal(spec.shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        elif spec.param == "embeddings":
            value = rng.standard_normal(spec.shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
        elif spec.quantized:
            weight = random_int8(rng, spec.shape)
            scales_shape = spec.shape[:-2] + (1, spec.shape[-1])
            scales = np.full(scales_shape, std * 3 ** 0.5 / 127, ml_dtypes.bfloat16)
            value = QuantizedWeight8bit(weight=weight, scales=scales)
        else:
            value = std * rng.standard_normal(spec.shape, dtype=np.float32)
        params.setdefault(spec.module, {})[spec.param] = value
    return params


# Tensors larger than this draw from a pool of random int8 values instead of value by value
# (numpy draws about 0.15 G int8/s: a minute for a 2-layer Grok-1-width checkpoint); smaller
# ones, every bench-1b tensor included, are drawn as before, so that checkpoint is unchanged.
POOL_ABOVE = 2 ** 28
POOL_SIZE = 2 ** 26 + 2 ** 16 + 1


def random_int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform int8 values in [-127, 127] of `shape`; above POOL_ABOVE elements, runs of a
    random pool at random offsets (values only decide speed through routing, which the
    float32 router draws)."""
    size = int(np.prod(shape))
    if size <= POOL_ABOVE:
        return rng.integers(-127, 128, shape, dtype=np.int8)
    pool = rng.integers(-127, 128, POOL_SIZE, dtype=np.int8)
    out = np.empty(size, np.int8)
    for start in range(0, size, POOL_SIZE // 2):
        n = min(POOL_SIZE // 2, size - start)
        offset = int(rng.integers(0, POOL_SIZE - n + 1))
        out[start:start + n] = pool[offset:offset + n]
    return out.reshape(shape)


def bench_checkpoint(config, name: str) -> str:
    """The cached checkpoint folder for `config`, written on first use."""
    from grok1 import checkpoint

    path = os.path.join(CACHE, name)
    if not os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
        print(f"writing the {name} checkpoint to {path} (once) ...", flush=True)
        checkpoint.save(random_params(config), path, config)
    return path


# ---- timing and the machine's limits ----------------------------------------------------------

def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[float, float]:
    """(wall seconds of the `warmup` first calls together, compilation included; median wall
    seconds of `repeat` calls after them) of `fn()`, which must block until its work is done."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def median_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` (which must block until its work is done), after `warmup` calls."""
    return timed(fn, repeat, warmup)[1]


def read_bandwidth(repeat: int) -> dict[str, float]:
    """Bytes/s of reading a 512 MiB float32 array several ways; "best" is the machine's figure.

    numpy max (one thread), numpy and XLA matrix-vector products (what a decode step does) and
    an XLA sum: on this kind of machine the XLA matvec reads fastest. On an accelerator, XLA's
    sum and matvec of a 4 GiB array in device memory.
    """
    import jax
    import jax.numpy as jnp

    total, matvec = jax.jit(jnp.sum), jax.jit(jnp.dot)
    rates = {}
    if jax.default_backend() == "cpu":
        nbytes = READ_BYTES
        host = np.ones((nbytes // 4 // 8192, 8192), np.float32)
        vector = np.ones(8192, np.float32)
        device, device_vector = jnp.asarray(host), jnp.asarray(vector)
        rates["numpy_max"] = nbytes / median_seconds(lambda: host.max(), repeat)
        rates["numpy_matvec"] = nbytes / median_seconds(lambda: host @ vector, repeat)
    else:  # an accelerator reads 512 MiB in about 0.1 ms, near the launch overhead: read 8x more
        nbytes = 8 * READ_BYTES
        device = jnp.ones((nbytes // 4 // 8192, 8192), jnp.float32)
        device_vector = jnp.ones(8192, jnp.float32)
    rates["xla_sum"] = nbytes / median_seconds(lambda: total(device).block_until_ready(), repeat)
    rates["xla_matvec"] = nbytes / median_seconds(
        lambda: matvec(device, device_vector).block_until_ready(), repeat)
    return {**rates, "best": max(rates.values())}


def machine_limits(repeat: int, emb_size: int, ffn_size: int, dtypes: list[str]) -> dict:
    """The machine's read bandwidth and matmul rates (a prefill-sized product per dtype)."""
    import jax.numpy as jnp
    return {"read_bandwidth": read_bandwidth(repeat),
            **{f"matmul_{name}": matmul_rate(512, emb_size, ffn_size, jnp.dtype(name), repeat)
               for name in dtypes}}


def matmul_rate(m: int, k: int, n: int, dtype, repeat: int) -> float:
    """FLOP/s of `jnp.dot` [m, k] x [k, n] in `dtype` (float32 accumulation as the model does)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * m * k * n / median_seconds(lambda: dot(a, b).block_until_ready(), repeat)


# ---- what a step reads and computes -----------------------------------------------------------

def prefill_flops(config, tokens: int) -> int:
    """Useful FLOPs of a prefill of `tokens` (no padding counted): per token and layer the q/k/v/o
    projections, router, k chosen experts (3 matrices each) and attention over the prompt; plus
    the output projection of the last position only."""
    c = config
    d, f, H, N, K = c.emb_size, c.ffn_size, c.num_q_heads, c.num_kv_heads, c.key_size
    projections = 2 * (2 * d * H * K + 2 * d * N * K)
    experts = 2 * c.num_selected_experts * 3 * d * f
    attention = 2 * 2 * tokens * H * K
    per_token = c.num_layers * (projections + 2 * d * c.num_experts + experts + attention)
    return tokens * per_token + 2 * c.vocab_size * d


def expected_experts_used(config, batch: int) -> float:
    """Distinct experts a layer reads for `batch` tokens when each picks k of E uniformly."""
    E, k = config.num_experts, config.num_selected_experts
    return E * (1 - (1 - k / E) ** batch)


def decode_bytes(config, params: dict, batch: int, cache_len: int, cache_itemsize: int) -> float:
    """Bytes one decode step reads: every non-expert weight (embedding table included, as the
    output projection), the experts the batch's tokens choose (expected count), the KV cache."""
    import jax
    from grok1.params import is_expert_stack

    leaf_bytes = lambda tree: sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree))
    dense = experts = 0
    for module, values in params.items():
        size = leaf_bytes(list(values.values()))
        if is_expert_stack(module):
            experts += size
        else:
            dense += size
    fraction = expected_experts_used(config, batch) / config.num_experts
    kv = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.key_size * cache_itemsize
    return dense + fraction * experts + kv


# ---- the measurements -------------------------------------------------------------------------

def measure_prefill(model, tokens: int, repeat: int) -> tuple[float, float]:
    """Seconds to run a `tokens`-long prompt into a fresh cache (logits of its last position):
    (the first call, compilation included; the median after it)."""
    import jax
    import jax.numpy as jnp
    from grok1.mesh import on_mesh
    from grok1.model import transformed
    from grok1.runtime.compiling import jit

    apply = jit(on_mesh(transformed(model.config, model.dtype).apply, model.mesh))  # as Model.logits
    prompt = jnp.asarray(np.random.default_rng(1).integers(1, model.config.vocab_size, (1, tokens)),
                         jnp.int32)
    last = jnp.asarray([tokens - 1], jnp.int32)

    def run():
        logits, _ = apply(model.params, prompt, model.init_cache(1, tokens), last)
        logits.block_until_ready()
    return timed(run, repeat)


# run.py's default sampling settings (docs/TRAINING.md, "Default sampling")
RUN_PY_SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=40, frequency_penalty=0.2)


def measure_decode(model, batch: int, chunk: int, repeat: int, context: int,
                   sampling: dict | None = None) -> tuple[float, float]:
    """Seconds per decode step of `batch` rows with `context` tokens already in the cache: the
    sampler's jitted decode (greedy, or every row with the `sampling` settings of
    RUN_PY_SAMPLING's kind), `chunk` steps per call, cache donated, the state placed as the
    runner splits it on a mesh: (the two first calls, compilation included; the median seconds
    per step after them)."""
    import jax
    import jax.numpy as jnp
    from grok1.generation.runner import Runner
    from grok1.generation.steps import empty_state

    runner = Runner(model, slots=batch, decode_chunk=chunk)
    state = empty_state(model.config, model.dtype, batch)
    cache = state.cache
    cache = dataclasses.replace(cache, valid=cache.valid.at[:, :context].set(True),
                                length=jnp.full_like(cache.length, context))
    state = dataclasses.replace(state, cache=cache, tokens=jnp.arange(1, batch + 1, dtype=jnp.int32))
    if sampling:
        state = dataclasses.replace(state, seeds=jnp.arange(batch, dtype=jnp.uint32), **{
            name: jnp.full((batch,), value, getattr(state, name).dtype) for name, value in sampling.items()})
    # Committed to its devices as the runner's own outputs are, so the first call compiles the
    # step the later calls run (an uncommitted state compiled a second, unused program).
    state = jax.device_put(state, runner._state_sharding or jax.devices()[0])
    holder = {"state": state}

    def run():
        holder["state"], tokens, _ = runner.decode(model.params, holder["state"])
        tokens.block_until_ready()
    # The first call's state was made outside jit (committed differently), so the second
    # call compiles once more: two warm-up calls.
    repeat = min(repeat, (model.config.sequence_len - context) // chunk - 2)
    first, step = timed(run, repeat, warmup=2)
    return first, step / chunk


def measure_first_token(model, prompt_len: int, repeat: int) -> float:
    """Seconds for `Model.generate` to return one new token for a `prompt_len`-token prompt."""
    prompt = [int(t) for t in np.random.default_rng(2).integers(1, model.config.vocab_size, prompt_len)]
    return median_seconds(lambda: model.generate([prompt], max_new_tokens=1, temperature=0.0), repeat)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device, where its backend reports it (GPUs; not CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---- the report -------------------------------------------------------------------------------

def bench_config(args: argparse.Namespace):
    """(config, cache name): the preset, with --layers and --tiny applied."""
    from grok1.config import PRESETS

    config, name = PRESETS[args.preset], args.preset
    if args.layers:
        config, name = config.replace(num_layers=args.layers), f"{name}-{args.layers}layers"
    if args.tiny:  # same architecture and code path, small enough to run anywhere in seconds
        config = config.replace(vocab_size=1024, emb_size=128, num_q_heads=4, num_kv_heads=2,
                                key_size=32, sequence_len=min(config.sequence_len, 1024))
        name = f"{name}-tiny"
    return config, name


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import grok1

    config, name = bench_config(args)
    load_start = os.getloadavg()
    path = bench_checkpoint(config, name)

    start = time.perf_counter()
    model = grok1.load(path, dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    compute = jnp.dtype(model.dtype)
    r = args.repeat

    def measure_limits() -> dict:
        # In a process of its own, so that its arrays (512 MiB read twice) do not count in the
        # model's peak RSS.
        dtypes = sorted({compute.name, "bfloat16"})
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(machine_limits, r, config.emb_size, config.ffn_size, dtypes).result()

    # Limits are measured before and after the workload and the best of both is used: other
    # processes on the machine can only lower them.
    limits_before = measure_limits()

    prefill_runs = {tokens: measure_prefill(model, tokens, r) for tokens in args.prefill}
    decode_runs = {batch: measure_decode(model, batch, args.chunk, r, args.context)
                   for batch in args.batch}
    sampled_seconds = {batch: measure_decode(model, batch, args.chunk, r, args.context, RUN_PY_SAMPLING)[1]
                       for batch in args.sampled}
    prefill_seconds = {tokens: seconds for tokens, (_, seconds) in prefill_runs.items()}
    decode_seconds = {batch: seconds for batch, (_, seconds) in decode_runs.items()}
    first_calls = {**{f"prefill {tokens}": first for tokens, (first, _) in prefill_runs.items()},
                   **{f"decode batch {batch}": first for batch, (first, _) in decode_runs.items()}}
    first_token = {n: measure_first_token(model, n, r) for n in args.first_token}
    limits_after = measure_limits()
    limits = {"read_bandwidth": {k: max(v, limits_after["read_bandwidth"][k])
                                 for k, v in limits_before["read_bandwidth"].items()},
              **{k: max(v, limits_after[k]) for k, v in limits_before.items() if k.startswith("matmul_")}}

    prefill = {}
    for tokens, seconds in prefill_seconds.items():
        flops = prefill_flops(config, tokens)
        prefill[tokens] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "flops": flops,
                           "mfu": flops / seconds / limits[f"matmul_{compute.name}"],
                           "mfu_vs_bfloat16": flops / seconds / limits["matmul_bfloat16"]}

    decode = {}
    cache_itemsize = compute.itemsize
    for batch, step in decode_seconds.items():
        nbytes = decode_bytes(config, model.params, batch, config.sequence_len, cache_itemsize)
        decode[batch] = {"step_seconds": step, "tokens_per_s": batch / step, "bytes_per_step": nbytes,
                         "mbu": nbytes / step / limits["read_bandwidth"]["best"]}

    decode_sampled = {batch: {"step_seconds": step, "tokens_per_s": batch / step,
                              "slower_than_greedy": step / decode_seconds[batch] if batch in decode_seconds else None}
                      for batch, step in sampled_seconds.items()}

    return {
        "preset": name, "config": config.to_dict(), "compute_dtype": compute.name,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "jax": jax.__version__, "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "load_seconds": load_seconds, "limits": limits, "limits_before": limits_before,
        "limits_after": limits_after, "prefill": prefill, "decode": decode,
        "decode_sampled": decode_sampled, "sampling": RUN_PY_SAMPLING,
        "decode_chunk": args.chunk, "decode_context": args.context,
        "time_to_first_token_s": first_token, "first_call_seconds": first_calls,
        "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(),
        "checkpoint_bytes": sum(os.path.getsize(os.path.join(folder, name))
                                for folder, _, names in os.walk(path) for name in names),
    }


def format_report(res: dict) -> str:
    lim = res["limits"]
    bw = lim["read_bandwidth"]
    lines = [
        f"grok1 benchmark: {res['preset']} ({res['config']['num_layers']} layers), "
        f"{res['compute_dtype']} on {res['backend']} ({res['device']}), jax {res['jax']}",
        f"{res['machine']}, {res['date_utc']}, load average "
        f"{res['load_average_start'][0]:.2f} -> {res['load_average_end'][0]:.2f}",
        "read bandwidth (GB/s): " + ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f}" for k, v in bw.items()) + "; "
        + ", ".join(f"{k.split('_', 1)[1]} matmul {v / 1e9:.0f} GFLOP/s"
                    for k, v in lim.items() if k.startswith("matmul_")),
        "",
        f"{'measure':<28}{'value':>14}  {'ratio':>28}",
    ]
    for tokens, p in res["prefill"].items():
        ratio = f"MFU {p['mfu']:.0%} (of bf16 rate {p['mfu_vs_bfloat16']:.0%})"
        lines.append(f"{f'prefill {tokens} tokens':<28}{p['tokens_per_s']:>10.0f} t/s  {ratio:>28}")
    for batch, dcd in res["decode"].items():
        ratio = f"MBU {dcd['mbu']:.0%} ({dcd['step_seconds'] * 1e3:.1f} ms/step)"
        lines.append(f"{f'decode batch {batch}':<28}{dcd['tokens_per_s']:>10.1f} t/s  {ratio:>28}")
    for batch, dcd in res.get("decode_sampled", {}).items():
        ratio = f"{dcd['step_seconds'] * 1e3:.1f} ms/step" + (
            f", {dcd['slower_than_greedy']:.2f}x greedy" if dcd["slower_than_greedy"] else "")
        lines.append(f"{f'decode batch {batch}, sampled':<28}{dcd['tokens_per_s']:>10.1f} t/s  {ratio:>28}")
    for n, s in res["time_to_first_token_s"].items():
        lines.append(f"{f'time to first token ({n})':<28}{s * 1e3:>11.0f} ms")
    lines.append(f"{'load (grok1.load)':<28}{res['load_seconds']:>12.1f} s")
    for name, seconds in res.get("first_call_seconds", {}).items():
        lines.append(f"{f'first calls, {name}':<28}{seconds:>12.1f} s   (compilation included)")
    if res.get("peak_device_bytes"):
        lines.append(f"{'peak device memory':<28}{res['peak_device_bytes'] / 2 ** 30:>10.2f} GiB")
    lines.append(f"{'peak RSS':<28}{res['peak_rss_bytes'] / 2 ** 30:>10.2f} GiB   "
                 f"{res['peak_rss_bytes'] / res['checkpoint_bytes']:.2f} x the checkpoint on disk "
                 f"(load, prompts and decoding; the machine's limits are measured in another process)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-1b", help="grok1.PRESETS name (default bench-1b)")
    parser.add_argument("--layers", type=int, default=0, help="override num_layers (0: the preset's)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: grok1.load's)")
    parser.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--sampled", type=int, nargs="*", default=[1, 8],
                        help="batches also decoded with run.py's default sampling (none: skip)")
    parser.add_argument("--first-token", type=int, nargs="*", default=[128])
    parser.add_argument("--chunk", type=int, default=1,
                        help="decode steps per jitted call (default 1, as grok1's Engine decodes)")
    parser.add_argument("--context", type=int, default=128, help="tokens in the cache while decoding")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--tiny", action="store_true",
                        help="shrink the preset's width (a quick check of the whole pipeline)")
    args = parser.parse_args(argv)
    from grok1.config import PRESETS
    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    for name in ("prefill", "batch", "sampled", "first_token"):
        if any(n < 1 for n in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be positive integers")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(format_report(res))
    text = json.dumps(res, indent=1, default=str)
    if args.json:
        write_atomically(args.json, text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
