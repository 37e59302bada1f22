"""Named hook points on the model's forward pass: read an activation, or replace it.

grok1/model.py calls `point(name, value)` where each named activation is computed, and runs its
layer loop through `scan_layers` (stacked layers) or `layer(i)` (one module per layer). With no
`Session` open, `point` returns its value and `scan_layers` is `jax.lax.scan`: the model traces
as it would without hooks. grok1.inspect (`run_with_cache`, `run_with_hooks`) opens a Session
around the traced forward pass.

Names follow TransformerLens: `blocks.{i}.<point>` for each of LAYER_POINTS at layer i, and the
GLOBAL_POINTS after the layer loop (docs/INSPECTING.md maps each to the official module names).
In the scanned loop one layer body runs for all layers with a traced index, so
- values asked for are written into one buffer per point, [n, ...] for the n layers asked for,
  carried through the loop: only the activations asked for are held, whatever the depth;
- a replacement `fn(value, name)` asked for at layer i runs under `lax.switch` on the traced
  index (each requested layer its own branch, every other layer the value unchanged).
A value read is the value the model goes on with, i.e. after any replacement at that point.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp

LAYER_POINTS = (
    "hook_resid_pre",                  # the residual stream entering the layer [B, T, d]
    "attn.hook_q", "attn.hook_k",      # queries [B, T, H, K] and keys [B, T, N, K] after RoPE
    "attn.hook_v",                     # values [B, T, N, K]
    "attn.hook_attn_scores_pre_cap",   # q.k * attn_output_multiplier [B, H, T, S]
    "attn.hook_attn_scores",           # after the 30*tanh(x/30) cap and the mask [B, H, T, S]
    "attn.hook_pattern",               # softmax weights [B, H, T, S]
    "hook_attn_out",                   # the attention output after rms_norm_1 [B, T, d]
    "hook_resid_mid",                  # the residual stream after attention [B, T, d]
    "mlp.hook_router_logits",          # the router's logits [B, T, E]
    "mlp.hook_expert_weights",         # the router's softmax [B, T, E]
    "mlp.hook_expert_indices",         # the top-k experts, highest first [B, T, k] int32
    "mlp.hook_expert_out",             # each chosen expert's output, before its weight [B, T, k, d]
    "hook_mlp_out",                    # the MoE output after rms_norm_3 [B, T, d]
    "hook_resid_post",                 # the residual stream leaving the layer [B, T, d]
)
GLOBAL_POINTS = ("ln_final.hook_normalized", "hook_logits")
# Computed only in attention over all keys at once (MultiHeadAttention.attend's plain path):
# long prompts attend in key blocks and decode steps through kernels.attention_over_cache.
ATTENTION_MATRIX_POINTS = ("attn.hook_attn_scores_pre_cap", "attn.hook_attn_scores", "attn.hook_pattern")

_LAYER_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_state = threading.local()

Hook = Callable[[jax.Array, str], Any]


def parse_name(name: str, num_layers: int) -> tuple[str, Optional[int]]:
    """`blocks.{i}.<point>` -> (point, i); a global point -> (name, None); else ValueError."""
    if name in GLOBAL_POINTS:
        return name, None
    match = _LAYER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match and match.group(2) in LAYER_POINTS and int(match.group(1)) < num_layers:
        return match.group(2), int(match.group(1))
    raise ValueError(f"unknown hook point {name!r}: names are blocks.{{i}}.<point> for i in "
                     f"0..{num_layers - 1} and <point> one of {', '.join(LAYER_POINTS)}; "
                     f"or one of {', '.join(GLOBAL_POINTS)}")


def layer_name(point: str, layer: int) -> str:
    return f"blocks.{layer}.{point}"


class Session:
    """The hook points asked for in one traced forward pass: `capture` names to read, `replace`
    {name: fn(value, name) -> replacement}. After the pass, `results()` holds what was read.
    `reduce` {point: fn(value) -> pytree} keeps fn(value) instead of the value of a point read,
    on the device in the loop (e.g. a statistic of each layer's attention scores, not all [T, S])."""

    def __init__(self, num_layers: int, capture: Iterable[str] = (),
                 replace: Optional[Mapping[str, Hook]] = None,
                 reduce: Optional[Mapping[str, Callable[[jax.Array], Any]]] = None):
        self.reduce = dict(reduce or {})
        self.capture: dict[str, list[int]] = {}          # layer point -> layers read, ascending
        self.replace: dict[str, dict[int, Hook]] = {}    # layer point -> {layer: fn}
        self.global_capture: set[str] = set()
        self.global_replace: dict[str, Hook] = {}
        self.asked: set[str] = set()                     # every point named, read or replaced
        for name in capture:
            point, layer = parse_name(name, num_layers)
            self.asked.add(point)
            if layer is None:
                self.global_capture.add(point)
            elif layer not in self.capture.setdefault(point, []):
                self.capture[point] = sorted(self.capture[point] + [layer])
        for name, fn in (replace or {}).items():
            point, layer = parse_name(name, num_layers)
            self.asked.add(point)
            if not callable(fn):
                raise ValueError(f"the hook for {name!r} must be a function fn(value, name) returning "
                                 f"the replacement, got {type(fn).__name__}")
            if layer is None:
                self.global_replace[point] = fn
            else:
                self.replace.setdefault(point, {})[layer] = fn
        self.layer: Optional[jax.Array | int] = None     # the layer being traced, inside the loop
        self.buffers: dict[str, jax.Array] = {}          # inside the scanned loop: point -> [n, ...]
        self.read: dict[str, dict[int, Any]] = {}        # layer points read at a static layer
        self.stacked: dict[str, jax.Array] = {}          # layer point -> [n, ...] after the loop
        self.globals: dict[str, jax.Array] = {}
        self.shapes: Optional[dict[str, Any]] = None     # ShapeDtypeStructs, set while discovering
        self.reached: set[str] = set()

    def wants(self, point: str) -> bool:
        """Whether `point` is read or replaced at any layer (or globally)."""
        return (point in self.capture or point in self.replace or point in self.global_capture
                or point in self.global_replace)

    def visit(self, point: str, value: jax.Array) -> jax.Array:
        self.reached.add(point)
        if point in GLOBAL_POINTS:
            if point in self.global_replace:
                value = _replacement(self.global_replace[point], value, point)
            if point in self.global_capture:
                self.globals[point] = self._reduced(point, value)
            return value
        if self.layer is None:
            raise RuntimeError(f"hook point {point!r} reached outside the layer loop "
                               "(grok1/model.py runs its layers under hooks.scan_layers or hooks.layer)")
        if self.shapes is not None:  # discovering the shapes of what the loop will read
            if point in self.capture:
                self.shapes[point] = jax.tree_util.tree_map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._reduced(point, value))
            return value
        if point in self.replace:
            value = self._replace_at_layer(point, value)
        if point in self.capture:
            self._read_at_layer(point, value)
        return value

    def _replace_at_layer(self, point: str, value: jax.Array) -> jax.Array:
        fns = self.replace[point]
        if isinstance(self.layer, int):
            fn = fns.get(self.layer)
            return value if fn is None else _replacement(fn, value, layer_name(point, self.layer))
        layers = sorted(fns)
        branches = [lambda v: v] + [
            (lambda v, layer=layer: _replacement(fns[layer], v, layer_name(point, layer)))
            for layer in layers]
        match = jnp.asarray(layers) == self.layer
        branch = jnp.sum(jnp.where(match, jnp.arange(1, len(layers) + 1), 0))
        return jax.lax.switch(branch, branches, value)

    def _reduced(self, point: str, value: jax.Array) -> Any:
        return self.reduce[point](value) if point in self.reduce else value

    def _read_at_layer(self, point: str, value: jax.Array) -> None:
        layers = self.capture[point]
        value = self._reduced(point, value)
        if isinstance(self.layer, int):
            if self.layer in layers:
                self.read.setdefault(point, {})[self.layer] = value
            return
        match = jnp.asarray(layers) == self.layer
        slot = jnp.argmax(match)

        def write(buffer: jax.Array, new: jax.Array) -> jax.Array:
            # In place: the slot's old value where this layer was not asked for.
            kept = jnp.where(jnp.any(match), new, jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False))
            return jax.lax.dynamic_update_index_in_dim(buffer, kept, slot, 0)

        self.buffers[point] = jax.tree_util.tree_map(write, self.buffers[point], value)

    def results(self) -> dict[str, jax.Array]:
        """What was read: `blocks.*.<point>` -> [n, ...] stacked in the order of `capture[point]`'s
        layers, and each global point by its name. Every name asked for must have been reached."""
        missing = sorted(self.asked - self.reached)
        if missing:
            raise ValueError(f"hook points {', '.join(missing)} are not computed on this path of the "
                             f"forward pass (attention scores and patterns exist only where attention "
                             f"runs over all keys at once; see docs/INSPECTING.md)")
        out = {f"blocks.*.{point}": buffer for point, buffer in self.stacked.items()}
        for point, by_layer in self.read.items():
            out[f"blocks.*.{point}"] = jax.tree_util.tree_map(
                lambda *xs: jnp.stack(xs), *[by_layer[layer] for layer in self.capture[point]])
        out.update(self.globals)
        return out


def _replacement(fn: Hook, value: jax.Array, name: str) -> jax.Array:
    """fn(value, name), checked to keep value's shape and cast to its dtype."""
    new = jnp.asarray(fn(value, name))
    if new.shape != value.shape:
        raise ValueError(f"the hook for {name} returned shape {tuple(new.shape)}; it must return the "
                         f"shape it was given, {tuple(value.shape)}")
    return new.astype(value.dtype)


def current() -> Optional[Session]:
    return getattr(_state, "session", None)


@contextlib.contextmanager
def session(s: Session) -> Iterator[Session]:
    """Open `s` while the forward pass is traced (one session at a time, per thread)."""
    if current() is not None:
        raise RuntimeError("a hook session is already open in this thread")
    _state.session = s
    try:
        yield s
    finally:
        _state.session = None


def point(name: str, value: jax.Array) -> jax.Array:
    """The model's hook point `name` (one of LAYER_POINTS or GLOBAL_POINTS) on `value`: the value
    itself with no session open, else as the session reads or replaces it."""
    s = current()
    return value if s is None else s.visit(name, value)


def wants(name: str) -> bool:
    """Whether an open session reads or replaces `name` (at any layer): what is computed only for
    the asking (mlp.hook_expert_out; the gates re-read at mlp.hook_expert_indices) is only then."""
    s = current()
    return s is not None and s.wants(name)


@contextlib.contextmanager
def layer(index: jax.Array | int) -> Iterator[None]:
    """Trace layer `index` (an int in the unrolled loop) with its hook points named blocks.{index}."""
    s = current()
    if s is None:
        yield
        return
    previous, s.layer = s.layer, index
    try:
        yield
    finally:
        s.layer = previous


def scan_layers(body: Callable[[Any, jax.Array], tuple[Any, Any]], carry: Any, num_layers: int
                ) -> tuple[Any, Any]:
    """`jax.lax.scan(body, carry, jnp.arange(num_layers))`; with a session open, the buffers of
    the points it reads travel in the carry, one slot per layer asked for."""
    indices = jnp.arange(num_layers)
    s = current()
    if s is None:
        return jax.lax.scan(body, carry, indices)
    if s.capture:  # the shapes of what one layer reads, from an abstract trace of the body
        s.shapes = {}
        try:
            with layer(jnp.int32(0)):
                jax.eval_shape(lambda c: body(c, jnp.int32(0)), carry)
            shapes = s.shapes
        finally:
            s.shapes = None
        # A point this path never reaches has no buffer (results() names it).
        s.capture = {p: layers for p, layers in s.capture.items() if p in shapes}
        buffers = {p: jax.tree_util.tree_map(lambda x, n=len(layers): jnp.zeros((n,) + x.shape, x.dtype),
                                             shapes[p])
                   for p, layers in s.capture.items()}
    else:
        buffers = {}

    def hooked(state, index):
        inner, s.buffers = state
        with layer(index):
            inner, ys = body(inner, index)
        return (inner, s.buffers), ys

    (carry, buffers), ys = jax.lax.scan(hooked, (carry, buffers), indices)
    s.buffers = {}
    s.stacked.update(buffers)
    return carry, ys
