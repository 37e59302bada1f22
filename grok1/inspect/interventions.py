"""Changing the forward pass and seeing what follows, with run_with_hooks: activation patching
(a residual from a clean prompt into a corrupted one, layer by layer and position by position)
and expert ablation (an expert that is never chosen, its tokens routed to their next choice)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from grok1 import hooks
from grok1.inspect.activations import all_layers, run_with_cache, run_with_hooks
from grok1.inspect.trace import expert_counts


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Patching:
    """`prob` [L, T]: the probability of `answer` (the clean prompt's next token) after the
    corrupted prompt, with blocks.{i}.<point> at position t taken from the clean run;
    `clean_prob`, `corrupt_prob`: that probability without patching."""

    point: str
    clean: np.ndarray
    corrupt: np.ndarray
    answer: int
    prob: np.ndarray
    clean_prob: float
    corrupt_prob: float


def patching(model: Any, clean: Any, corrupt: Any, point: str = "hook_resid_pre") -> Patching:
    """Patch layer point `point` ([B, T, ...] per position, e.g. hook_resid_pre) from `clean` into
    `corrupt` (int tokens [T] each, the same length), one (layer, position) at a time."""
    clean, corrupt = (model.check_tokens(np.asarray(t).reshape(1, -1)) for t in (clean, corrupt))
    if clean.shape != corrupt.shape:
        raise ValueError(f"the clean and corrupted prompts must have the same number of tokens, got "
                         f"{clean.shape[1]} and {corrupt.shape[1]}")
    if point not in hooks.LAYER_POINTS or point in hooks.ATTENTION_MATRIX_POINTS:
        raise ValueError(f"point must be a layer point indexed by position ([B, T, ...]), got {point!r}")
    clean_logits, cache = run_with_cache(model, clean, all_layers(model.config, point))
    answer = int(np.argmax(clean_logits[0, -1]))
    corrupt_logits = model.logits(corrupt)
    L, T = model.config.num_layers, clean.shape[1]
    # Row t of a batch of T copies of the corrupted prompt is patched at position t: one forward
    # pass (and one compiled program) per layer.
    rows = np.arange(T)
    prob = np.zeros((L, T))
    for i in range(L):
        source = cache[hooks.layer_name(point, i)][0]                            # [T, ...]
        patch = {hooks.layer_name(point, i): lambda v, name, s=source: v.at[rows, rows].set(s)}
        logits, _ = run_with_hooks(model, np.repeat(corrupt, T, axis=0), patch)
        prob[i] = _softmax(logits[:, -1])[:, answer]
    return Patching(point=point, clean=clean[0], corrupt=corrupt[0], answer=answer, prob=prob,
                    clean_prob=float(_softmax(clean_logits[0, -1])[answer]),
                    corrupt_prob=float(_softmax(corrupt_logits[0, -1])[answer]))


def next_token_loss(logits: np.ndarray, tokens: np.ndarray, pad_token: int) -> float:
    """Mean next-token cross-entropy (nats) of logits [B, T, V] on tokens [B, T], padding left out."""
    logits = logits[:, :-1].astype(np.float64)
    targets = tokens[:, 1:]
    log_probs = logits - logits.max(axis=-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    real = (targets != pad_token) & (tokens[:, :-1] != pad_token)
    return float(nll[real].mean())


@dataclasses.dataclass(frozen=True)
class Ablation:
    """`loss` [L, E]: the mean next-token loss with expert e of layer i never chosen (its weight in
    the router's softmax set to 0, so its tokens go to their next choice); `baseline` without;
    `load` [L, E] the share of the routings each expert receives without ablation."""

    loss: np.ndarray
    baseline: float
    load: np.ndarray
    tokens: int


def expert_ablation(model: Any, tokens: Any, layers: Optional[list[int]] = None) -> Ablation:
    """Ablate each expert of each layer in `layers` (default: all) in turn on int tokens [B, T]."""
    tokens = model.check_tokens(tokens)
    c = model.config
    layers = list(range(c.num_layers)) if layers is None else layers
    if any(not 0 <= i < c.num_layers for i in layers):
        raise ValueError(f"layers must lie in [0, {c.num_layers}), got {layers}")
    logits, cache = run_with_cache(model, tokens, all_layers(c, "mlp.hook_expert_indices"))
    real = tokens != c.pad_token
    chosen = cache.stack("mlp.hook_expert_indices")                               # [L, B, T, k]
    load = np.stack([expert_counts(chosen[i][real], c.num_experts) for i in range(c.num_layers)])
    loss = np.full((c.num_layers, c.num_experts), np.nan)
    # E copies of the batch, copy e with expert e ablated: one forward pass per layer.
    E, B = c.num_experts, len(tokens)
    never = np.repeat(np.eye(E, dtype=bool), B, axis=0)[:, None, :]              # [E*B, 1, E]
    copies = np.tile(tokens, (E, 1))
    for i in layers:
        hook = {f"blocks.{i}.mlp.hook_expert_weights": lambda v, name: jnp.where(never, 0, v)}
        ablated, _ = run_with_hooks(model, copies, hook)
        loss[i] = [next_token_loss(ablated[e * B:(e + 1) * B], tokens, c.pad_token) for e in range(E)]
    return Ablation(loss=loss, baseline=next_token_loss(logits, tokens, c.pad_token),
                    load=load / np.maximum(load.sum(axis=1, keepdims=True), 1), tokens=int(real.sum()))


def format_patching(p: Patching, tokenizer: Any = None) -> str:
    words = [repr(tokenizer.decode([int(t)])) if tokenizer is not None else str(int(t)) for t in p.clean]
    answer = repr(tokenizer.decode([p.answer])) if tokenizer is not None else str(p.answer)
    lines = [f"patching {p.point} from the clean prompt into the corrupted one: probability of the clean "
             f"answer {answer} (clean {p.clean_prob:.3f}, corrupted {p.corrupt_prob:.3f})",
             f"{'layer':>5}  " + " ".join(f"{w[:8]:>8}" for w in words)]
    for i, row in enumerate(p.prob):
        lines.append(f"{i:>5}  " + " ".join(f"{x:>8.3f}" for x in row))
    return "\n".join(lines)


def format_ablation(a: Ablation) -> str:
    L, E = a.loss.shape
    lines = [f"expert ablation on {a.tokens} tokens: loss increase (nats) with the expert never chosen; "
             f"baseline loss {a.baseline:.4f}",
             f"{'layer':>5}  " + " ".join(f"{'e' + str(e):>7}" for e in range(E))]
    for i in range(L):
        lines.append(f"{i:>5}  " + " ".join(f"{x - a.baseline:>+7.4f}" for x in a.loss[i]))
    return "\n".join(lines)
