"""How the shipped small model reads: BOS or not, and which default sampling settings run.py uses.

    python benchmarks/sampling.py bos                 # held-out loss with and without [BOS]
    python benchmarks/sampling.py settings [NAME ...] # 8 prompts: early EOS and loops per setting

`bos` scores every held-out document of grok1.train's split (up to the 256-token context, [EOS]
appended) on the same targets, once after [BOS] and once without it, through `Model.logits`.
`settings` continues 8 prompts (greedy: once; sampled: with 20 seeds each) for 100 new tokens,
and counts completions that ended at EOS before 40 tokens, completions that loop (a 4-token
sequence three times or more), and the mean negative log-likelihood of the generated tokens under
the model (lower: closer to the text the model would write; greedy loops score lowest). Results
go to stdout as JSON lines; the figures in docs/TRAINING.md come from these commands.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grok1  # noqa: E402
from grok1.train import BOS, EOS, corpus_documents, split_documents  # noqa: E402

PROMPTS = ["Once upon a time", "The function returns", "The module", "A list", "The return statement",
           "When the interpreter starts", "In Python, a class", "The answer is"]
NEW_TOKENS = 100
SEEDS = range(100, 120)
EARLY = 40

# name -> (BOS before the prompt, sampling settings)
SETTINGS = {
    "before": (False, dict(temperature=0.8, top_p=0.95, top_k=40)),
    "bos": (True, dict(temperature=0.8, top_p=0.95, top_k=40)),
    "bos-f0.3-p0.3": (True, dict(temperature=0.8, top_p=0.95, top_k=40, frequency_penalty=0.3,
                                 presence_penalty=0.3)),
    "bos-t0.7-f0.3-p0.3": (True, dict(temperature=0.7, top_p=0.95, top_k=40, frequency_penalty=0.3,
                                      presence_penalty=0.3)),
    "bos-f0.2": (True, dict(temperature=0.8, top_p=0.95, top_k=40, frequency_penalty=0.2)),
    "bos-p0.2": (True, dict(temperature=0.8, top_p=0.95, top_k=40, presence_penalty=0.2)),
    "bos-t0.7-f0.2": (True, dict(temperature=0.7, top_p=0.95, top_k=40, frequency_penalty=0.2)),
    "greedy-before": (False, dict(temperature=0)),
    "greedy-bos": (True, dict(temperature=0)),
    "greedy-bos-f0.2": (True, dict(temperature=0, frequency_penalty=0.2)),
    "greedy-bos-f0.3-p0.3": (True, dict(temperature=0, frequency_penalty=0.3, presence_penalty=0.3)),
}


def log_probs(model, rows: list[list[int]]) -> np.ndarray:
    """log-softmax of the logits of right-padded rows [B, T, V] (float64)."""
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row
    logits = model.logits(tokens).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def bos(model) -> dict:
    """Mean held-out NLL (nats) of the same targets with and without [BOS] before each document."""
    _, heldout = split_documents(corpus_documents())
    length = model.config.sequence_len
    docs = [(model.tokenizer.encode(d) + [EOS])[:length] for d in heldout]
    result = {}
    for with_bos in (False, True):
        losses, first = [], []
        for start in range(0, len(docs), 16):
            chunk = docs[start:start + 16]
            lp = log_probs(model, [([BOS] + d[:-1]) if with_bos else d[:-1] for d in chunk])
            for r, doc in enumerate(chunk):
                targets = np.asarray(doc[1:])
                nll = -lp[r, np.arange(len(targets)) + with_bos, targets]
                losses.extend(nll)
                first.extend(nll[:8])
        result["with_bos" if with_bos else "without_bos"] = {
            "loss": round(float(np.mean(losses)), 4), "loss_first_8_targets": round(float(np.mean(first)), 4),
            "targets": len(losses)}
    result["documents"] = len(docs)
    return result


def loops(tokens: list[int]) -> bool:
    grams = collections.Counter(tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3))
    return bool(grams) and max(grams.values()) >= 3


def continue_prompts(model, with_bos: bool, settings: dict) -> dict:
    seeds = [0] if settings["temperature"] == 0 else list(SEEDS)
    prompts = [([BOS] if with_bos else []) + model.tokenizer.encode(p) for p in PROMPTS for _ in seeds]
    start = time.perf_counter()
    completions = model.generate(prompts, max_new_tokens=NEW_TOKENS, seed=[s for _ in PROMPTS for s in seeds],
                                 **settings)
    seconds = time.perf_counter() - start
    nll = []
    for i in range(0, len(prompts), 32):
        pairs = list(zip(prompts[i:i + 32], completions[i:i + 32]))
        lp = log_probs(model, [p + c.token_ids for p, c in pairs])
        for r, (p, c) in enumerate(pairs):
            nll.extend(-lp[r, np.arange(len(p) - 1, len(p) + len(c.token_ids) - 1), c.token_ids])
    return {"completions": len(completions),
            "eos_before_40": sum(c.finish_reason == "stop" and len(c.token_ids) < EARLY for c in completions),
            "eos": sum(c.finish_reason == "stop" for c in completions),
            "loops": sum(loops(c.token_ids) for c in completions),
            "mean_tokens": round(float(np.mean([len(c.token_ids) for c in completions])), 1),
            "nll": round(float(np.mean(nll)), 3), "seconds": round(seconds, 1),
            "first_sample_per_prompt": [PROMPTS[i // len(seeds)] + completions[i].text
                                        for i in range(0, len(completions), len(seeds))]}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("bos", "settings"):
        print(__doc__)
        return 2
    model = grok1.load(REPO / "checkpoints" / "small", dtype="float32", progress=False)
    if argv[0] == "bos":
        print(json.dumps(bos(model)))
        return 0
    for name in argv[1:] or list(SETTINGS):
        with_bos, settings = SETTINGS[name]
        print(json.dumps({"name": name, "bos": with_bos, **settings, **continue_prompts(model, with_bos, settings)},
                         ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
