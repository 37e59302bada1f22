"""A progress bar for long loads: tensors done, GB read, GB/s and ETA, on a terminal only.

`Progress(enabled=None)` shows a tqdm bar when stderr is a TTY and stays silent otherwise (logs,
pipes, tests); `enabled=False` silences it, `enabled=True` forces it.
"""

from __future__ import annotations

import sys
from typing import Optional


class Progress:
    """Counts tensors and bytes; draws a bar when enabled. Update it from one thread."""

    def __init__(self, tensors: int, total_bytes: int, *, enabled: Optional[bool] = None,
                 desc: str = "loading"):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.tensors, self.done = tensors, 0
        self._bar = None
        if enabled:
            from tqdm import tqdm
            # bytes as the unit gives GB, GB/s and the ETA; tensors go in the postfix.
            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1000, file=sys.stderr, dynamic_ncols=True)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"{self.done}/{self.tensors} tensors"

    def update(self, nbytes: int) -> None:
        """One more tensor of `nbytes` read and placed."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
