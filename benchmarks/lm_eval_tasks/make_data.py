"""Write the three small local datasets of the lm-evaluation-harness tasks in this folder, from
the held-out documents of the shipped model's corpus (Python's own docstrings, PSF-2.0; see
checkpoints/small/training.json): every text fits the small model's 256-token context.

    python benchmarks/lm_eval_tasks/make_data.py
"""

from __future__ import annotations

import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from grok1.tokenizer import Tokenizer                                  # noqa: E402
from grok1.train import corpus_documents, split_documents              # noqa: E402


def main() -> None:
    tokenizer = Tokenizer(os.path.join(REPO, "checkpoints", "small", "tokenizer.model"))
    _, heldout = split_documents(corpus_documents())
    rng = random.Random(0)
    sentences = [s.strip() for d in heldout for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " "))]
    sentences = [s for s in sentences if 8 <= len(s.split()) <= 30 and len(tokenizer.encode(s)) < 60]
    rng.shuffle(sentences)
    pool = sentences[:400]
    choice = []   # which of four endings completes the sentence (three are other sentences' endings)
    for sentence in pool[:24]:
        words = sentence.split()
        true = " " + " ".join(words[len(words) // 2:])
        others = rng.sample(pool[100:], 3)
        endings = [" " + " ".join(o.split()[len(o.split()) // 2:]) for o in others] + [true]
        rng.shuffle(endings)
        choice.append({"context": " ".join(words[:len(words) // 2]), "choices": endings,
                       "answer": endings.index(true)})
    documents = [{"text": d} for d in heldout if 20 <= len(tokenizer.encode(d)) <= 200][:16]
    ends = [{"prompt": " ".join(s.split()[:-3]), "answer": " " + " ".join(s.split()[-3:])}
            for s in pool[200:224]]
    for name, rows in (("continuation_choice", choice), ("heldout_documents", documents),
                       ("sentence_ends", ends)):
        path = os.path.join(HERE, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(rows)} documents")


if __name__ == "__main__":
    main()
