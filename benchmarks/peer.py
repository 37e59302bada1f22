"""llama.cpp and grok1 back to back on the bench-1b checkpoint: one table, one machine, one date.

    python benchmarks/peer.py                  # after the llama-peer tool's build step (see below)
    python benchmarks/peer.py --repeat 1 --max-wait 0     # a quick check of the pipeline

llama.cpp comes from the llama-peer tool (`../shared/tools/llama-peer`, or `--tool`): its `build`
step must have run (`bash TOOL/llama_peer.sh benchmarks/.cache/bench-1b TOKENIZER build`), with
the same `LLAMA_PEER_DIR` / `LLAMA_PEER_BUILD` as here. This script converts the checkpoint with
the tool's `convert` step (skipped when the GGUFs are up to date), then times, one engine right
after the other:

- llama.cpp, per GGUF format: `llama-bench -p 512 -n 0` (prefill 512) and `llama-batched-bench
  -npp 128 -ntg 64 -npl 1,8` (decode at batch 1 and 8 after a 128-token prompt, tokens/s summed
  over the sequences), the measurements of the tool's `bench` step;
- grok1: `benchmarks/bench.py --prefill 512 --batch 1 8 --sampled` (defaults of `grok1.load`;
  greedy decode at context 128).

Before each process it waits for the 1-minute load average to drop below `--max-load` (at most
`--max-wait` seconds, then times anyway and marks the load with `!`), so that one engine's load
does not weigh on the next. Peak RSS is each process's own (`wait4`; grok1's as bench.py
reports it, without its probe process), the larger of an engine's processes. Raw outputs go to
benchmarks/.cache/peer-DATE/. When the tool, the tokenizer or the llama.cpp build is missing, it
says so in one line and exits 0 (nothing to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "benchmarks", ".cache")
CHECKPOINT = "bench-1b"
FORMATS = ("F32", "BF16", "Q8_0")
DEFAULT_TOOL = os.path.join(os.path.dirname(REPO), "shared", "tools", "llama-peer")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(REPO), "shared", "reference", "tokenizer.model")


@dataclass
class Row:
    """One engine's line of the table; None where a figure was not measured."""
    engine: str
    prefill_512: float | None = None
    decode_b1: float | None = None
    decode_b8: float | None = None
    peak_rss_bytes: int = 0
    load_before: str = ""
    load_after: str = ""


@dataclass
class Paths:
    """Where the llama-peer tool keeps its work: the build's binaries and the converted GGUFs."""
    tool: str
    build: str
    models: str

    @classmethod
    def from_env(cls, tool: str, env: Mapping[str, str]) -> "Paths":
        work = env.get("LLAMA_PEER_DIR") or "/tmp/llama-peer"   # the tool's own default
        build = env.get("LLAMA_PEER_BUILD") or os.path.join(work, "build")
        return cls(tool=tool, build=build, models=os.path.join(work, "models", CHECKPOINT))

    def binary(self, name: str) -> str:
        return os.path.join(self.build, "bin", name)

    def gguf(self, fmt: str) -> str:
        return os.path.join(self.models, f"{CHECKPOINT}-{fmt}.gguf")


def missing_prerequisite(paths: Paths, tokenizer: str) -> str | None:
    """Why the comparison cannot run here (one line), or None when it can."""
    script = os.path.join(paths.tool, "llama_peer.sh")
    if not os.path.isfile(script):
        return f"no llama-peer tool at {paths.tool} (pass --tool)"
    if not os.path.isfile(tokenizer):
        return f"no tokenizer at {tokenizer} (pass --tokenizer)"
    for name in ("llama-bench", "llama-batched-bench"):
        if not os.access(paths.binary(name), os.X_OK):
            return (f"no llama.cpp build at {paths.build} ({name} missing): run "
                    f"`bash {script} benchmarks/.cache/{CHECKPOINT} {tokenizer} build` "
                    "with the same LLAMA_PEER_DIR / LLAMA_PEER_BUILD")
    return None


# ---- running one process ----------------------------------------------------------------------

def wait_for_quiet(max_load: float, max_wait: float, poll: float = 5.0) -> str:
    """Wait until the 1-minute load average is below `max_load` (at most `max_wait` s); the load
    the timing starts at, with `!` when it was still above the limit."""
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return f"{load:.2f}"
        if time.monotonic() >= deadline:
            return f"{load:.2f}!"
        if not announced:
            print(f"  waiting for load average < {max_load} (now {load:.2f}, at most {max_wait:.0f} s)",
                  flush=True)
            announced = True
        time.sleep(poll)


def run_measured(command: list[str], stdout_path: str, stderr_path: str | None = None) -> tuple[str, int]:
    """Run `command` with its stdout into `stdout_path` (stderr too, unless `stderr_path` is
    given); its stdout and its own peak RSS in bytes. Exits with the log's tail on failure."""
    with open(stdout_path, "w") as stdout, open(stderr_path or os.devnull, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, cwd=REPO,
                                   stderr=stderr if stderr_path else subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    with open(stdout_path) as f:
        output = f.read()
    if process.returncode != 0:
        log = stderr_path or stdout_path
        with open(log) as f:
            tail = "\n".join(f.read().splitlines()[-20:])
        sys.exit(f"{tail}\npeer.py: `{' '.join(command)}` failed (exit {process.returncode}), log in {log}")
    return output, usage.ru_maxrss * 1024  # Linux reports kilobytes


# ---- reading each engine's output -------------------------------------------------------------

def llama_bench_prefill(output: str) -> tuple[float, dict]:
    """tokens/s of the 512-token prompt test in `llama-bench -o json` output, and the test's
    record (it names the CPU, threads and KV cache type)."""
    records = json.loads(output)
    record = next(r for r in records if r["n_prompt"] == 512 and r["n_gen"] == 0)
    return float(record["avg_ts"]), record


def batched_bench_decode(output: str) -> dict[int, float]:
    """Generation tokens/s (summed over the sequences) per batch size, from
    `llama-batched-bench --output-format jsonl`."""
    rates = {}
    for line in output.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            record = json.loads(line)
            rates[int(record["pl"])] = float(record["speed_tg"])
    return rates


def grok1_figures(result: dict) -> tuple[float, float, float]:
    """(prefill 512, decode b1, decode b8) tokens/s from `bench.py --json` (keys are strings)."""
    return (result["prefill"]["512"]["tokens_per_s"], result["decode"]["1"]["tokens_per_s"],
            result["decode"]["8"]["tokens_per_s"])


# ---- the two engines --------------------------------------------------------------------------

def time_llama_cpp(paths: Paths, fmt: str, args: argparse.Namespace, out: str) -> tuple[Row, dict]:
    """llama-bench (prefill 512) then llama-batched-bench (decode b1, b8) on one GGUF format."""
    model, threads = paths.gguf(fmt), str(args.threads)
    row = Row(f"llama.cpp {fmt}")
    row.load_before = wait_for_quiet(args.max_load, args.max_wait)
    print(f"llama.cpp {fmt}: llama-bench (load {row.load_before})", flush=True)
    output, rss_bench = run_measured(
        [paths.binary("llama-bench"), "-m", model, "-p", "512", "-n", "0", "-r", str(args.repeat),
         "-t", threads, "-o", "json"],
        os.path.join(out, f"llama-bench-{fmt}.json"), os.path.join(out, f"llama-bench-{fmt}.log"))
    row.prefill_512, record = llama_bench_prefill(output)
    load = wait_for_quiet(args.max_load, args.max_wait)
    print(f"llama.cpp {fmt}: llama-batched-bench (load {load})", flush=True)
    output, rss_batched = run_measured(
        [paths.binary("llama-batched-bench"), "-m", model, "-c", "2048", "-b", "2048", "-ub", "512",
         "-npp", "128", "-ntg", "64", "-npl", "1,8", "-t", threads, "--output-format", "jsonl"],
        os.path.join(out, f"batched-{fmt}.jsonl"))
    decode = batched_bench_decode(output)
    row.decode_b1, row.decode_b8 = decode.get(1), decode.get(8)
    row.peak_rss_bytes = max(rss_bench, rss_batched)
    row.load_after = f"{os.getloadavg()[0]:.2f}"
    return row, record


def time_grok1(args: argparse.Namespace, out: str) -> tuple[Row, dict]:
    """benchmarks/bench.py --prefill 512 --batch 1 8 in its own process (defaults of grok1.load),
    greedy only (--sampled with no batches): llama-batched-bench samples nothing."""
    row = Row("grok1 (grok1.load defaults)")
    row.load_before = wait_for_quiet(args.max_load, args.max_wait)
    print(f"grok1: bench.py (load {row.load_before})", flush=True)
    result_path = os.path.join(out, "grok1.json")
    run_measured(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), "--prefill", "512",
         "--batch", "1", "8", "--sampled", "--repeat", str(args.repeat), "--json", result_path],
        os.path.join(out, "grok1.log"))
    row.load_after = f"{os.getloadavg()[0]:.2f}"
    with open(result_path) as f:
        result = json.load(f)
    # bench.py's own peak (its machine-limit probes run in a child, which wait4 would count).
    row.peak_rss_bytes = result["peak_rss_bytes"]
    row.prefill_512, row.decode_b1, row.decode_b8 = grok1_figures(result)
    return row, result


# ---- the report -------------------------------------------------------------------------------

def machine_description() -> str:
    """CPU model, cores and memory of this machine, from /proc."""
    model, memory = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory = f", {kb / 2 ** 20:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores{memory}"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table (it goes into BENCHMARKS.md as printed)."""
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"
    head = ["engine", "prefill 512, tokens/s", "decode b1, tokens/s", "decode b8, tokens/s",
            "peak RSS, GiB", "load before / after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.engine, rate(r.prefill_512), rate(r.decode_b1), rate(r.decode_b8),
                 f"{r.peak_rss_bytes / 2 ** 30:.2f}", f"{r.load_before} / {r.load_after}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(rows: list[Row], llama_record: dict | None, grok1_result: dict | None,
                  args: argparse.Namespace, started: str, ended: str, checkpoint: str) -> str:
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(checkpoint) for f in files)
    lines = [f"llama.cpp and grok1 back to back on {CHECKPOINT} ({size / 2 ** 30:.2f} GiB checkpoint), "
             f"{started} to {ended}",
             f"machine: {machine_description()}"]
    if llama_record:
        commit = llama_record.get("build_commit", "unknown")
        version = (f"build {llama_record.get('build_number')} ({commit})" if commit != "unknown" else
                   "no version recorded (the llama-peer tool builds the copy vendored in the "
                   "llama-cpp-python sdist named by its LLAMA_CPP_PYTHON_VERSION, default 0.3.36)")
        lines.append(f"llama.cpp: {version}; {llama_record.get('n_threads')} threads, "
                     f"KV cache {llama_record.get('type_k')}")
    if grok1_result:
        lines.append(f"grok1: commit {git_commit()}, jax {grok1_result.get('jax')}, "
                     f"{grok1_result.get('compute_dtype')} compute, backend {grok1_result.get('backend')}")
    lines += ["", format_table(rows), "",
              f"Repetitions per timing: {args.repeat} (llama-bench -r, bench.py --repeat; "
              "llama-batched-bench runs once). prefill 512: llama-bench pp512 mean, bench.py median.",
              "decode b1/b8: tokens/s summed over the batch, after a 128-token prompt (llama.cpp: 64 "
              "generated tokens per sequence; grok1: median decode step at context 128).",
              "peak RSS: the process's own maximum (llama.cpp: the larger of its two processes; grok1: "
              "bench.py's own, its bandwidth and matmul probes run in a process of their own).",
              f"load: 1-minute load average when the engine's first timing started / after its last "
              f"(! = still >= {args.max_load} after waiting {args.max_wait:.0f} s)."]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", default=os.environ.get("LLAMA_PEER_TOOL", DEFAULT_TOOL),
                        help="the llama-peer tool's folder (default ../shared/tools/llama-peer)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="tokenizer.model written into the GGUFs (default ../shared/reference/)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS),
                        help="llama.cpp GGUF formats to time (default F32 BF16 Q8_0)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per timing (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp threads (default: all cores, as XLA uses)")
    parser.add_argument("--max-load", type=float, default=0.7,
                        help="wait for the 1-minute load average to drop below this before each timing")
    parser.add_argument("--max-wait", type=float, default=300, help="... for at most this many seconds")
    parser.add_argument("--json", default=None, help="also write the table's figures to this file")
    args = parser.parse_args(argv)
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"--formats takes {', '.join(FORMATS)}, got {', '.join(unknown)}")
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be positive integers")
    if args.max_wait < 0:
        parser.error("--max-wait must be >= 0 seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = Paths.from_env(os.path.abspath(args.tool), os.environ)
    why_not = missing_prerequisite(paths, args.tokenizer)
    if why_not:
        print(f"peer.py: skipped: {why_not}")
        return 0

    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench
    from grok1.config import PRESETS
    checkpoint = bench.bench_checkpoint(PRESETS[CHECKPOINT], CHECKPOINT)  # the folder bench.py loads

    # The tool's convert step: remade only when the checkpoint, tokenizer or converter changed.
    convert = subprocess.run(["bash", os.path.join(paths.tool, "llama_peer.sh"), checkpoint,
                              args.tokenizer, "convert"], cwd=REPO)
    if convert.returncode != 0:
        sys.exit(f"peer.py: the llama-peer convert step failed (exit {convert.returncode})")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = os.path.join(CACHE, "peer-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    rows, llama_record = [], None
    for fmt in args.formats:
        row, llama_record = time_llama_cpp(paths, fmt, args, out)
        rows.append(row)
    row, grok1_result = time_grok1(args, out)
    rows.append(row)
    ended = time.strftime("%H:%M UTC", time.gmtime())

    report = format_report(rows, llama_record, grok1_result, args, started, ended, checkpoint)
    bench.write_atomically(os.path.join(out, "summary.txt"), report + "\n")
    print("\n" + report + f"\n\nraw outputs: {out}")
    if args.json:
        figures = {"started": started, "ended": ended, "machine": machine_description(),
                   "rows": [vars(r) for r in rows]}
        bench.write_atomically(args.json, json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
