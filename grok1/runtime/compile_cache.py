"""JAX's persistent compilation cache: compiled steps saved on disk, so a second run skips XLA.

On by default for `run.py`, in ~/.cache/grok1/jax (or
$XDG_CACHE_HOME/grok1/jax); another folder with --compilation-cache DIR or
GROK1_COMPILATION_CACHE=DIR, none with --no-compilation-cache or GROK1_COMPILATION_CACHE=off.
Entries are keyed by the program, the devices and the JAX version, so a stale entry is never
used; the folder can be deleted at any time. Library users opt in with `enable()`. The plan
(`python -m grok1.plan`) leaves it off: it reports how long the steps take to compile.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_DIR = "GROK1_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "none", "")
# Store every compilation that takes longer than this; JAX's default (1 s) would skip the small
# model's steps, which are most of its start-up time on CPU taken together.
MIN_COMPILE_SECONDS = 0.2


def default_dir() -> str:
    """~/.cache/grok1/jax, or under $XDG_CACHE_HOME when set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "grok1", "jax")


def cache_dir(path: Optional[str] = None) -> Optional[str]:
    """The folder to use: `path`, else $GROK1_COMPILATION_CACHE, else the default; None when off."""
    if path is not None:
        return os.path.abspath(os.path.expanduser(path))
    value = os.environ.get(ENV_DIR)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else os.path.abspath(os.path.expanduser(value))
    return default_dir()


def enable(path: Optional[str] = None) -> Optional[str]:
    """Turn the persistent cache on in `cache_dir(path)` (created if needed); the folder, or None
    when switched off by the environment. OSError when the folder cannot be created."""
    folder = cache_dir(path)
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    import jax
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
