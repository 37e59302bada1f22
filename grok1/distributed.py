"""Several processes (hosts) as one JAX mesh: joining the cluster, and a launcher.

JAX is multi-controller: the same program runs once per process, each process drives its own
local devices, and `jax.devices()` lists the devices of all of them, so `make_mesh` spans them
all. Each process reads from a tensor file only the slices of its own devices
(`checkpoint.load_params`); results are gathered to every process (`sharding.to_host`).

One machine, N processes on the loopback interface (CPU devices for testing):

    python -m grok1.distributed --num-processes 2 --devices-per-process 4 -- python my_script.py

Real hosts: run the same command on every host, naming the coordinator (host 0) and its id:

    python -m grok1.distributed --num-processes 2 --process-id 0 --coordinator host0:12355 -- ...
    python -m grok1.distributed --num-processes 2 --process-id 1 --coordinator host0:12355 -- ...

A scheduler (Slurm, Kubernetes, ...) can instead set the three variables itself on every host:
GROK1_COORDINATOR=host0:12355, GROK1_NUM_PROCESSES and GROK1_PROCESS_ID (0 ... N-1).

The launcher passes the cluster to the command through environment variables; the command calls
`grok1.distributed.initialize()` before any other JAX call (a no-op when they are absent).
`run.py` calls `join_cluster()`, which also leaves all printing to process 0.

Every process runs the same program and must issue the same jitted calls in the same order: data
that only one process has (a line typed on process 0's stdin, a seed drawn from the OS) is sent
to the others with `share_from_main` before it steers any computation.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

ENV_COORDINATOR = "GROK1_COORDINATOR"
ENV_NUM_PROCESSES = "GROK1_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK1_PROCESS_ID"
ENV_COLLECTIVE_LOGS = "GROK1_COLLECTIVE_LOGS"
DEFAULT_TIMEOUT_S = 300

# Runs before each launched command, then becomes it (exec): the command gets SIGKILL when the
# launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG; elsewhere nothing). Done in the child
# rather than with Popen(preexec_fn=...), which would fork a possibly multithreaded launcher.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = os.getppid()
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(137)
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as e:
    sys.exit(f"grok1.distributed: cannot run {sys.argv[1]!r}: {e.strerror}")
"""


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join the cluster (arguments, else the launcher's environment variables); False if single-process.

    On CPU the cross-process collectives go through gloo. `timeout_s` bounds the wait for the
    other processes to connect, and how long the others wait once a process stops heartbeating.
    Gloo prints a "[Gloo] Rank N is connected ..." line per device and collective group on the
    C++ stdout; those are dropped (`quiet_native_stdout`) unless GROK1_COLLECTIVE_LOGS=1.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(f"a multi-process run needs the coordinator address, the number of processes "
                         f"and this process's id (got {coordinator!r}, {num_processes!r}, {process_id!r}); "
                         f"set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or use "
                         f"`python -m grok1.distributed`")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id must lie in [0, {num_processes}), got {process_id}")
    if os.environ.get(ENV_COLLECTIVE_LOGS, "") in ("", "0"):
        quiet_native_stdout()
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=min(timeout_s, 100),
                               shutdown_timeout_seconds=min(timeout_s, 60))
    return True


def quiet_native_stdout() -> None:
    """Keep Python's sys.stdout on the real standard output, and send what native libraries write
    to file descriptor 1 (gloo's connection chatter) to /dev/null.

    Python's output moves to a duplicate of the descriptor; descriptor 1 itself is pointed at
    /dev/null. Idempotent.
    """
    if getattr(sys.stdout, "_grok1_moved", False):
        return
    sys.stdout.flush()
    real = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    moved = os.fdopen(real, "w", buffering=1 if sys.stdout.line_buffering else -1,
                      encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    moved._grok1_moved = True
    sys.stdout = moved


def process_index() -> int:
    """This process's index in the cluster (0 alone, or before joining one)."""
    import jax
    return jax.process_index()


def is_main_process() -> bool:
    """True on process 0, the one that reads input and prints."""
    return process_index() == 0


_silenced = False  # set on processes other than 0 by silence_other_processes


def silence_other_processes() -> None:
    """On every process but 0: standard output and error go to /dev/null, so that the cluster
    prints each line once. An uncaught exception still reaches the real stderr, tagged with the
    process index, so that a failure of one process is explained."""
    global _silenced
    if is_main_process():
        return
    index, real_stderr = process_index(), sys.stderr
    _silenced = True
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    default_hook = sys.excepthook

    def report(kind, value, traceback):
        sys.stderr = real_stderr
        print(f"[process {index}]", end=" ", file=real_stderr, flush=True)
        default_hook(kind, value, traceback)

    sys.excepthook = report


def error_stream():
    """Where a one-line error of this process goes: stderr on process 0, the real stderr tagged
    with the process index on the others (silenced otherwise)."""
    if not _silenced:
        return sys.stderr
    return _Tagged(sys.__stderr__, f"[process {process_index()}] ")


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
    import jax
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
        import jax
        self.name = name
        self.count = 0
        self.processes = jax.process_count()
        self.index = jax.process_index()

    def _key(self, count: int, process: int) -> str:
        return f"grok1/broadcast/{self.name}/{count}/{process}"

    def publish(self, value: Any) -> None:
        """(Process 0.) Send `value` (JSON-serialisable) to every other process."""
        import json
        client = _store_client()
        text = json.dumps(value)
        for process in range(1, self.processes):
            client.key_value_set(self._key(self.count, process), text)
        self.count += 1

    def receive(self) -> Any:
        """(Other processes.) The next published value; blocks until it comes."""
        import jax
        import json
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


def join_cluster(timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """For programs such as run.py: `initialize()` from the environment, then leave all printing to
    process 0 (`silence_other_processes`). False, and nothing changed, for a single process."""
    if not initialize(timeout_s=timeout_s):
        return False
    silence_other_processes()
    return True


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(base: dict, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: Optional[int]) -> dict:
    """The environment of one process of the cluster."""
    env = dict(base, **{ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                        ENV_PROCESS_ID: str(process_id)})
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return env


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: Optional[int] = None,
           coordinator: Optional[str] = None, process_ids: Optional[Sequence[int]] = None,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Run `command` as processes `process_ids` (default: all) of an N-process cluster; return its exit code.

    0 when all succeed. If one fails, the others are killed and its code is returned; past
    `timeout_s` all are killed and 124 is returned. Either way the reason goes to stderr.
    """
    if not command:
        raise ValueError("no command to launch (put it after `--`)")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    ids = list(range(num_processes)) if process_ids is None else list(process_ids)
    if any(not 0 <= i < num_processes for i in ids):
        raise ValueError(f"process ids must lie in [0, {num_processes}), got {ids}")
    procs = {i: subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, *command], start_new_session=True,
                                 env=process_env(os.environ, coordinator, num_processes, i, devices_per_process))
             for i in ids}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = {i: p.poll() for i, p in procs.items()}
            failed = [i for i, code in codes.items() if code not in (None, 0)]
            if failed:
                code = codes[failed[0]]
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                print(f"grok1.distributed: process {failed[0]} {how}; stopping the others",
                      file=sys.stderr, flush=True)
                return 128 - code if code < 0 else code
            if all(code == 0 for code in codes.values()):
                return 0
            if time.monotonic() > deadline:
                running = [i for i, code in codes.items() if code is None]
                print(f"grok1.distributed: process(es) {running} still running after {timeout_s:g} s; "
                      f"stopping them", file=sys.stderr, flush=True)
                return 124
            time.sleep(0.1)
    finally:
        for p in procs.values():
            _stop(p)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a launched process and its children (its own session), then kill if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grok1.distributed",
        description="Run a command as the processes of a multi-process JAX cluster.")
    parser.add_argument("--num-processes", type=int, required=True, help="processes in the whole cluster")
    parser.add_argument("--process-id", type=int, action="append",
                        help="run only this process (repeatable); default: all of them, on this machine")
    parser.add_argument("--coordinator", help="host:port of process 0 (default: 127.0.0.1 and a free port)")
    parser.add_argument("--devices-per-process", type=int,
                        help="force this many CPU devices per process (testing without accelerators)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds before every process is stopped (default {DEFAULT_TIMEOUT_S})")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.process_id and args.coordinator is None and args.num_processes > len(args.process_id):
        parser.error("--process-id for a cluster spread over several hosts needs --coordinator host0:port")
    try:
        return launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                      coordinator=args.coordinator, process_ids=args.process_id, timeout_s=args.timeout)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_exit)  # so that `launch` stops its processes on the way out
    sys.exit(main())
