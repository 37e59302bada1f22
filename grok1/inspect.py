"""Look inside Grok-1: what the parameters weigh (`describe`) and what the layers do (`trace`).

Both read the model code itself. `describe` walks the parameter tree of `grok1.model`, stored as
the release stores it (grok1/params.py) and split by the mesh's table (grok1/mesh.py); `trace`
runs the real forward pass under `hk.experimental.intercept_methods`, one layer after another
(the per-layer form of grok1/weights/stacking.py), recording what `Router.__call__`,
`MultiHeadAttention.attention_logits` and `DecoderLayer.__call__` return, and summarises it on
the device (only per-layer statistics, router probabilities and the final logits come back).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from grok1 import model as model_lib
from grok1.config import ModelConfig, resolve_config
from grok1.mesh import MESH_AXES, activation_sharding, from_host, on_mesh, parse_mesh_spec, to_host
from grok1.model import (ComputeOptions, DecoderLayer, LanguageModel, MultiHeadAttention, Router,
                         attention_context, cap_attention_logits, forward, param_shapes)
from grok1.params import LAYER_ORDER, component, layer_index, layer_module, official_layer, release_storage
from grok1.runtime.compiling import jit
from grok1.weights.placement import param_sharding, release_structs
from grok1.weights.stacking import unstack_layers

BYTES = {"int8": 1, "bfloat16": 2, "float32": 4}
CAP_CHANGE = 0.01  # a logit counts as "changed by the cap" when capping moves it by more than 1%


# ---- describe ---------------------------------------------------------------------------------

def _forward_order(module: str) -> tuple:
    """Embedding first, then the layers in numeric order (modules in forward order), final norm last."""
    layer = official_layer(module)
    if layer is not None:
        index, inner = layer
        return (1, index, LAYER_ORDER.index(inner) if inner in LAYER_ORDER else len(LAYER_ORDER), module)
    return (0 if module.endswith("in_out_embed") else 2, 0, 0, module)


def _tensor(module: str, param: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """One parameter with its storage in the release (grok1/params.py, `release_storage`)."""
    storage = release_storage(module, param, shape)
    count = math.prod(shape)
    entry: dict[str, Any] = {"module": module, "param": param, "shape": list(shape),
                             "component": component(module), "count": count, "dtype": storage.dtype.name}
    nbytes = count * storage.dtype.itemsize
    if storage.quantized:
        entry.update(scales_shape=list(storage.scales_shape), scales_dtype=storage.scales_dtype.name)
        nbytes += math.prod(storage.scales_shape) * storage.scales_dtype.itemsize
    entry["bytes"] = nbytes
    return entry


def _bytes_per_device(shapes: dict, tensors: list[dict[str, Any]], mesh_spec: str) -> dict[str, Any]:
    """Bytes each device holds of the release-stored parameters, from the shard shapes their
    shardings give (grok1/weights/placement.py). An abstract mesh (axis sizes only): no devices
    needed."""
    sizes = parse_mesh_spec(mesh_spec)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    per_device = 0
    by_component: dict[str, int] = {}
    structs = release_structs(shapes)
    for t in tensors:
        struct = structs[t["module"]][t["param"]]
        sharding = param_sharding(mesh, t["module"], t["param"], struct)
        nbytes = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                     for a, s in zip(jax.tree_util.tree_leaves(struct), jax.tree_util.tree_leaves(sharding)))
        per_device += nbytes
        by_component[t["component"]] = by_component.get(t["component"], 0) + nbytes
    return {"spec": mesh_spec, "axes": sizes, "devices": math.prod(sizes.values()),
            "param_bytes_per_device": per_device, "by_component": by_component}


def describe(config: ModelConfig | str, mesh_spec: Optional[str] = None) -> dict[str, Any]:
    """Every parameter of `config`'s model (a ModelConfig or a preset name such as "grok-1") with
    shape, count and bytes (release storage), totals per layer and overall, active parameters and
    FLOPs per token, KV-cache bytes per token and, for `mesh_spec` (e.g. "1x8"), the parameter
    bytes each device holds. Needs no weights."""
    config = resolve_config(config)
    shapes = param_shapes(config)
    tensors = [_tensor(module, param, tuple(shapes[module][param].shape))
               for module in sorted(shapes, key=_forward_order) for param in sorted(shapes[module])]

    def totals(selected: list[dict[str, Any]]) -> dict[str, Any]:
        by_component: dict[str, int] = {}
        for t in selected:
            by_component[t["component"]] = by_component.get(t["component"], 0) + t["count"]
        return {"params": sum(t["count"] for t in selected),
                "bytes": sum(t["bytes"] for t in selected), "params_by_component": by_component}

    c = config
    layer_0 = [t for t in tensors if layer_index(t["module"]) == 0]
    per_layer = totals(layer_0)
    total = totals(tensors)
    active = dict(total["params_by_component"])
    active["experts"] = active["experts"] * c.num_selected_experts // c.num_experts
    # FLOPs: 2 per multiply-add of every weight a token multiplies through (its active parameters
    # but the norm scales; the embeddings once, as the tied output projection; the input lookup is
    # free), plus q.k and the weighted sum of v: 2 * H * K each, per visible key and layer.
    matmul_weights = sum(n for component, n in active.items() if component != "norms")
    per_key = 4 * c.num_layers * c.num_q_heads * c.key_size

    def flops(visible_keys: float) -> int:
        return int(2 * matmul_weights + per_key * visible_keys)

    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.key_size
    contexts = sorted({1, min(1024, c.sequence_len), c.sequence_len})
    return {
        "config": c.to_dict(),
        "ffn_size": c.ffn_size,
        "tensors": tensors,
        "num_tensors": len(tensors),
        "per_layer": per_layer,
        "total": total,
        "active_per_token": {"params": sum(active.values()), "params_by_component": active,
                             "note": f"{c.num_selected_experts} of {c.num_experts} experts per layer; "
                                     "all embeddings, which the tied output projection reads"},
        "flops_per_token": {
            "counted": "2 x weights multiplied (attention, router, chosen experts, unembedding) "
                       "+ 4 x H x K x layers per visible key (scores and weighted values)",
            "matmul": flops(0),
            "per_visible_key": per_key,
            # context n: prefill of an n-token prompt, where token t sees t+1 keys (causal), (n+1)/2
            # on average; decode of the n-th token, which sees all n.
            "by_context": [{"context": n, "prefill": flops((n + 1) / 2),
                            "decode": flops(n)} for n in contexts],
        },
        "kv_cache": {"bytes_per_token": {dtype: kv_per_token * BYTES[dtype]
                                         for dtype in ("bfloat16", "float32")},
                     "bytes_per_sequence_bfloat16": kv_per_token * BYTES["bfloat16"] * c.sequence_len,
                     "counted": "keys and values of every layer (2 x layers x kv heads x key size)"},
        "mesh": _bytes_per_device(shapes, tensors, mesh_spec or "1x1"),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_description(d: dict[str, Any]) -> str:
    """`describe`'s dict as readable tables: the non-layer tensors, one decoder layer (the same
    for every layer), totals, per-token costs and the mesh."""
    c = d["config"]
    layers = c["num_layers"]
    rows = [("module / param", "shape", "params", "storage", "bytes")]

    def row(t: dict[str, Any], module: str) -> tuple[str, ...]:
        storage = t["dtype"]
        if "scales_shape" in t:
            storage = f"int8 + bf16 scales {tuple(t['scales_shape'])}"
        return (f"{module}/{t['param']}", str(tuple(t["shape"])), f"{t['count']:,}", storage,
                f"{t['bytes']:,}")

    for t in d["tensors"]:
        layer = layer_index(t["module"])
        if layer is None:
            rows.append(row(t, t["module"]))
        elif layer == 0:
            rows.append(row(t, t["module"].replace(layer_module(0), layer_module("{i}"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Grok-1 architecture: {layers} layers, d={c['emb_size']}, {c['num_q_heads']} query / "
             f"{c['num_kv_heads']} kv heads of {c['key_size']}, {c['num_experts']} experts "
             f"(top {c['num_selected_experts']}), ffn {d['ffn_size']}, vocab {c['vocab_size']}",
             f"Storage as in the release: int8 linear weights with bf16 block scales, bf16 embeddings "
             f"and norms, f32 router. decoder_layer_{{i}} rows repeat for i = 0..{layers - 1}.", ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) if j < 2 or j == 3 else r[j].rjust(widths[j])
                               for j in range(len(r))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    per_layer, total, active = d["per_layer"], d["total"], d["active_per_token"]
    lines += ["",
              f"{'per layer':<13}{per_layer['params']:>20,} params  {_human_bytes(per_layer['bytes']):>11}",
              f"{'total':<13}{total['params']:>20,} params  {_human_bytes(total['bytes']):>11}  "
              f"({d['num_tensors']} tensors)",
              f"{'':<13}by component: " + ", ".join(
                  f"{k} {_human_count(v)}" for k, v in total["params_by_component"].items()),
              f"{'active/token':<13}{active['params']:>20,} params  ({active['note']})",
              f"{'':<13}by component: " + ", ".join(
                  f"{k} {_human_count(v)}" for k, v in active["params_by_component"].items()),
              ""]
    flops = d["flops_per_token"]
    lines.append(f"FLOPs per token = {flops['matmul']:,} (matmuls) + {flops['per_visible_key']:,} "
                 f"x visible keys")
    lines.append(f"  counted: {flops['counted']}")
    for entry in flops["by_context"]:
        n = entry["context"]
        lines.append(f"  prompt of {n:>5} tokens: prefill {_human_count(entry['prefill'])}FLOP per token "
                     f"(mean); decoding token {n}: {_human_count(entry['decode'])}FLOP")
    kv = d["kv_cache"]
    lines += ["",
              f"KV cache per token: {_human_bytes(kv['bytes_per_token']['bfloat16'])} in bf16 "
              f"({_human_bytes(kv['bytes_per_token']['float32'])} in f32); "
              f"{_human_bytes(kv['bytes_per_sequence_bfloat16'])} for {c['sequence_len']} tokens in bf16"]
    mesh = d["mesh"]
    axes = " x ".join(f"{k}={v}" for k, v in mesh["axes"].items())
    lines.append(f"Mesh {mesh['spec']} ({axes}, {mesh['devices']} devices): "
                 f"{_human_bytes(mesh['param_bytes_per_device'])} of parameters per device")
    return "\n".join(lines)


# ---- trace ------------------------------------------------------------------------------------

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
        load = np.bincount(experts[real].reshape(-1), minlength=c.num_experts)
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


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install 'grok1[plot]')") from None
    return plt


def plot_formats() -> list[str]:
    """The file extensions `plot_trace` can write (the formats matplotlib's Agg backend knows)."""
    plt = _pyplot()
    figure = plt.figure()
    try:
        return sorted(figure.canvas.get_supported_filetypes())
    finally:
        plt.close(figure)


def plot_format(path: str | os.PathLike) -> str:
    """The image format `path`'s extension names, or ValueError listing the allowed ones."""
    extension = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    allowed = plot_formats()
    if extension not in allowed:
        raise ValueError(f"cannot tell the image format of {os.fspath(path)!r} from its extension; "
                         f"use one of: {', '.join('.' + e for e in allowed)}")
    return extension


def plot_trace(t: Trace, path: str | os.PathLike) -> None:
    """Write an image (format from the extension: .png, .svg, .pdf, .jpg ...): expert usage per
    layer (heatmap, layers x experts) beside the attention capping statistics per layer. Needs
    matplotlib (optional dependency)."""
    image_format = plot_format(path)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    load = t.expert_load
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    layers = np.arange(len(t.layers))
    fig, (ax_experts, ax_logits, ax_capped) = plt.subplots(
        1, 3, figsize=(12, max(3.2, 0.13 * len(layers) + 2.0)), sharey=True,
        gridspec_kw={"width_ratios": [1.2, 1, 1]})
    image = ax_experts.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax_experts.set_xlabel("expert")
    ax_experts.set_ylabel("layer")
    ax_experts.set_xticks(range(t.num_experts))
    ax_experts.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_experts.set_title(f"expert usage ({int(t.real.sum())} tokens)")
    fig.colorbar(image, ax=ax_experts, label="share of the routings (k per token)", fraction=0.08,
                 pad=0.03)

    ax_logits.plot([layer.logit_max_abs_before_cap for layer in t.layers], layers, "o-",
                   label="before cap")
    ax_logits.plot([layer.logit_max_abs_after_cap for layer in t.layers], layers, "s--",
                   label="after cap")
    ax_logits.axvline(30, color="grey", linestyle=":", linewidth=1)
    ax_logits.set_xlim(left=0)
    ax_logits.set_xlabel("max |attention logit|")
    ax_logits.set_title("logits vs the 30*tanh(x/30) cap")
    ax_logits.legend(fontsize="small")

    ax_capped.barh(layers, [100 * layer.capped_fraction for layer in t.layers], color="tab:red")
    ax_capped.set_xlim(0, max(1.0, 100 * max(layer.capped_fraction for layer in t.layers) * 1.1))
    ax_capped.set_xlabel("% of visible logits")
    ax_capped.set_title(f"changed by the cap by > {CAP_CHANGE:.0%}")
    fig.tight_layout()
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format=image_format, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
