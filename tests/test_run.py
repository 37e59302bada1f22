"""run.py as a user meets it: the shipped model out of the box, repeatable greedy text, the same
text on a mesh, and a one-line message (no traceback, exit status 2) for each user mistake."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
GREEDY = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "24", "--quiet"]


def run(*args: str, devices: int | None = None, stdin: str = "",
        timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def greedy() -> str:
    result = run(*GREEDY)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- out of the box ---------------------------------------------------------------------------

def test_no_arguments_streams_english_words_and_reports_tokens_per_second():
    result = run()
    assert result.returncode == 0, result.stderr
    words = re.findall(r"[A-Za-z]+", result.stdout)
    assert len(words) >= 20
    assert re.search(r"\d+ tokens in [\d.]+ s: first after [\d.]+ s .*, then [\d.]+ tokens/s", result.stderr)


def test_greedy_text_is_the_same_on_every_run(greedy):
    again = run(*GREEDY)
    assert again.returncode == 0, again.stderr
    assert again.stdout == greedy and len(greedy.split()) >= 5


def test_greedy_text_on_a_1x8_mesh_of_cpu_devices_equals_one_device(greedy):
    result = run(*GREEDY, "--cpu-devices", "8", "--mesh", "1x8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy


def test_help_explains_every_flag_with_its_default():
    result = run("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--checkpoint", "--tokenizer", "--prompt", "--max-new-tokens", "--temperature",
                 "--top-p", "--top-k", "--seed", "--mesh", "--dtype", "--no-stream", "--quiet",
                 "--interactive", "--preset", "--plan", "--describe", "--trace"]:
        assert flag in text
    for default in ["(default: 100)", "(default: 0.8)", "(default: 0.95)", "(default: 40)",
                    "(default: 0)", "(default: auto)", "checkpoints/small"]:
        assert default in text


@pytest.mark.slow
def test_no_stream_json_returns_one_completion_per_prompt():
    result = run("--prompt", "The module", "--prompt", "A list", "--max-new-tokens", "5",
                 "--temperature", "0", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    completions = json.loads(result.stdout)
    assert [c["prompt"] for c in completions] == ["The module", "A list"]
    assert all(len(c["token_ids"]) == 5 or c["finish_reason"] == "stop" for c in completions)


def test_interactive_mode_continues_each_line_until_an_empty_one(greedy):
    result = run("--interactive", *GREEDY[2:], stdin="Once upon a time\nThe module\n\nignored\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == greedy.rstrip("\n")


# ---- user mistakes ----------------------------------------------------------------------------

def test_missing_checkpoint_says_where_to_put_the_weights(tmp_path):
    assert_user_error(run("--checkpoint", str(tmp_path / "grok-1"), "--preset", "grok-1"),
                      "checkpoint folder not found", "checkpoints/grok-1", "xai-org/grok-1")


def test_missing_folder_of_another_model_says_it_does_not_exist_without_the_release_hint(tmp_path):
    result = run("--checkpoint", str(tmp_path / "mine"))
    assert_user_error(result, f"checkpoint folder not found: {tmp_path / 'mine'}")
    assert "xai-org" not in result.stderr and "torrent" not in result.stderr


def test_ckpt0_folder_points_at_its_parent():
    assert_user_error(run("--checkpoint", "checkpoints/small/ckpt-0"),
                      "is the ckpt-0/ folder itself", "--checkpoint checkpoints/small")


def test_a_tensor_file_points_at_its_checkpoint_folder():
    assert_user_error(run("--checkpoint", "checkpoints/small/ckpt-0/tensor00000_000"),
                      "is a file of a checkpoint", "holds ckpt-0/: checkpoints/small")


def test_a_broken_config_names_its_path_once(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 4096,')
    (tmp_path / "ckpt-0").symlink_to(REPO / "checkpoints" / "small" / "ckpt-0")
    result = run("--checkpoint", str(tmp_path))
    assert_user_error(result, "not a valid JSON config")
    assert result.stderr.count(str(tmp_path / "config.json")) == 1


def test_trace_of_a_prompt_longer_than_the_context_is_refused_naming_the_limit():
    assert_user_error(run("--trace", "--prompt", "word " * 300), "--trace:", "context of 256")


def test_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    small = REPO / "checkpoints" / "small"
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "ckpt-0").symlink_to(small / "ckpt-0")
    assert_user_error(run("--checkpoint", str(tmp_path), "--tokenizer", str(small / "tokenizer.model")),
                      "do not belong together")


def test_mesh_not_matching_the_device_count_is_refused():
    assert_user_error(run("--mesh", "1x8"), "--mesh", "needs 8 devices", "1 are available",
                      "pass --cpu-devices 8")


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"),
                                        ("--top-k", "-3"), ("--max-new-tokens", "0")])
def test_bad_sampling_value_names_its_flag(flag, value):
    assert_user_error(run(flag, value), flag)
