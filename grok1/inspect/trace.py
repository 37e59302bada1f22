"""What the layers do (`trace`): the real forward pass, its layer loop as it runs, with a hook
session (grok1/hooks.py) reading the router's softmax and chosen experts, the attention scores
before the cap and the residual stream of every layer, the scores and residuals summarised in
the loop on the device (only per-layer statistics, router probabilities, experts and the final
logits come back)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import hooks
from grok1.config import ModelConfig
from grok1.inspect.activations import options_for
from grok1.mesh import activation_sharding, from_host, on_mesh, to_host
from grok1.model import attention_context, cap_attention_logits, transformed
from grok1.runtime.compiling import jit

CAP_CHANGE = 0.01  # a logit counts as "changed by the cap" when capping moves it by more than 1%

@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """What one decoder layer did with the traced tokens.

    `router_probs` [B, T, E] float32; `experts` [B, T, k] the chosen experts (highest first);
    `expert_load` [E] how many real (non-pad) tokens chose each expert; attention logit
    statistics over the visible (unmasked) query/key pairs of all heads, before and after the
    30*tanh(x/30) cap; `residual_rms` [B, T] the RMS of the residual stream after the layer.
    """

    router_probs: np.ndarray
    experts: np.ndarray
    expert_load: np.ndarray
    logit_max_abs_before_cap: float
    logit_max_abs_after_cap: float
    capped_fraction: float
    residual_rms: np.ndarray


@dataclasses.dataclass(frozen=True)
class Trace:
    """A traced forward pass: the tokens, the logits, the embedding RMS and one LayerTrace per layer."""

    tokens: np.ndarray             # [B, T] int32
    logits: np.ndarray             # [B, T, V] float32
    embedding_rms: np.ndarray      # [B, T] RMS of the residual stream entering layer 0
    layers: list[LayerTrace]
    num_experts: int
    pad_token: int

    @property
    def real(self) -> np.ndarray:
        """[B, T] bool: which positions hold a real token (the rest is padding)."""
        return self.tokens != self.pad_token

    @property
    def expert_load(self) -> np.ndarray:
        """[layers, E] tokens routed to each expert of each layer."""
        return np.stack([layer.expert_load for layer in self.layers])


def expert_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[E] how many of the (token, choice) pairs of `experts` [..., k] chose each expert: a layer's
    expert load (trace, routing statistics, ablation)."""
    return np.bincount(np.asarray(experts).reshape(-1), minlength=num_experts)


def _rms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x, axis=-1))


def _logit_stats(logits: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Cap statistics of pre-cap logits [B, H, T, S] over the visible pairs of mask [B, T, S]."""
    visible = jnp.broadcast_to(mask[:, None], logits.shape)
    capped = cap_attention_logits(logits)
    changed = jnp.abs(capped - logits) > CAP_CHANGE * jnp.abs(logits)
    count = jnp.maximum(jnp.sum(visible), 1)
    return {"before": jnp.max(jnp.where(visible, jnp.abs(logits), 0.0)),
            "after": jnp.max(jnp.where(visible, jnp.abs(capped), 0.0)),
            "capped_fraction": jnp.sum(changed & visible) / count}


@functools.lru_cache(maxsize=8)
def _traced_apply(config: ModelConfig, dtype, mesh: Optional[jax.sharding.Mesh] = None):
    """jit of the model's forward pass that also returns per-layer summaries, traced with `mesh`
    in context as the model's own steps are (grok1/mesh.py)."""
    every = lambda point: [hooks.layer_name(point, i) for i in range(config.num_layers)]  # noqa: E731
    names = (["blocks.0.hook_resid_pre"] + every("hook_resid_post") + every("mlp.hook_expert_weights")
             + every("mlp.hook_expert_indices") + every("attn.hook_attn_scores_pre_cap"))

    def traced(params, tokens: jax.Array):
        mask = attention_context(tokens, config.pad_token, None).mask
        # Summarised in the loop: each layer's residual RMS and attention-score statistics, not
        # the residuals or the [T, S] scores of every layer.
        reduce = {"hook_resid_pre": _rms, "hook_resid_post": _rms,
                  "attn.hook_attn_scores_pre_cap": lambda scores: _logit_stats(scores, mask)}
        # Attention over all keys at once, whatever the prompt's length (the scores exist there).
        options = options_for(hooks.ATTENTION_MATRIX_POINTS, tokens.shape[1])
        with hooks.session(hooks.Session(config.num_layers, names, reduce=reduce)) as s:
            logits, _ = transformed(config, dtype, options).apply(params, tokens)
            read = s.results()
        return logits, read

    return jit(on_mesh(traced, mesh))


def trace(model: Any, tokens: Any) -> Trace:
    """Run `model` (a grok1.Model) on tokens [B, T] and return what every layer did."""
    tokens = model.check_tokens(tokens)
    apply = _traced_apply(model.config, model.dtype, model.mesh)
    if model.mesh is None:
        logits, read = jax.tree_util.tree_map(np.asarray, apply(model.params, jnp.asarray(tokens)))
    else:
        # Like Model.logits: rows split over the data axis, every process receives everything.
        logits, read = jax.tree_util.tree_map(to_host, apply(model.params, from_host(
            tokens, activation_sharding(model.mesh, "tokens", tokens.shape))))
    c = model.config
    real = tokens != c.pad_token
    stats = read["blocks.*.attn.hook_attn_scores_pre_cap"]
    traced_layers = []
    for i in range(c.num_layers):
        experts = np.asarray(read["blocks.*.mlp.hook_expert_indices"][i])
        traced_layers.append(LayerTrace(
            router_probs=np.asarray(read["blocks.*.mlp.hook_expert_weights"][i], np.float32),
            experts=experts, expert_load=expert_counts(experts[real], c.num_experts),
            logit_max_abs_before_cap=float(stats["before"][i]),
            logit_max_abs_after_cap=float(stats["after"][i]),
            capped_fraction=float(stats["capped_fraction"][i]),
            residual_rms=np.asarray(read["blocks.*.hook_resid_post"][i], np.float32)))
    embedding_rms = read["blocks.*.hook_resid_pre"][0]
    return Trace(tokens=tokens, logits=np.asarray(logits, np.float32),
                 embedding_rms=np.asarray(embedding_rms, np.float32), layers=traced_layers,
                 num_experts=c.num_experts, pad_token=c.pad_token)


def format_trace(t: Trace) -> str:
    """Per-layer summary: residual RMS, attention logits before/after the cap, expert load."""
    real = t.real
    tokens = int(real.sum())
    experts = t.num_experts
    header = (f"{'layer':>5}  {'resid rms':>9}  {'max|logit|':>10}  {'after cap':>9}  {'capped':>7}  "
              + " ".join(f"{'e' + str(e):>4}" for e in range(experts)))
    lines = [f"trace of {tokens} tokens ({t.tokens.shape[0]} rows); expert load = tokens routed to "
             f"each expert (each token picks {t.layers[0].experts.shape[-1]}); capped = share of "
             f"visible attention logits the cap moved by more than {CAP_CHANGE:.0%}",
             f"{'embed':>5}  {float(t.embedding_rms[real].mean()):>9.3f}",
             header]
    for i, layer in enumerate(t.layers):
        lines.append(f"{i:>5}  {float(layer.residual_rms[real].mean()):>9.3f}  "
                     f"{layer.logit_max_abs_before_cap:>10.2f}  {layer.logit_max_abs_after_cap:>9.2f}  "
                     f"{layer.capped_fraction:>7.2%}  "
                     + " ".join(f"{int(n):>4}" for n in layer.expert_load))
    return "\n".join(lines)
