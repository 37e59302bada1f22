"""Named activations of the real forward pass, read (`run_with_cache`) or replaced
(`run_with_hooks`): the model's own jitted program with a hooks.Session open while it is traced
(grok1/hooks.py), on one device or a mesh, the values asked for gathered to the host."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from grok1 import hooks, model as model_lib
from grok1.config import ModelConfig
from grok1.mesh import activation_sharding, from_host, on_mesh, to_host
from grok1.model import ComputeOptions, transformed
from grok1.runtime.compiling import jit


class ActivationCache(dict):
    """{hook name: numpy array} of the names asked for, e.g. cache["blocks.3.hook_resid_post"]
    [B, T, d]; `stack(point)` gives [layers, ...] of a layer point over the layers read."""

    def layers(self, point: str) -> list[int]:
        """The layers at which `point` (e.g. "hook_resid_post") was read, ascending."""
        found = [hooks.parse_name(name, 1 << 30) for name in self]
        return sorted(layer for p, layer in found if p == point and layer is not None)

    def stack(self, point: str) -> np.ndarray:
        """`point` at every layer read, stacked along a leading axis in layer order."""
        layers = self.layers(point)
        if not layers:
            raise KeyError(f"{point} was not read at any layer; read: {', '.join(sorted(self))}")
        return np.stack([self[hooks.layer_name(point, layer)] for layer in layers])


def all_layers(config: ModelConfig, point: str) -> list[str]:
    """The names of layer point `point` at every layer: blocks.0.<point> ... blocks.{L-1}.<point>."""
    if point not in hooks.LAYER_POINTS:
        raise ValueError(f"unknown layer point {point!r}; one of {', '.join(hooks.LAYER_POINTS)}")
    return [hooks.layer_name(point, i) for i in range(config.num_layers)]


def options_for(points: Iterable[str], tokens: int) -> ComputeOptions:
    """The plain attention path (all keys at once) where attention scores or patterns are asked
    for, which the key-blocked path of long prompts never holds; the model's default otherwise."""
    if any(p in hooks.ATTENTION_MATRIX_POINTS for p in points):
        return ComputeOptions(attention_key_block=max(model_lib.ATTENTION_KEY_BLOCK, tokens))
    return ComputeOptions()


@functools.lru_cache(maxsize=16)
def hooked_apply(config: ModelConfig, dtype, mesh: Optional[jax.sharding.Mesh], names: tuple[str, ...],
                 replace: tuple[tuple[str, Callable], ...], options: ComputeOptions) -> Callable:
    """jit of params, tokens [B, T] -> (logits, the session's results), traced with `mesh` in
    context as the model's own steps are. Cached by its arguments (a hook is its function object)."""
    apply = transformed(config, dtype, options).apply

    def run(params, tokens):
        with hooks.session(hooks.Session(config.num_layers, names, dict(replace))) as s:
            logits, _ = apply(params, tokens)
            return logits, s.results()

    return jit(on_mesh(run, mesh))


def abstract_program(config: ModelConfig, dtype, params: Any, tokens: jax.ShapeDtypeStruct,
                     names: Iterable[str] = ()) -> Any:
    """The compiled program of run_with_cache for `names`, from abstract params and tokens (no
    weights): its memory_analysis() says what asking for `names` adds (benchmarks, tests)."""
    names = tuple(names)
    points = {hooks.parse_name(n, config.num_layers)[0] for n in names}
    fn = hooked_apply(config, dtype, None, names, (), options_for(points, tokens.shape[1]))
    return fn.lower(params, tokens).compile()


def run_with_hooks(model: Any, tokens: Any, hooks_: Optional[Mapping[str, Callable]] = None,
                   names: Iterable[str] = ()) -> tuple[np.ndarray, ActivationCache]:
    """Forward pass of `model` (a grok1.Model) on int tokens [B, T] with `hooks_` {name: fn(value,
    name) -> replacement} applied where the model computes each name, reading `names` on the way.
    -> (float32 logits [B, T, V], ActivationCache of `names`) as numpy."""
    tokens = model.check_tokens(tokens)
    if isinstance(names, str):
        raise ValueError(f"names must be a list of hook names such as ['blocks.0.hook_resid_post'], "
                         f"got the string {names!r}")
    names = tuple(dict.fromkeys(names))
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be a list of hook names such as ['blocks.0.hook_resid_post'], "
                         f"got {names!r}")
    if hooks_ is not None and not isinstance(hooks_, Mapping):
        raise ValueError(f"hooks must be a dict {{hook name: fn(value, name)}}, got {type(hooks_).__name__}")
    replace = tuple((hooks_ or {}).items())
    c = model.config
    points = {hooks.parse_name(n, c.num_layers)[0] for n in names + tuple(n for n, _ in replace)}
    apply = hooked_apply(c, model.dtype, model.mesh, names, replace, options_for(points, tokens.shape[1]))
    if model.mesh is None:
        logits, results = jax.tree_util.tree_map(np.asarray, apply(model.params, tokens))
    else:  # rows split over the data axis as Model.logits does; every process receives everything
        logits, results = jax.tree_util.tree_map(to_host, apply(model.params, from_host(
            tokens, activation_sharding(model.mesh, "tokens", tokens.shape))))
    parsed = {name: hooks.parse_name(name, c.num_layers) for name in names}
    layers_read: dict[str, list[int]] = {}  # as the Session orders them: ascending per point
    for point, layer in parsed.values():
        if layer is not None:
            layers_read[point] = sorted(set(layers_read.get(point, [])) | {layer})
    cache = ActivationCache()
    for name, (point, layer) in parsed.items():
        cache[name] = (results[point] if layer is None
                       else results[f"blocks.*.{point}"][layers_read[point].index(layer)])
    return np.asarray(logits, np.float32), cache


def run_with_cache(model: Any, tokens: Any, names: Iterable[str]) -> tuple[np.ndarray, ActivationCache]:
    """Forward pass of `model` on int tokens [B, T] -> (float32 logits [B, T, V], ActivationCache
    of just `names`), e.g. names=["blocks.3.hook_resid_post", "blocks.3.mlp.hook_expert_indices"]."""
    return run_with_hooks(model, tokens, None, names)
