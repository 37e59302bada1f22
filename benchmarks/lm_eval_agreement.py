"""Do lm-evaluation-harness's log-likelihoods, computed through `run.py --serve`, equal
`Model.score`'s? Reads the per-sample logs of an `lm_eval ... --log_samples` run of the local tasks
in benchmarks/lm_eval_tasks/, tokenizes each request as lm-eval does with the server's remote
tokenizer (trailing spaces of the context moved to the continuation; context and whole encoded
without BOS; a rolling document after the BOS prefix token, in one window: the documents fit the
context) and prints the largest difference.

    python benchmarks/lm_eval_agreement.py OUTPUT_PATH/small [--checkpoint checkpoints/small]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def requests_of(sample: dict) -> list[tuple[str, str, float]]:
    """(context, continuation, lm-eval's log-likelihood) of each request of a logged sample."""
    out = []
    keys = sorted(sample["arguments"], key=lambda k: int(k.rsplit("_", 1)[1]))
    for key, resp in zip(keys, sample["resps"]):
        args = sample["arguments"][key]
        value = resp[0][0] if isinstance(resp[0], list) else resp[0]
        out.append((args["arg_0"], args.get("arg_1"), float(value)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="the folder of lm_eval's samples_*.jsonl files")
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "checkpoints", "small"))
    args = parser.parse_args()
    import grok1
    model = grok1.load(args.checkpoint)
    encode, bos = model.tokenizer.encode, model.config.bos_token
    pairs, rolling = [], []
    for path in sorted(glob.glob(os.path.join(args.samples, "samples_*.jsonl"))):
        for line in open(path):
            sample = json.loads(line)
            for context, continuation, value in ([] if "exact_match" in sample else requests_of(sample)):
                if continuation is None:                       # loglikelihood_rolling
                    rolling.append(([bos, *encode(context)], 1, value))
                    continue
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                whole, start = encode(context + continuation), len(encode(context))
                pairs.append((whole, start, value))
    cases = pairs + rolling
    scores = model.score([ids for ids, _, _ in cases])
    diffs = [abs(float(score.logprobs[start - 1:].sum()) - value)
             for (ids, start, value), score in zip(cases, scores)]
    print(json.dumps({"loglikelihood_requests": len(pairs), "rolling_documents": len(rolling),
                      "max_abs_difference": max(diffs), "mean_abs_difference": sum(diffs) / len(diffs)}))


if __name__ == "__main__":
    main()
