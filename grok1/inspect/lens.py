"""Reading the residual stream: the logit lens (each layer's residual through the model's own
final norm and unembedding) and the attention pattern of every head, for one prompt."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok1.config import ModelConfig
from grok1.inspect.activations import all_layers, run_with_cache
from grok1.mesh import on_mesh
from grok1.model import LanguageModel
from grok1.runtime.compiling import jit


@functools.lru_cache(maxsize=8)
def _reader(config: ModelConfig, dtype, mesh: Optional[jax.sharding.Mesh], top: int):
    """jit of params, residuals [n, B, T, d], final tokens [B, T] -> (logits of each, their top
    tokens and probabilities, and the probability of the final token), through `LanguageModel.unembed`."""
    unembed = hk.without_apply_rng(hk.transform(lambda h: LanguageModel(config, dtype).unembed(h))).apply

    def read(params, residuals, final):
        logits = unembed(params, residuals)                                      # [n, B, T, V]
        probs = jax.nn.softmax(logits, axis=-1)
        top_probs, top_ids = jax.lax.top_k(probs, top)
        final_prob = jnp.take_along_axis(probs, jnp.broadcast_to(final, probs.shape[:-1])[..., None],
                                         axis=-1)[..., 0]
        return logits, top_ids, top_probs, final_prob

    return jit(on_mesh(read, mesh))


def read_residual(model: Any, residual: np.ndarray) -> np.ndarray:
    """Residual stream [..., B, T, d] through the final norm and the unembedding -> logits
    [..., B, T, V] float32, exactly as the model computes its own logits from its last layer's."""
    residual = np.asarray(residual, np.float32)
    lead = residual.shape[:-3]
    flat = residual.reshape((-1,) + residual.shape[-3:])
    logits, *_ = _reader(model.config, model.dtype, model.mesh, 1)(
        model.params, flat, np.zeros(flat.shape[1:3], np.int32))
    return np.asarray(logits, np.float32).reshape(lead + logits.shape[1:])


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """What each layer's residual stream predicts for one prompt.

    Readings are "embed" (the residual entering layer 0) then layers 0..L-1 (leaving each);
    `top_ids`/`top_probs` [readings, T, top] the most likely next tokens of each reading;
    `final` [T] the model's own top token at each position; `final_prob` [readings, T] the
    probability each reading gives it. The last reading is the model's own output."""

    tokens: np.ndarray
    readings: list[str]
    top_ids: np.ndarray
    top_probs: np.ndarray
    final: np.ndarray
    final_prob: np.ndarray


def logit_lens(model: Any, tokens: Any, top: int = 5) -> LogitLens:
    """The logit lens of one prompt (int tokens [T], or [1, T]) on `model` (a grok1.Model)."""
    row = model.check_tokens(np.asarray(tokens).reshape(1, -1))
    if not 1 <= top <= model.config.vocab_size:
        raise ValueError(f"top must lie in [1, {model.config.vocab_size}], got {top}")
    names = ["blocks.0.hook_resid_pre"] + all_layers(model.config, "hook_resid_post")
    logits, cache = run_with_cache(model, row, names)
    final = np.argmax(logits, axis=-1).astype(np.int32)                            # [1, T]
    residuals = np.stack([cache[name] for name in names])                         # [n, 1, T, d]
    _, top_ids, top_probs, final_prob = jax.tree_util.tree_map(np.asarray, _reader(
        model.config, model.dtype, model.mesh, top)(model.params, residuals, final))
    return LogitLens(tokens=row[0], readings=["embed"] + [str(i) for i in range(model.config.num_layers)],
                     top_ids=top_ids[:, 0], top_probs=top_probs[:, 0], final=final[0],
                     final_prob=final_prob[:, 0])


def _word(tokenizer: Any, token: int) -> str:
    return repr(tokenizer.decode([int(token)])) if tokenizer is not None else str(int(token))


def format_lens(lens: LogitLens, tokenizer: Any = None, positions: int = 8) -> str:
    """Per reading, at the last `positions` positions: its top token and its probability of the
    model's final prediction."""
    T = len(lens.tokens)
    shown = range(max(0, T - positions), T)
    lines = ["logit lens: each layer's residual through the final norm and unembedding; per position "
             "the reading's top token, and [p] the probability it gives the model's final top token"]
    lines.append(f"{'':>6}  " + "  ".join(f"{_word(tokenizer, lens.tokens[t])[:14]:>22}" for t in shown))
    for r, name in enumerate(lens.readings):
        cells = [f"{_word(tokenizer, lens.top_ids[r, t, 0])[:14]:>14} [{lens.final_prob[r, t]:.2f}]"
                 for t in shown]
        lines.append(f"{name:>6}  " + "  ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def attention_patterns(model: Any, tokens: Any, layers: Optional[list[int]] = None) -> np.ndarray:
    """Softmax attention weights of every head for one prompt (int tokens [T] or [1, T]):
    [layers, H, T, T] (query, key), from blocks.{i}.attn.hook_pattern."""
    row = model.check_tokens(np.asarray(tokens).reshape(1, -1))
    L = model.config.num_layers
    layers = list(range(L)) if layers is None else layers
    if not layers or any(not isinstance(i, int) or not 0 <= i < L for i in layers):
        raise ValueError(f"layers must be layer indices in [0, {L}), got {layers}")
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    _, cache = run_with_cache(model, row, names)
    return np.stack([cache[name][0] for name in names])


def format_patterns(patterns: np.ndarray, tokens: np.ndarray, tokenizer: Any = None,
                    layers: Optional[list[int]] = None) -> str:
    """Per layer and head: the key the last token attends to most (and its weight), the weight on
    the first token, and the mean entropy of the rows in bits."""
    layers = list(range(len(patterns))) if layers is None else layers
    lines = [f"{'layer':>5} {'head':>4}  {'last token looks at':>26}  {'on first':>8}  {'entropy':>7}"]
    for layer, per_head in zip(layers, patterns):
        for head, p in enumerate(per_head):
            key = int(np.argmax(p[-1]))
            entropy = float(np.mean(-np.sum(p * np.log2(np.maximum(p, 1e-30)), axis=-1)))
            target = f"{key}:{_word(tokenizer, tokens[key])[:12]} {p[-1, key]:.2f}"
            lines.append(f"{layer:>5} {head:>4}  {target:>26}  {p[-1, 0]:>8.2f}  {entropy:>7.2f}")
    return "\n".join(lines)
