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

The launcher passes the cluster to the command through environment variables; the command calls
`grok1.distributed.initialize()` before any other JAX call (a no-op when they are absent).
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

ENV_COORDINATOR = "GROK1_COORDINATOR"
ENV_NUM_PROCESSES = "GROK1_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK1_PROCESS_ID"
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
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=min(timeout_s, 100),
                               shutdown_timeout_seconds=min(timeout_s, 60))
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
