"""Model configuration: the official Grok-1 field names, derived sizes, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import jax


class ConfigError(ValueError):
    """A model configuration that cannot describe a Grok-1 model."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Grok-1-architecture model, named as in the official `config.json`."""

    vocab_size: int = 131072
    emb_size: int = 6144
    num_layers: int = 64
    num_q_heads: int = 48
    num_kv_heads: int = 8
    key_size: int = 128
    widening_factor: float = 8
    num_experts: int = 8
    num_selected_experts: int = 2
    sequence_len: int = 8192
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    attn_output_multiplier: float = 0.08838834764831845
    pad_token: int = 0
    eos_token: int = 2
    # Whether text prompts start with `bos_token`: a property of how the model was trained. The
    # small model saw [BOS] at every document start (its held-out loss is lower with it, see
    # docs/TRAINING.md); the Grok-1 release is run without one by the official runner.
    bos_token: int = 1
    add_bos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def ffn_size(self) -> int:
        """Hidden width of one expert: int(widening * d) * 2 // 3, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (-size) % 8

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def params_per_layer(self) -> int:
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attention = d * self.num_q_heads * self.key_size * 2 + d * self.num_kv_heads * self.key_size * 2
        return attention + d * e + 3 * e * d * f + 4 * d

    @property
    def param_count(self) -> int:
        """Total parameters: embeddings, final norm and every decoder layer."""
        return self.vocab_size * self.emb_size + self.emb_size + self.num_layers * self.params_per_layer

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError naming the first field that makes the model ill-formed."""
        positive = ["vocab_size", "emb_size", "num_layers", "num_q_heads", "num_kv_heads", "key_size",
                    "num_experts", "num_selected_experts", "sequence_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ["widening_factor", "embedding_multiplier_scale", "output_multiplier_scale",
                     "attn_output_multiplier"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if self.emb_size != self.num_q_heads * self.key_size:
            raise ConfigError(
                f"emb_size ({self.emb_size}) must equal num_q_heads * key_size "
                f"({self.num_q_heads} * {self.key_size} = {self.num_q_heads * self.key_size})")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.key_size % 2:
            raise ConfigError(f"key_size must be even for rotary embeddings, got {self.key_size}")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(f"num_selected_experts ({self.num_selected_experts}) must be at most "
                              f"num_experts ({self.num_experts})")
        if not isinstance(self.add_bos, bool):
            raise ConfigError(f"add_bos must be true or false, got {self.add_bos!r}")
        for name in ["pad_token", "eos_token", "bos_token"]:
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as official-format JSON; written atomically to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "ModelConfig":
        """Read a config from a JSON file path, or from a JSON string."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text):
                raise ConfigError(f"config file not found: {text}")
            with open(text) as f:
                text = f.read()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e}): {source}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config must be a JSON object, got {type(values).__name__}: {source}")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # The released Grok-1 (314B parameters, 770 tensors).
    "grok-1": ModelConfig(),
    # The performance benchmark model: Grok-1 architecture at 1B scale.
    "bench-1b": ModelConfig(
        vocab_size=131072, emb_size=1024, num_q_heads=16, num_kv_heads=4, key_size=64, num_layers=4,
        widening_factor=8, sequence_len=512, embedding_multiplier_scale=32.0,
        attn_output_multiplier=0.125),
}


def resolve_config(config: Any, none_means: Optional[str] = None) -> Optional[ModelConfig]:
    """`config` as a ModelConfig: itself, or the one a PRESETS name stands for; None passes
    through where the caller gives None a meaning (`none_means`, e.g. "read the checkpoint's
    config.json"). ValueError for an unknown name, listing the presets; TypeError otherwise."""
    if isinstance(config, ModelConfig) or (config is None and none_means):
        return config
    presets = ", ".join(sorted(PRESETS))
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; presets: {presets}")
        return PRESETS[config]
    allowed = (f"a ModelConfig, a preset name ({presets}) or None to {none_means}" if none_means
               else f"a ModelConfig or a preset name ({presets})")
    raise TypeError(f"config must be {allowed}; got {type(config).__name__}")
