"""Plots of what grok1.inspect measures, with matplotlib (an optional dependency: `pip install -e
'.[plot]'` in the clone). Each writes the format its path's extension names, under a temporary name
renamed into place."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from grok1.inspect.interventions import Ablation, Patching
from grok1.inspect.lens import LogitLens
from grok1.inspect.routing import Routing
from grok1.inspect.trace import CAP_CHANGE, Trace

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib, which is not installed: "
                          "pip install matplotlib (or, in the clone, pip install -e '.[plot]')") from None
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
    _save(fig, path, image_format)


def _save(fig: Any, path: str | os.PathLike, image_format: str) -> None:
    """Write `fig` to a temporary name, then rename it to `path`; the figure is closed either way."""
    plt = _pyplot()
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format=image_format, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def _words(tokenizer: Any, tokens: Any) -> list[str]:
    return [repr(tokenizer.decode([int(t)])) if tokenizer is not None else str(int(t)) for t in tokens]


def plot_lens(lens: LogitLens, path: str | os.PathLike, tokenizer: Any = None) -> None:
    """Heatmap of the logit lens, readings x positions: the probability each reading gives the
    model's final top token, each cell labelled with the reading's own top token."""
    image_format = plot_format(path)
    plt = _pyplot()
    readings, T = lens.final_prob.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * T + 2.5), 0.45 * readings + 1.8))
    image = ax.imshow(lens.final_prob, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for r in range(readings):
        for t, word in enumerate(_words(tokenizer, lens.top_ids[r, :, 0])):
            ax.text(t, r, word[:9], ha="center", va="center", fontsize=7,
                    color="white" if lens.final_prob[r, t] > 0.6 else "black")
    ax.set_xticks(range(T), _words(tokenizer, lens.tokens), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(readings), lens.readings)
    ax.set_xlabel("input token (the reading predicts the token after it)")
    ax.set_ylabel("residual stream after layer")
    ax.set_title("logit lens: each layer's top token; colour = p(the model's final top token)")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    _save(fig, path, image_format)


def plot_patterns(patterns: np.ndarray, tokens: Any, path: str | os.PathLike, tokenizer: Any = None,
                  layers: Optional[list[int]] = None) -> None:
    """Grid of attention patterns [layers, H, T, T], one panel per (layer, head): query rows, key
    columns, softmax weight as colour."""
    image_format = plot_format(path)
    plt = _pyplot()
    L, H, T, _ = patterns.shape
    layers = list(range(L)) if layers is None else layers
    fig, axes = plt.subplots(L, H, figsize=(1.6 * H + 1, 1.6 * L + 1), squeeze=False)
    words = _words(tokenizer, tokens)
    for row, layer in enumerate(layers):
        for head in range(H):
            ax = axes[row, head]
            ax.imshow(patterns[row, head], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(f"attention patterns (query rows, key columns) of {T} tokens: "
                 + " ".join(words)[:90], fontsize=9)
    fig.tight_layout()
    _save(fig, path, image_format)


def plot_routing(r: Routing, path: str | os.PathLike, layer: int = 0) -> None:
    """Expert load per layer (layers x experts), the co-activation of expert pairs at `layer`
    and the transitions from `layer` to the next (the same token's experts)."""
    image_format = plot_format(path)
    plt = _pyplot()
    L, E = r.load.shape
    panels = 3 if layer + 1 < L else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, max(3.6, 0.13 * L + 2.4)))
    image = axes[0].imshow(r.load, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    axes[0].set(xlabel="expert", ylabel="layer", title=f"expert load ({len(r.tokens)} tokens)",
                xticks=range(E))
    axes[0].yaxis.set_major_locator(_integer_ticks())
    fig.colorbar(image, ax=axes[0], label="share of the routings", fraction=0.06)
    pairs = r.co_activation(layer).astype(float)
    np.fill_diagonal(pairs, np.nan)
    image = axes[1].imshow(pairs / len(r.tokens), cmap="Oranges", vmin=0, interpolation="nearest")
    axes[1].set(xlabel="expert", ylabel="expert", title=f"layer {layer}: tokens choosing both",
                xticks=range(E), yticks=range(E))
    fig.colorbar(image, ax=axes[1], label="share of the tokens", fraction=0.046)
    if panels == 3:
        image = axes[2].imshow(r.transitions(layer), cmap="Purples", vmin=0, interpolation="nearest")
        axes[2].set(xlabel=f"expert at layer {layer + 1}", ylabel=f"expert at layer {layer}",
                    title=f"layer {layer} -> {layer + 1}", xticks=range(E), yticks=range(E))
        fig.colorbar(image, ax=axes[2], label="P(next layer's expert | this one)", fraction=0.046)
    fig.tight_layout()
    _save(fig, path, image_format)


def plot_patching(p: Patching, path: str | os.PathLike, tokenizer: Any = None) -> None:
    """Heatmap layers x positions: the clean answer's probability after patching there."""
    image_format = plot_format(path)
    plt = _pyplot()
    L, T = p.prob.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * T + 2.5), 0.5 * L + 2.0))
    image = ax.imshow(p.prob, aspect="auto", cmap="RdBu_r", vmin=0, vmax=max(p.clean_prob, 1e-6),
                      interpolation="nearest")
    clean, corrupt = _words(tokenizer, p.clean), _words(tokenizer, p.corrupt)
    ax.set_xticks(range(T), [a if a == b else f"{b}->{a}" for a, b in zip(clean, corrupt)],
                  rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L))
    ax.set(xlabel="position patched (corrupted -> clean token)", ylabel="layer")
    answer = _words(tokenizer, [p.answer])[0]
    ax.set_title(f"patching {p.point}: p({answer}) (clean {p.clean_prob:.2f}, corrupted "
                 f"{p.corrupt_prob:.2f})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    _save(fig, path, image_format)


def plot_ablation(a: Ablation, path: str | os.PathLike) -> None:
    """Heatmap layers x experts of the loss increase when the expert is never chosen, beside
    the experts' load."""
    image_format = plot_format(path)
    plt = _pyplot()
    L, E = a.loss.shape
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(10, max(3.2, 0.13 * L + 2.4)))
    image = ax_loss.imshow(a.loss - a.baseline, aspect="auto", cmap="Reds", vmin=0, interpolation="nearest")
    ax_loss.set(xlabel="expert ablated", ylabel="layer", xticks=range(E),
                title=f"loss increase (baseline {a.baseline:.3f} nats, {a.tokens} tokens)")
    ax_loss.yaxis.set_major_locator(_integer_ticks())
    fig.colorbar(image, ax=ax_loss, label="nats", fraction=0.06)
    image = ax_load.imshow(a.load, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax_load.set(xlabel="expert", ylabel="layer", xticks=range(E), title="expert load (share of routings)")
    ax_load.yaxis.set_major_locator(_integer_ticks())
    fig.colorbar(image, ax=ax_load, fraction=0.06)
    fig.tight_layout()
    _save(fig, path, image_format)
