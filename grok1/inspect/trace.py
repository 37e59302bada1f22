"""What the layers do (`trace`): the real forward pass run under
`hk.experimental.intercept_methods`, one layer after another (the per-layer form of
grok1/weights/stacking.py), recording what `Router.__call__`, `MultiHeadAttention.attention_logits`
and `DecoderLayer.__call__` return, summarised on the device (only per-layer statistics, router
probabilities and the final logits come back)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok1 import model as model_lib
from grok1.config import ModelConfig
from grok1.mesh import activation_sharding, from_host, on_mesh, to_host
from grok1.model import (ComputeOptions, DecoderLayer, LanguageModel, MultiHeadAttention, Router,
                         attention_context, cap_attention_logits, forward)
from grok1.params import layer_index
from grok1.runtime.compiling import jit
from grok1.weights.stacking import unstack_layers

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


def _interceptor(records: dict[str, Any]):
    """Records what the model's own methods return, keyed by layer; changes nothing."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, method = context.module, context.method_name
        layer = layer_index(module.module_name)
        if isinstance(module, Router) and method == "__call__":
            records[f"router_probs/{layer}"] = out
        elif isinstance(module, MultiHeadAttention) and method == "attention_logits":
            records[f"attention_logits/{layer}"] = out
        elif isinstance(module, DecoderLayer) and method == "__call__":
            records[f"residual/{layer}"] = out[0] if isinstance(out, tuple) else out
        elif isinstance(module, LanguageModel) and method == "embed":
            records["embedding"] = out
        return out

    return intercept


def _rms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x, axis=-1))


def _logit_stats(logits: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Cap statistics of pre-cap logits [B, N, G, T, S] over the visible pairs of mask [B, T, S]."""
    visible = jnp.broadcast_to(mask[:, None, None], logits.shape)
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

    def traced(tokens: jax.Array):
        records: dict[str, Any] = {}
        # Attention over all keys at once, not in blocks, whatever the prompt's length: the trace
        # summarises `attention_logits`, all [T, S] of them.
        plain = ComputeOptions(attention_key_block=max(model_lib.ATTENTION_KEY_BLOCK, tokens.shape[1]))
        with hk.experimental.intercept_methods(_interceptor(records)):
            logits, _ = forward(config, dtype, tokens, unroll_layers=True, options=plain)
        missing = [name for name in ("router_probs", "attention_logits", "residual")
                   if f"{name}/0" not in records]
        if missing or "embedding" not in records:
            raise RuntimeError(f"trace saw no {missing or ['embedding']} in grok1.model: the methods "
                               "it intercepts were renamed; update grok1/inspect.py")
        mask = attention_context(tokens, config.pad_token, None).mask
        layers = []
        for i in range(config.num_layers):
            probs = records[f"router_probs/{i}"]
            _, experts = jax.lax.top_k(probs, config.num_selected_experts)
            layers.append({"router_probs": probs, "experts": experts,
                           "residual_rms": _rms(records[f"residual/{i}"]),
                           **_logit_stats(records[f"attention_logits/{i}"], mask)})
        return logits, _rms(records["embedding"]), layers

    apply = hk.without_apply_rng(hk.transform(traced)).apply
    # One layer at a time, under the official names: stacked layers are taken apart inside the
    # program (grok1/weights/stacking.py), so no copy of the weights is ever made outside it.
    return jit(on_mesh(lambda params, tokens: apply(unstack_layers(params), tokens), mesh))


def trace(model: Any, tokens: Any) -> Trace:
    """Run `model` (a grok1.Model) on tokens [B, T] and return what every layer did."""
    tokens = model.check_tokens(tokens)
    apply = _traced_apply(model.config, model.dtype, model.mesh)
    if model.mesh is None:
        outputs = apply(model.params, jnp.asarray(tokens))
        logits, embedding_rms, layers = jax.tree_util.tree_map(np.asarray, outputs)
    else:
        # Like Model.logits: rows split over the data axis, every process receives everything.
        outputs = apply(model.params, from_host(tokens, activation_sharding(model.mesh, "tokens",
                                                                            tokens.shape)))
        logits, embedding_rms, layers = jax.tree_util.tree_map(to_host, outputs)
    c = model.config
    real = tokens != c.pad_token
    traced_layers = []
    for layer in layers:
        experts = np.asarray(layer["experts"])
        load = expert_counts(experts[real], c.num_experts)
        traced_layers.append(LayerTrace(
            router_probs=np.asarray(layer["router_probs"], np.float32), experts=experts,
            expert_load=load, logit_max_abs_before_cap=float(layer["before"]),
            logit_max_abs_after_cap=float(layer["after"]),
            capped_fraction=float(layer["capped_fraction"]),
            residual_rms=np.asarray(layer["residual_rms"], np.float32)))
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
