"""This process within a cluster of several (grok1/distributed.py joins one): who is process 0,
values shared from it, the stream of schedules a server's engine sends the others, and quiet
followers.

Every process runs the same program and must issue the same jitted calls in the same order: data
that only one process has (a line typed on process 0's stdin, a seed drawn from the OS) is sent
to the others with `share_from_main` before it steers any computation. With one process each of
these is the plain thing (`share_from_main(x)` is x).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import jax


def process_index() -> int:
    """This process's index in the cluster (0 alone, or before joining one)."""
    return jax.process_index()


def is_main_process() -> bool:
    """True on process 0, the one that reads input and prints."""
    return process_index() == 0


# Native libraries' output on processes other than 0 (gloo's chatter, the abort report of a
# process whose leader stopped first) is dropped unless this is set to 1.
ENV_COLLECTIVE_LOGS = "GROK1_COLLECTIVE_LOGS"

_silenced = False  # set on processes other than 0 by silence_other_processes
_real_stderr = None  # their original standard error, kept for one-line errors and tracebacks


def native_logs_wanted() -> bool:
    """Whether GROK1_COLLECTIVE_LOGS asks to keep native libraries' output."""
    return os.environ.get(ENV_COLLECTIVE_LOGS, "") not in ("", "0")


def silence_other_processes() -> None:
    """On every process but 0: standard output and error go to /dev/null, so that the cluster
    prints each line once, and so does what native code writes to file descriptor 2 (unless
    GROK1_COLLECTIVE_LOGS=1): when process 0 stops or dies first, JAX's distributed client of
    the others aborts with a page of C++ frames, while the launcher already says in one line
    which process ended and how. An uncaught Python exception still reaches the real stderr,
    tagged with the process index, so that a failure of one process is explained."""
    global _silenced, _real_stderr
    if is_main_process():
        return
    index = process_index()
    sys.stdout.flush()
    sys.stderr.flush()
    _real_stderr = os.fdopen(os.dup(2), "w", buffering=1)
    if not native_logs_wanted():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    _silenced = True
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    default_hook = sys.excepthook

    def report(kind, value, traceback):
        sys.stderr = _real_stderr
        print(f"[process {index}]", end=" ", file=_real_stderr, flush=True)
        default_hook(kind, value, traceback)

    sys.excepthook = report


def error_stream():
    """Where a one-line error of this process goes: stderr on process 0, the real stderr tagged
    with the process index on the others (silenced otherwise)."""
    if not _silenced:
        return sys.stderr
    return _Tagged(_real_stderr, f"[process {process_index()}] ")


class _Tagged:
    """A text stream that prefixes every write with a tag (used for one-line errors)."""

    def __init__(self, stream, tag: str):
        self.stream, self.tag = stream, tag

    def write(self, text: str) -> int:
        return self.stream.write(self.tag + text if text.strip() else text)

    def flush(self) -> None:
        self.stream.flush()


def share_from_main(value: Any) -> Any:
    """`value` as process 0 has it, on every process (a JSON-serialisable value: text, numbers,
    lists). With one process, `value` itself. Every process must call it at the same point.

    This is how input that only process 0 sees (its stdin) or that each process would draw
    differently (a fresh random seed) becomes the same on all of them, so they go on issuing the
    same computations. It goes through the coordinator's key-value store, not a collective: the
    others may wait for as long as a person takes to type a line (a gloo collective gives up
    after 30 s), and if process 0 dies the coordinator ends them.
    """
    global _main_values
    if jax.process_count() == 1:
        return value
    if _main_values is None:
        _main_values = Broadcast("share_from_main")
    if is_main_process():
        _main_values.publish(value)
        return value
    return _main_values.receive()


_main_values: Optional["Broadcast"] = None  # share_from_main's stream, made after initialize()


_SHARE_WAIT_MS = 3_600_000           # one wait; it is renewed until process 0 answers or dies


class Broadcast:
    """A stream of values from process 0 to every other process, one per `publish`, received in
    order: how a server's engine on process 0 tells the other processes each step's schedule, and
    what `share_from_main` sends.

    It goes through the coordinator's key-value store, and a receiver blocks (without spinning)
    until the next value comes, however long process 0 stays idle; each value goes to one key per
    receiving process, which that process deletes once read, so a long-lived stream leaves nothing
    behind in the store. Process 0 never waits for the others.
    """

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self.processes = jax.process_count()
        self.index = jax.process_index()

    def _key(self, count: int, process: int) -> str:
        return f"grok1/broadcast/{self.name}/{count}/{process}"

    def publish(self, value: Any) -> None:
        """(Process 0.) Send `value` (JSON-serialisable) to every other process."""
        client = _store_client()
        text = json.dumps(value)
        for process in range(1, self.processes):
            client.key_value_set(self._key(self.count, process), text)
        self.count += 1

    def receive(self) -> Any:
        """(Other processes.) The next published value; blocks until it comes."""
        client = _store_client()
        key = self._key(self.count, self.index)
        while True:
            try:
                text = client.blocking_key_value_get(key, _SHARE_WAIT_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        client.key_value_delete(key)
        self.count += 1
        return json.loads(text)


def _store_client():
    from jax._src import distributed as jax_distributed  # the store has no public API yet
    return jax_distributed.global_state.client
