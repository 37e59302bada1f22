"""Several processes (hosts) as one JAX mesh: joining the cluster, and a launcher.

JAX is multi-controller: the same program runs once per process, each process drives its own
local devices, and `jax.devices()` lists the devices of all of them, so `make_mesh` spans them
all. Each process reads from a tensor file only the slices of its own devices
(`checkpoint.load_params`); results are gathered to every process (`mesh.to_host`).

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

Every process runs the same program and must issue the same jitted calls in the same order
(grok1/runtime/processes.py: `share_from_main`, `Broadcast`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

from grok1.runtime.processes import native_logs_wanted, silence_other_processes

ENV_COORDINATOR = "GROK1_COORDINATOR"
ENV_NUM_PROCESSES = "GROK1_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK1_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300             # joining: how long processes wait for each other
# Stopping a cluster from outside: process 0 first (a server's engine then tells the others to
# stop, and they leave together); whatever still runs after this many seconds is stopped too.
LEADER_GRACE_S = 30.0
# After process 0 ends by itself, the others get this long to end too before they are stopped.
FOLLOWER_GRACE_S = 60.0

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
    if not native_logs_wanted():
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
           timeout_s: Optional[float] = None) -> int:
    """Run `command` as processes `process_ids` (default: all) of an N-process cluster; return its exit code.

    0 when all succeed. The processes run until they end (a server: until it is stopped), or
    for `timeout_s` when given (then 124). If one fails, the others are stopped and its code is
    returned; if the launcher is interrupted or sent SIGTERM, the cluster is stopped. Stopping
    takes process 0 first, so that it can tell the others to finish (`stop_cluster`). Each cause
    is one line on stderr.
    """
    if not command:
        raise ValueError("no command to launch (put it after `--`)")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout_s:g}")
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    ids = list(range(num_processes)) if process_ids is None else list(process_ids)
    if any(not 0 <= i < num_processes for i in ids):
        raise ValueError(f"process ids must lie in [0, {num_processes}), got {ids}")
    procs = {i: subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, *command],
                                 start_new_session=True,
                                 env=process_env(os.environ, coordinator, num_processes, i, devices_per_process))
             for i in ids}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    leader_done_at: Optional[float] = None
    orderly = True  # stopping for a reason outside the cluster: process 0 first
    try:
        while True:
            codes = {i: p.poll() for i, p in procs.items()}
            failed = [i for i, code in codes.items() if code not in (None, 0)]
            if failed:
                code = codes[failed[0]]
                _say(f"process {failed[0]} {_how(code)}; stopping the others")
                orderly = False  # the cluster cannot finish together any more
                return 128 - code if code < 0 else code
            if all(code == 0 for code in codes.values()):
                return 0
            running = [i for i, code in codes.items() if code is None]
            now = time.monotonic()
            if deadline is not None and now > deadline:
                _say(f"process(es) {running} still running after {timeout_s:g} s (--timeout); stopping them")
                return 124
            if codes.get(min(procs)) == 0 and len(procs) > 1:
                leader_done_at = leader_done_at or now
                if now - leader_done_at > FOLLOWER_GRACE_S:
                    _say(f"process {min(procs)} ended but process(es) {running} still run after "
                         f"{FOLLOWER_GRACE_S:g} s; stopping them")
                    return 1
            time.sleep(0.1)
    except KeyboardInterrupt:
        _say("interrupted; stopping the cluster, process 0 first")
        return 130
    except SystemExit as e:  # SIGTERM (see _raise_exit)
        _say(f"stopped by signal {e.code - 128}; stopping the cluster, process 0 first")
        raise
    finally:
        stop_cluster(procs, orderly)


def stop_cluster(procs: dict[int, subprocess.Popen], orderly: bool = True) -> None:
    """Stop the processes still running. `orderly`: the lowest-numbered one (process 0, the
    leader) first, so that a server's engine tells the others to finish and they all leave their
    distributed runtime together (killing them all at once left one aborting with a page of C++
    frames: JAX's client of a process whose coordinator vanished), and whatever still runs after
    LEADER_GRACE_S. Otherwise (a process failed, so the others cannot finish together) all at
    once. What lingers 5 s after SIGTERM is killed."""
    running = {i: p for i, p in procs.items() if p.poll() is None}
    if not running:
        return
    leader = min(procs)
    if orderly and leader in running:
        _signal(running[leader], signal.SIGTERM)
        end = time.monotonic() + LEADER_GRACE_S
        while time.monotonic() < end and any(p.poll() is None for p in running.values()):
            time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in running.values() if p.poll() is None]
        for p in alive:
            _signal(p, sig)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(p.poll() is None for p in alive):
            time.sleep(0.05)


def _say(line: str) -> None:
    print(f"grok1.distributed: {line}", file=sys.stderr, flush=True)


def _how(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"was killed by signal {-code}"


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


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
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which every process is stopped (default: none; the processes "
                             "run until they end, a server until it is stopped with Ctrl-C or SIGTERM)")
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
