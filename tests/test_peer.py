"""benchmarks/peer.py: skipping without llama.cpp, reading each engine's output, per-process peak
RSS, the one table; marked slow, a whole back-to-back run where a llama.cpp build exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import peer  # noqa: E402

SCRIPT = os.path.join(REPO, "benchmarks", "peer.py")


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_skips_in_one_line_without_the_llama_peer_tool(tmp_path):
    done = run_script("--tool", str(tmp_path / "absent"))
    assert done.returncode == 0
    assert done.stdout.splitlines() == [f"peer.py: skipped: no llama-peer tool at {tmp_path / 'absent'} (pass --tool)"]


def test_skips_in_one_line_without_a_llama_cpp_build(tmp_path):
    tool, tokenizer = tmp_path / "tool", tmp_path / "tokenizer.model"
    tool.mkdir()
    (tool / "llama_peer.sh").write_text("exit 1\n")
    tokenizer.write_bytes(b"")
    done = run_script("--tool", str(tool), "--tokenizer", str(tokenizer),
                      env={"LLAMA_PEER_DIR": str(tmp_path / "work"), "LLAMA_PEER_BUILD": ""})
    assert done.returncode == 0
    [line] = done.stdout.splitlines()
    assert line.startswith(f"peer.py: skipped: no llama.cpp build at {tmp_path / 'work' / 'build'}")


def test_rejects_an_unknown_format_naming_the_allowed_ones():
    done = run_script("--formats", "Q4_K")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "peer.py: error: --formats takes F32, BF16, Q8_0, got Q4_K"


def test_prefill_is_llama_benchs_512_token_prompt_test():
    records = [{"n_prompt": 0, "n_gen": 64, "avg_ts": 80.0},
               {"n_prompt": 512, "n_gen": 0, "avg_ts": 285.5, "n_threads": 2, "type_k": "f16"}]
    rate, record = peer.llama_bench_prefill(json.dumps(records))
    assert rate == 285.5 and record["type_k"] == "f16"


def test_decode_rates_are_batched_benchs_generation_rates_per_batch_size():
    output = "\n".join([
        "main: n_kv_max = 2048, n_batch = 2048",  # log lines around the records are ignored
        '{"pp": 128, "tg": 64, "pl": 1, "speed_pp": 299.0, "speed_tg": 79.0}',
        '{"pp": 128, "tg": 64, "pl": 8, "speed_pp": 316.2, "speed_tg": 109.3}',
        "llama_perf_context_print: total time"])
    assert peer.batched_bench_decode(output) == {1: 79.0, 8: 109.3}


def test_grok1_figures_come_from_bench_json_whose_keys_are_strings():
    result = {"prefill": {"512": {"tokens_per_s": 1250.0}},
              "decode": {"1": {"tokens_per_s": 45.0}, "8": {"tokens_per_s": 98.0}}}
    assert peer.grok1_figures(result) == (1250.0, 45.0, 98.0)


def test_peak_rss_is_each_processs_own_not_the_largest_so_far(tmp_path):
    # Measured from a small process, as peer.py runs: a child forked from a large process (this
    # test suite's, gigabytes by now) reports its parent's resident pages as its own peak.
    measure = ("import sys; sys.path.insert(0, {bench!r}); import peer; "
               "print(peer.run_measured([sys.executable, '-c', {code!r}], {log!r})[1])")
    def peak(code: str, log: str) -> int:
        script = measure.format(bench=os.path.join(REPO, "benchmarks"), code=code, log=str(tmp_path / log))
        return int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    rss_big = peak("import numpy as np; a = np.ones(300 * 2**20, np.uint8); a.sum()", "big.log")
    rss_small = peak("pass", "small.log")
    assert rss_big > 300 * 2 ** 20 > rss_small


def test_a_failing_process_ends_the_run_with_its_log(tmp_path):
    with pytest.raises(SystemExit, match="boom"):
        peer.run_measured([sys.executable, "-c", "import sys; sys.exit('boom')"], str(tmp_path / "x.log"))


def test_a_load_still_above_the_limit_after_the_wait_is_marked():
    assert peer.wait_for_quiet(max_load=0.0, max_wait=0).endswith("!")
    assert not peer.wait_for_quiet(max_load=1e9, max_wait=0).endswith("!")


def test_table_has_one_row_per_engine_with_its_loads_before_and_after():
    rows = [peer.Row("llama.cpp Q8_0", 285.5, 79.0, 109.3, 2 ** 30, "0.52", "1.90"),
            peer.Row("grok1 (grok1.load defaults)", 1250.0, None, 98.0, 3 * 2 ** 29, "0.61", "1.85")]
    lines = peer.format_table(rows).splitlines()
    assert lines[0].startswith("| engine | prefill 512, tokens/s |")
    assert lines[2:] == ["| llama.cpp Q8_0 | 285.5 | 79.0 | 109.3 | 1.00 | 0.52 / 1.90 |",
                         "| grok1 (grok1.load defaults) | 1250.0 | n/a | 98.0 | 1.50 | 0.61 / 1.85 |"]


@pytest.mark.slow
def test_back_to_back_run_prints_one_table_with_both_engines(tmp_path, capsys):
    paths = peer.Paths.from_env(peer.DEFAULT_TOOL, dict(os.environ))
    why_not = peer.missing_prerequisite(paths, peer.DEFAULT_TOKENIZER)
    if why_not:
        pytest.skip(why_not)
    assert peer.main(["--formats", "Q8_0", "--repeat", "1", "--max-wait", "0",
                      "--json", str(tmp_path / "peer.json")]) == 0
    rows = json.loads((tmp_path / "peer.json").read_text())["rows"]
    assert [r["engine"] for r in rows] == ["llama.cpp Q8_0", "grok1 (grok1.load defaults)"]
    assert all(r["prefill_512"] > 0 and r["decode_b1"] > 0 and r["decode_b8"] > 0 for r in rows)
    assert "| llama.cpp Q8_0 |" in capsys.readouterr().out
