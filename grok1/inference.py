"""`grok1.load` and `grok1.Model`: a checkpoint on devices, ready to compute logits."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import checkpoint, inspect
from grok1.config import ModelConfig, resolve_config
from grok1.generation import api as generation
from grok1.inspect import Trace, activations
from grok1.inspect.activations import ActivationCache
from grok1.mesh import activation_sharding, from_host, make_mesh, on_mesh, to_host
from grok1.model import KVCache, transformed
from grok1.runtime.compiling import jit
from grok1.tokenizer import Tokenizer
from grok1.weights.layout import record_splits, to_compute_layout, to_official
from grok1.weights.stacking import HostStack, stack_layers, unstack_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOKENIZER_FILE = "tokenizer.model"


def resolve_dtype(dtype: Any = None) -> jnp.dtype:
    """None picks the platform default: float32 on CPU, bfloat16 on GPU/TPU."""
    if dtype is None:
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or a jnp dtype), got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32', 'bfloat16', a jnp dtype or None, got {dtype!r}") from None
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {resolved}")
    return resolved


def resolve_mesh(mesh: Any) -> Optional[jax.sharding.Mesh]:
    """A jax Mesh, a spec string such as "1x8" (built with grok1.make_mesh), or None (one device)."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if isinstance(mesh, str):
        return make_mesh(mesh)
    raise TypeError(f"mesh must be a jax.sharding.Mesh, a spec string such as '1x8' or "
                    f"'data=2,model=4', or None for one device; got {type(mesh).__name__}")


@dataclasses.dataclass
class Model:
    """A Grok-1-architecture model with its parameters placed on devices.

    `params` is the Haiku params dict the model reads, in the compute layout of grok1/weights/layout.py
    (every tensor in its stored dtype; linear weights as `LinearWeight`s), with the decoder
    layers stacked (`transformer/decoder_layers/...`, see grok1/weights/stacking.py). `dtype` is the
    compute dtype, `mesh` the device mesh or None for one device, `tokenizer` optional.
    """

    config: ModelConfig
    params: dict
    dtype: jnp.dtype
    mesh: Optional[jax.sharding.Mesh] = None
    tokenizer: Any = None

    @functools.cached_property
    def _forward(self):
        return jit(on_mesh(transformed(self.config, self.dtype).apply, self.mesh))

    def logits(self, tokens: Any) -> np.ndarray:
        """Full forward without cache: int tokens [B, T] (rows right-padded with the pad token)
        -> float32 logits [B, T, vocab_size] as numpy."""
        tokens = self.check_tokens(tokens)
        if self.mesh is None:
            logits, _ = self._forward(self.params, jnp.asarray(tokens))
            return np.asarray(logits, dtype=np.float32)
        # Rows split over the data axis; with several processes every process passes the same
        # tokens and receives all the logits.
        logits, _ = self._forward(self.params, from_host(
            tokens, activation_sharding(self.mesh, "tokens", tokens.shape)))
        return to_host(logits).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as an official checkpoint: `path/ckpt-0/` (the tensor files it was
        loaded from, byte for byte), `path/config.json`, and the tokenizer's file when the model
        has one. Everything is written under temporary names, then renamed into place."""
        checkpoint.save(to_official(unstack_layers(self.params)), path, self.config)
        if self.tokenizer is not None:
            target = os.path.join(os.fspath(path), TOKENIZER_FILE)
            if os.path.abspath(self.tokenizer.path) != os.path.abspath(target):
                tmp = f"{target}.tmp-{os.getpid()}"
                shutil.copyfile(self.tokenizer.path, tmp)
                os.replace(tmp, target)

    def trace(self, tokens: Any) -> Trace:
        """Forward pass on int tokens [B, T] recording, per layer, the router probabilities and
        chosen experts, expert load, attention logits before/after the cap and the residual RMS
        (see grok1.inspect)."""
        return inspect.trace(self, tokens)

    def run_with_cache(self, tokens: Any, names: Any) -> tuple[np.ndarray, "ActivationCache"]:
        """Forward pass on int tokens [B, T] -> (logits [B, T, V], {name: numpy array} of just the
        hook points `names`, e.g. "blocks.3.hook_resid_post"; docs/INSPECTING.md lists them)."""
        return activations.run_with_cache(self, tokens, names)

    def run_with_hooks(self, tokens: Any, hooks: dict, names: Any = ()
                       ) -> tuple[np.ndarray, "ActivationCache"]:
        """Forward pass on int tokens [B, T] with `hooks` {name: fn(value, name) -> replacement}
        applied where each named activation is computed -> (logits, ActivationCache of `names`)."""
        return activations.run_with_hooks(self, tokens, hooks, names)

    def check_tokens(self, tokens: Any) -> np.ndarray:
        """tokens as an int32 [B, T] array, or ValueError naming what is wrong and what is allowed."""
        try:
            array = np.asarray(tokens)
        except ValueError:  # numpy's "inhomogeneous shape": rows of different lengths
            raise ValueError("tokens must be a rectangular [batch, time] array of ints: its rows have "
                             "different lengths (right-pad them with the pad token "
                             f"{self.config.pad_token})") from None
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"tokens must be a non-empty 2-D [batch, time] array of ints, "
                             f"got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {array.dtype}")
        if array.shape[1] > self.config.sequence_len:
            raise ValueError(f"{array.shape[1]} tokens do not fit the model's context of "
                             f"{self.config.sequence_len} (sequence_len); shorten the prompt")
        if array.min() < 0 or array.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got values in [{array.min()}, {array.max()}]")
        return array.astype(np.int32)

    def init_cache(self, batch: int, seq_len: Optional[int] = None) -> KVCache:
        """An empty KV cache for `batch` rows of `seq_len` positions (default: sequence_len)."""
        return KVCache.zeros(self.config, batch, seq_len, self.dtype)

    def generate(self, prompts: Any, **settings: Any) -> list:
        """Complete a batch of prompts (strings or lists of token ids) -> list of
        `Completion` (grok1/generation/requests.py). Settings: max_new_tokens, temperature, top_p, top_k,
        frequency_penalty, presence_penalty, seed (None: fresh), stop, logprobs, strict, slots
        (see grok1/generation/settings.py). Text prompts start with BOS when `config.add_bos`."""
        return generation.generate(self, prompts, **settings)

    def stream(self, prompt: Any, **settings: Any):
        """Complete one prompt, yielding `Delta`s (.text, .token_ids) as tokens arrive."""
        return generation.stream(self, prompt, **settings)

    def score(self, prompts: Any, top_n: int = 0) -> list:
        """Log-probabilities of the prompts' own tokens (strings or lists of token ids, ragged,
        any number): a `Score` per prompt (grok1/generation/scoring.py) with float32 numpy
        `logprobs[i]` = log p(token i+1 | tokens 0..i) and the `top_n` likeliest tokens at each
        position. Computed on the devices beside the output projection (never the full logits
        on the host), prefill only, batched through the model's engine."""
        return generation.score(self, prompts, top_n)


def load(path: str | os.PathLike, *, mesh: Optional[jax.sharding.Mesh | str] = None, dtype: Any = None,
         tokenizer: Optional[str | os.PathLike] = None,
         config: Optional[ModelConfig | str] = None, progress: Optional[bool] = None) -> Model:
    """Load a folder holding `ckpt-0/` and `config.json` (and optionally `tokenizer.model`).

    `dtype` is the compute dtype: "float32", "bfloat16", a jnp dtype, or None for the platform
    default (float32 on CPU, bfloat16 on accelerators); the weights stay as stored whatever it
    is (int8 and bfloat16 in the release: resident at the checkpoint's size, grok1/weights/layout.py).
    `mesh` shards the parameters over its devices; None keeps them on one device.
    `config` (a ModelConfig or a PRESETS name) replaces `config.json`, e.g. for the release,
    which ships none. The checkpoint is validated (files, shapes, dtypes, memory per device)
    before anything is loaded; a progress bar shows when stderr is a terminal, unless
    `progress=False`. `mesh` may also be a spec such as "1x8" (built with grok1.make_mesh).
    """
    path = os.fspath(path)
    compute_dtype = resolve_dtype(dtype)
    mesh = resolve_mesh(mesh)
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be the path of a tokenizer.model or None (the one in the "
                        f"checkpoint folder, if any), got {type(tokenizer).__name__}")
    config = (resolve_config(config, none_means="read the checkpoint's config.json")
              or checkpoint.read_config(path))
    if mesh is None:
        # Read into host buffers of the stacked compute layout, then placed on the device (on
        # CPU: the same memory): the weights are held once.
        stack = HostStack(config.num_layers)
        checkpoint.load_params(path, config, stack, progress=progress)
        params = stack.placed(jax.devices()[0])
    else:
        # Each tensor goes straight into its final sharding over `mesh`, each linear weight is
        # laid out for compute where it lies, then the layers are stacked for the model's one
        # compiled layer body.
        params = record_splits(stack_layers(to_compute_layout(
            checkpoint.load_params(path, config, mesh=mesh, progress=progress), mesh)))
    tok = None
    tokenizer_path = tokenizer or os.path.join(path, TOKENIZER_FILE)
    if tokenizer is not None or os.path.isfile(tokenizer_path):
        tok = Tokenizer(tokenizer_path, vocab_size=config.vocab_size)
    return Model(config=config, params=params, dtype=compute_dtype, mesh=mesh, tokenizer=tok)
