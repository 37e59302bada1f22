"""The errors of reading and writing a checkpoint: CheckpointError, the one every reader and
writer raises, naming the file or parameter at fault, and how a parser's failures become it."""

from __future__ import annotations

import contextlib
from typing import Iterator


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or parameter at fault."""


class Corrupt(Exception):
    """A pickle that is not a checkpoint tensor as numpy writes one; the caller names the file."""


class Unusual(Exception):
    """A well-formed pickle in a layout the scanner does not follow (e.g. a Fortran-order array);
    the restricted unpickler reads such files."""


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Whatever reading `path` raises becomes a CheckpointError naming it: a parser of untrusted
    bytes fails in many ways (the C unpickler alone raises a dozen exception types)."""
    try:
        yield
    except (CheckpointError, Unusual):
        raise
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Corrupt as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 - any other failure of parsing is a corrupt file
        detail = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {detail})") \
            from None
