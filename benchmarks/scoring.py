"""Scoring (`Model.score`: each prompt token's log-probability) against prefill, on bench-1b.

    python benchmarks/scoring.py                 # throughput and memory, one JSON line per figure
    python benchmarks/scoring.py --json out.json

- Throughput: tokens per second of the engine's scoring step (`Runner.score`: prompt [1, T] ->
  log-probabilities, log-softmax and gather beside the output projection) and of bench.py's
  prefill (`measure_prefill`: the prompt into a fresh cache, logits of its last position only),
  timed alternately in the same process, median of --repeat calls each. Scoring computes the output
  projection at every position (the softmax needs every logit); prefill at one. `flop_bound` is
  the ratio scoring would reach at prefill's FLOP rate (bench.py's prefill FLOPs against those
  plus 2 (T - 1) d V).
- Memory: peak RSS of a fresh process that loads bench-1b (context raised to 2048) and scores one
  2048-token prompt, against one that returns that prompt's logits (`Model.logits`, [1, 2048,
  131072] float32); each also reports its RSS after loading, before the call.

The machine is shared: other processes distort timings (the load average is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

MEMORY_PROMPT = 2048

MEMORY_CHILD = """
import dataclasses, resource, sys, numpy as np, grok1
from grok1 import checkpoint
path, what, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = dataclasses.replace(checkpoint.read_config(path), sequence_len=tokens)
model = grok1.load(path, config=config)
prompt = np.random.default_rng(1).integers(3, config.vocab_size, (1, tokens)).astype(np.int32)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
loaded = rss()
if what == "score":
    out = model.score([prompt[0]])[0].logprobs
else:
    out = model.logits(prompt)
print(f"{loaded:.3f} {rss():.3f} {out.nbytes}")
"""


def measure_memory(path: str, what: str, tokens: int) -> dict:
    """Peak RSS (GiB) of a fresh process scoring, or returning the logits of, one prompt."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, path, what, str(tokens)], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    loaded, peak, nbytes = out.stdout.split()[-3:]
    return {"peak_rss_gib": float(peak), "rss_after_load_gib": float(loaded), "result_bytes": int(nbytes)}


def measure_throughput(model, tokens: int, repeat: int) -> dict:
    """Tokens/s of the scoring step and of bench.py's prefill, alternating call by call."""
    import jax
    from bench import measure_prefill, prefill_flops
    from grok1.generation.runner import runner_for

    runner = runner_for(model, 1)
    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size, (1, tokens)).astype(np.int32)

    def score():
        jax.block_until_ready(runner.score(model.params, prompt, 0))
    score()                                     # compile
    prefill_seconds, score_seconds = [], []
    for _ in range(repeat):
        prefill_seconds.append(measure_prefill(model, tokens, 1)[1])
        start = time.perf_counter()
        score()
        score_seconds.append(time.perf_counter() - start)
    prefill, scoring = float(np.median(prefill_seconds)), float(np.median(score_seconds))
    # The most scoring can reach at prefill's FLOP rate: it adds the output projection of every
    # position but the last (2 (T - 1) d V FLOPs) to prefill's.
    flops = prefill_flops(model.config, tokens)
    extra = 2 * (tokens - 1) * model.config.emb_size * model.config.vocab_size
    return {"tokens": tokens, "prefill_tokens_per_s": tokens / prefill,
            "score_tokens_per_s": tokens / scoring, "score_over_prefill": prefill / scoring, "flop_bound": flops / (flops + extra)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory-tokens", type=int, default=MEMORY_PROMPT)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    import grok1
    from bench import CACHE, bench_checkpoint
    from grok1.config import PRESETS

    path = bench_checkpoint(PRESETS["bench-1b"], "bench-1b")
    assert os.path.dirname(path) == CACHE
    load_start = os.getloadavg()
    model = grok1.load(path)
    results = {"machine_load_start": load_start,
               "throughput": [measure_throughput(model, t, args.repeat) for t in args.tokens]}
    del model
    results["memory"] = {what: measure_memory(path, what, args.memory_tokens) for what in ("score", "logits")}
    results["memory"]["tokens"] = args.memory_tokens
    results["machine_load_end"] = os.getloadavg()
    results["peak_rss_this_process_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
