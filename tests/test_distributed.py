"""Multi-process runs: 2 processes x 4 CPU devices act as one 8-device mesh; the launcher never hangs.

run.py and Model.generate/stream on such a cluster give what one process gives, printed once by
process 0; a process that dies ends the whole run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from grok1 import distributed
from conftest import REPO

GREEDY_STEPS = 6

# Greedy decoding by full recompute over a fixed padded length (one compile): right padding with
# the pad token leaves every earlier position's logits unchanged.
GREEDY_WORKER = """
import json, os, sys
from grok1 import distributed
distributed.initialize()
import jax, numpy as np, grok1
from grok1.mesh import make_mesh

path, steps = sys.argv[1], int(sys.argv[2])
model = grok1.load(path, mesh=make_mesh("1x8"), dtype="float32")
prompt = json.load(open(path + "/golden.json"))["prompts"][0]
tokens = np.full((1, len(prompt) + steps), model.config.pad_token, np.int32)
tokens[0, :len(prompt)] = prompt
for i in range(len(prompt), len(prompt) + steps):
    tokens[0, i] = model.logits(tokens)[0, i - 1].argmax()
# Both processes share one stdout pipe: one write() of the whole line keeps it from interleaving.
result = {"process": jax.process_index(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "tokens": tokens[0, len(prompt):].tolist()}
sys.stdout.write("RESULT " + json.dumps(result) + "\\n")
sys.stdout.flush()
"""


# Model.generate of 10 requests through 4 slots (so slots are reused), one seed per request, then
# Model.stream of one through the same 4-slot runner (no new compilation); a 1x8 mesh over the cluster.
GENERATE_WORKER = """
import json, sys
from grok1 import distributed
distributed.initialize()
import jax, grok1
from grok1.mesh import make_mesh

path = sys.argv[1]
model = grok1.load(path, mesh=make_mesh("1x8"), dtype="float32")
prompts = json.load(open(path + "/golden.json"))["prompts"]
requests = [prompts[i % len(prompts)][: 3 + i] for i in range(10)]
done = model.generate(requests, slots=4, max_new_tokens=5, temperature=1.0,
                      seed=list(range(100, 110)))
streamed = [d.token_ids for d in model.stream(requests[0], slots=4, max_new_tokens=5, temperature=1.0, seed=7)]
result = {"process": jax.process_index(), "generated": [c.token_ids for c in done], "streamed": streamed}
sys.stdout.write("RESULT " + json.dumps(result) + "\\n")
sys.stdout.flush()
"""

RUN_GREEDY = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "12", "--quiet"]


def repo_env(**extra: str) -> dict:
    """The environment of a subprocess that imports grok1 from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(env, **extra)


def launch(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "grok1.distributed", *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def greedy_one_process(path, steps: int) -> list[int]:
    import grok1
    model = grok1.load(path, dtype="float32")
    prompt = json.load(open(path / "golden.json"))["prompts"][0]
    tokens = np.full((1, len(prompt) + steps), model.config.pad_token, np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + steps):
        tokens[0, i] = model.logits(tokens)[0, i - 1].argmax()
    return tokens[0, len(prompt):].tolist()


def test_two_processes_of_four_devices_decode_like_one_process(two_layer):
    proc = launch("--num-processes", "2", "--devices-per-process", "4", "--timeout", "240", "--",
                  sys.executable, "-c", GREEDY_WORKER, str(two_layer.path), str(GREEDY_STEPS), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in results)
    expected = greedy_one_process(two_layer.path, GREEDY_STEPS)
    assert [r["tokens"] for r in results] == [expected, expected]


def test_launcher_stops_the_others_when_one_process_fails(capfd):
    worker = ("import os, sys, time\n"
              "if os.environ['GROK1_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(120)\n")
    start = time.monotonic()
    assert distributed.main(["--num-processes", "2", "--", sys.executable, "-c", worker]) == 3
    assert "process 1 exited with code 3" in capfd.readouterr().err
    assert time.monotonic() - start < 30


def test_launcher_stops_everything_after_its_timeout(capfd, monkeypatch):
    monkeypatch.setattr(distributed, "LEADER_GRACE_S", 1.0)  # the follower here never hears process 0
    code = distributed.main(["--num-processes", "2", "--timeout", "1", "--",
                             sys.executable, "-c", "import time; time.sleep(120)"])
    assert code == 124
    assert "still running after 1 s" in capfd.readouterr().err


def test_launcher_gives_each_process_its_id_and_the_shared_coordinator(capfd):
    # One write() per process: the processes share the pipe, and separate writes could interleave.
    worker = ("import os; e = os.environ; os.write(1, ' '.join(['ENV', e['GROK1_PROCESS_ID'], "
              "e['GROK1_NUM_PROCESSES'], e['GROK1_COORDINATOR'], e['XLA_FLAGS']]).encode() + b'\\n')")
    assert distributed.main(["--num-processes", "3", "--devices-per-process", "2", "--",
                             sys.executable, "-c", worker]) == 0
    lines = sorted(line.split()[1:] for line in capfd.readouterr().out.splitlines() if line.startswith("ENV"))
    assert [line[0] for line in lines] == ["0", "1", "2"]
    assert {line[1] for line in lines} == {"3"}
    assert len({line[2] for line in lines}) == 1 and lines[0][2].startswith("127.0.0.1:")
    assert {line[3] for line in lines} == {"--xla_force_host_platform_device_count=2"}


def test_initialize_without_a_cluster_is_single_process(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


def test_initialize_names_the_missing_cluster_settings(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match="number of processes"):
        distributed.initialize()


def test_initialize_rejects_a_process_id_outside_the_cluster():
    with pytest.raises(ValueError, match=r"process id must lie in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)


def test_launcher_refuses_an_empty_command(capfd):
    with pytest.raises(SystemExit) as stopped:
        distributed.main(["--num-processes", "2", "--"])
    assert stopped.value.code == 2 and "no command" in capfd.readouterr().err


def test_launcher_refuses_a_process_id_outside_the_cluster(capfd):
    with pytest.raises(SystemExit) as stopped:
        distributed.main(["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1",
                          "--", sys.executable, "-c", "pass"])
    assert stopped.value.code == 2 and "process ids must lie in [0, 2)" in capfd.readouterr().err


@pytest.fixture(scope="module")
def one_process_text() -> str:
    """What run.py prints for RUN_GREEDY in a single process."""
    proc = subprocess.run([sys.executable, "run.py", *RUN_GREEDY], env=repo_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_generate_and_stream_with_seeds_on_two_processes_equal_one_process(two_layer):
    proc = launch("--num-processes", "2", "--devices-per-process", "4", "--timeout", "280", "--",
                  sys.executable, "-c", GENERATE_WORKER, str(two_layer.path), timeout=320)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]

    import grok1
    model = grok1.load(two_layer.path, dtype="float32")
    prompts = two_layer.prompts
    requests = [prompts[i % len(prompts)][: 3 + i] for i in range(10)]
    expected = [c.token_ids for c in model.generate(requests, slots=4, max_new_tokens=5, temperature=1.0,
                                                    seed=list(range(100, 110)))]
    streamed = [d.token_ids for d in model.stream(requests[0], slots=4, max_new_tokens=5, temperature=1.0, seed=7)]
    for result in results:
        assert result["generated"] == expected
        assert result["streamed"] == streamed


def test_run_py_started_by_a_scheduler_prints_the_one_process_text_once_from_process_0(one_process_text):
    # No launcher: each process gets the cluster from environment variables, as a scheduler sets them.
    coordinator = f"127.0.0.1:{distributed.free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "run.py", "--mesh", "1x8", *RUN_GREEDY], cwd=str(REPO), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=repo_env(GROK1_COORDINATOR=coordinator, GROK1_NUM_PROCESSES="2", GROK1_PROCESS_ID=str(i),
                     XLA_FLAGS="--xla_force_host_platform_device_count=4"))
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    (out0, err0), (out1, err1) = outputs
    assert out0 == one_process_text and len(out0.split()) >= 3
    assert out1 == "" and err1 == ""
    assert "[Gloo]" not in out0 + err0


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def launched_process(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of cluster process `process_id` among the launcher's children (Linux /proc)."""
    for pid in child_pids(launcher.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"{distributed.ENV_PROCESS_ID}={process_id}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no launched process {process_id}")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the launched processes in /proc")
def test_interactive_run_py_answers_on_process_0_and_a_killed_process_ends_the_run(one_process_text):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "grok1.distributed", "--num-processes", "2", "--devices-per-process", "4",
         "--timeout", "280", "--", sys.executable, "run.py", "--mesh", "1x8", "--interactive",
         *RUN_GREEDY[2:]], cwd=str(REPO), env=repo_env(), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        launcher.stdin.write("Once upon a time\n")
        launcher.stdin.flush()
        answer = launcher.stdout.readline()   # process 0 has read the line and streamed the text
        assert answer == one_process_text
        os.kill(launched_process(launcher, 1), signal.SIGKILL)
        start = time.monotonic()
        code = launcher.wait(timeout=60)
        assert code != 0 and time.monotonic() - start < 30
        assert "process 1 was killed by signal 9" in launcher.stderr.read()
    finally:
        if launcher.poll() is None:
            launcher.kill()


def serving_cluster(**env: str) -> tuple[subprocess.Popen, str]:
    """`run.py --serve` on 2 processes x 4 devices under the launcher with no --timeout: the
    launcher and the server's URL, once process 0 listens."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "grok1.distributed", "--num-processes", "2", "--devices-per-process", "4",
         "--", sys.executable, "run.py", "--serve", "--port", "0", "--mesh", "1x8", "--quiet"],
        cwd=str(REPO), env=repo_env(PYTHONUNBUFFERED="1", **env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in launcher.stdout:   # with GROK1_COLLECTIVE_LOGS=1, gloo's lines come first
        seen.append(line)
        if line.startswith("serving"):
            return launcher, line.split(" on ", 1)[1].split()[0]
    launcher.kill()
    raise AssertionError("".join(seen)[-2000:] + launcher.stderr.read()[-3000:])


def launcher_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("grok1.distributed:")]


def test_the_launcher_sets_no_time_limit_of_its_own():
    """Servers and interactive runs under the launcher run until stopped (the launcher once
    stopped everything after 300 s)."""
    import inspect
    assert inspect.signature(distributed.launch).parameters["timeout_s"].default is None


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the launched processes in /proc")
def test_a_served_cluster_stopped_by_sigterm_ends_with_one_line_and_no_abort():
    # GROK1_COLLECTIVE_LOGS=1 keeps the native output of process 1, where JAX's client printed a
    # page of C++ frames when its coordinator (process 0) went first.
    launcher, url = serving_cluster(GROK1_COLLECTIVE_LOGS="1")
    try:
        import httpx
        answer = httpx.post(url + "/completions", timeout=120,
                            json=dict(model="small", prompt="Once upon a time", max_tokens=4, temperature=0))
        assert answer.status_code == 200
        follower = launched_process(launcher, 1)
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=90)
        stderr = launcher.stderr.read()
        assert code == 128 + signal.SIGTERM
        assert launcher_lines(stderr) == ["grok1.distributed: stopped by signal 15; stopping the cluster, "
                                          "process 0 first"]
        assert "Check failure" not in stderr and "Terminating process" not in stderr, stderr[-3000:]
        assert not os.path.exists(f"/proc/{follower}")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the launched processes in /proc")
def test_a_follower_whose_leader_dies_ends_without_an_abort_dump():
    launcher, _ = serving_cluster()
    try:
        os.kill(launched_process(launcher, 0), signal.SIGKILL)
        code = launcher.wait(timeout=60)
        stderr = launcher.stderr.read()
        assert code != 0
        assert launcher_lines(stderr) == ["grok1.distributed: process 0 was killed by signal 9 (SIGKILL); "
                                          "stopping the others"]
        assert "Check failure" not in stderr and "Terminating process" not in stderr, stderr[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def two_processes_report(worker: str, tag: str) -> list:
    """Run `worker` (Python source) as 2 processes of one device each; the JSON each printed
    after `tag`, sorted (so by process index when that comes first)."""
    proc = launch("--num-processes", "2", "--devices-per-process", "1", "--timeout", "120", "--",
                  sys.executable, "-c", worker, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                  if line.startswith(tag + " "))


def test_fresh_seeds_are_process_0s_draw_on_every_process():
    worker = ("import sys, json\n"
              "from grok1 import distributed\n"
              "from grok1.generation import settings\n"
              "distributed.initialize()\n"
              "import jax\n"
              "agreed = settings.draw_fresh_seeds(3)\n"
              "sys.stdout.write('SEED ' + json.dumps([jax.process_index(), agreed]) + '\\n')\n"
              "sys.stdout.flush()\n")
    (_, agreed_0), (_, agreed_1) = two_processes_report(worker, "SEED")
    assert agreed_0 == agreed_1 and len(set(agreed_0)) == 3


def test_broadcast_delivers_process_0s_values_in_order_and_leaves_no_keys_behind():
    worker = ("import sys, json, time\n"
              "from grok1 import distributed\n"
              "from grok1.runtime import processes\n"
              "distributed.initialize()\n"
              "import jax\n"
              "stream = processes.Broadcast('test')\n"
              "values = [{'step': i, 'ids': list(range(i))} for i in range(3)]\n"
              "if jax.process_index() == 0:\n"
              "    for value in values:\n"
              "        stream.publish(value)\n"
              "        time.sleep(1)\n"   # the receiver waits for each one
              "    got = values\n"
              "else:\n"
              "    got = [stream.receive() for _ in values]\n"
              "    client = processes._store_client()\n"
              "    left = [k for k, _ in client.key_value_dir_get('grok1/broadcast/test/')]\n"
              "    assert left == [], left\n"
              "sys.stdout.write('GOT ' + json.dumps([jax.process_index(), got]) + '\\n')\n"
              "sys.stdout.flush()\n")
    (_, sent), (_, received) = two_processes_report(worker, "GOT")
    assert received == sent and len(sent) == 3
