"""Routing over a corpus: which experts each layer's tokens go to (load), the tokens each expert
prefers, and which experts fire together, in one layer (a token's top-k) and from one layer to
the next (the same token). Read from blocks.{i}.mlp.hook_expert_indices of the real forward
pass (run_with_cache), windows of the text at a time."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from grok1.inspect.activations import all_layers, run_with_cache
from grok1.inspect.trace import expert_counts


@dataclasses.dataclass(frozen=True)
class Routing:
    """Every token of a corpus with the experts it chose at every layer.

    `tokens` [N] the ids, `experts` [N, L, k] the chosen experts (highest weight first),
    `num_experts` E. The statistics below are computed from these."""

    tokens: np.ndarray
    experts: np.ndarray
    num_experts: int

    @property
    def load(self) -> np.ndarray:
        """[L, E] the share of the corpus's routings (k per token) each expert receives."""
        N, L, k = self.experts.shape
        counts = np.stack([expert_counts(self.experts[:, i], self.num_experts) for i in range(L)])
        return counts / max(N * k, 1)

    def co_activation(self, layer: int) -> np.ndarray:
        """[E, E] how many tokens chose both expert a and expert b at `layer` (a != b; the diagonal
        counts the tokens choosing a)."""
        E = self.num_experts
        chosen = np.zeros((len(self.tokens), E), np.int64)
        np.put_along_axis(chosen, self.experts[:, layer], 1, axis=1)
        return chosen.T @ chosen

    def transitions(self, layer: int) -> np.ndarray:
        """[E, E] the probability that a token choosing expert a at `layer` chooses expert b at
        `layer + 1` (rows sum to k where the expert was chosen at all)."""
        E = self.num_experts
        here = np.zeros((len(self.tokens), E))
        nxt = np.zeros((len(self.tokens), E))
        np.put_along_axis(here, self.experts[:, layer], 1, axis=1)
        np.put_along_axis(nxt, self.experts[:, layer + 1], 1, axis=1)
        return (here.T @ nxt) / np.maximum(here.sum(axis=0), 1)[:, None]

    def preferred_tokens(self, layer: int, expert: int, count: int = 8, min_occurrences: int = 5
                         ) -> list[tuple[int, float, int]]:
        """The tokens most often routed to `expert` at `layer`, among those occurring at least
        `min_occurrences` times and routed there at least once: [(token id, share of its
        occurrences that chose the expert, occurrences)], highest share first."""
        ids, occurrences = np.unique(self.tokens, return_counts=True)
        chose = np.any(self.experts[:, layer] == expert, axis=-1)
        hits = np.bincount(np.searchsorted(ids, self.tokens[chose]), minlength=len(ids))
        share = hits / occurrences
        keep = np.flatnonzero((occurrences >= min_occurrences) & (hits > 0))
        order = keep[np.lexsort((-occurrences[keep], -share[keep]))][:count]
        return [(int(ids[i]), float(share[i]), int(occurrences[i])) for i in order]


def routing(model: Any, tokens: Any, window: int = 0, batch: int = 8) -> Routing:
    """Route a corpus of int `tokens` [N] through `model` (a grok1.Model) in windows of `window`
    tokens (0: the model's sequence_len), `batch` windows per forward pass; the last partial
    window is right-padded, its padding left out of the statistics."""
    c = model.config
    tokens = np.asarray(tokens).reshape(-1)
    window = window or c.sequence_len
    if not 1 <= window <= c.sequence_len:
        raise ValueError(f"window must lie in [1, {c.sequence_len}] (the model's context), got {window}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if len(tokens) == 0:
        raise ValueError("no tokens to route: the corpus is empty")
    count = -(-len(tokens) // window)
    rows = np.full((count, window), c.pad_token, np.int64)
    rows.reshape(-1)[:len(tokens)] = tokens
    names = all_layers(c, "mlp.hook_expert_indices")
    experts = []
    for start in range(0, count, batch):
        part = rows[start:start + batch]
        if len(part) < batch:  # one batch shape: one compiled program
            part = np.concatenate([part, np.full((batch - len(part), window), c.pad_token)])
        _, cache = run_with_cache(model, part, names)
        experts.append(np.stack([cache[n] for n in names], axis=2).reshape(-1, c.num_layers,
                                                                             c.num_selected_experts))
    flat = rows.reshape(-1)
    real = np.zeros(count * window, bool)
    real[:len(tokens)] = True
    real &= flat != c.pad_token  # pad ids inside the text do not count either
    chosen = np.concatenate(experts)[:count * window]
    return Routing(tokens=flat[real].astype(np.int32), experts=chosen[real], num_experts=c.num_experts)


def format_routing(r: Routing, tokenizer: Any = None, layer: int = 0, per_expert: int = 6) -> str:
    """Load per layer, and at `layer` each expert's preferred tokens."""
    L, E = r.load.shape
    lines = [f"routing of {len(r.tokens)} tokens: share of the routings each expert receives per "
             f"layer (uniform: {1 / E:.3f})",
             f"{'layer':>5}  " + " ".join(f"{'e' + str(e):>6}" for e in range(E))]
    for i in range(L):
        lines.append(f"{i:>5}  " + " ".join(f"{share:>6.3f}" for share in r.load[i]))
    lines.append(f"\nlayer {layer}: the tokens each expert prefers (share of the token's occurrences "
                 f"routed to it, occurrences)")
    for e in range(E):
        words = [f"{tokenizer.decode([t]) if tokenizer is not None else t!r} {s:.0%} ({n})"
                 for t, s, n in r.preferred_tokens(layer, e, per_expert)]
        lines.append(f"  e{e}: " + ", ".join(words))
    return "\n".join(lines)
