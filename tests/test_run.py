"""run.py as a user meets it: the shipped model out of the box, repeatable greedy text, the same
text on a mesh, and a one-line message (no traceback, exit status 2) for each user mistake."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
GREEDY = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "24", "--quiet"]
DEFAULT_PROMPT = "The function returns"


def run(*args: str, devices: int | None = None, stdin: str = "", timeout: float = 300,
        env_vars: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (env_vars or {})
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

def test_no_arguments_streams_a_continuation_and_says_how_fast_and_why_it_ended():
    # Unseeded, so the text differs run to run (and may end at EOS after a few tokens).
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(DEFAULT_PROMPT)
    assert re.search(r"\[(\d+ tokens in [\d.]+ s: first after [\d.]+ s.*; ended at |no tokens: )", result.stderr)


def test_default_sampling_with_a_seed_streams_english_words_and_reports_tokens_per_second():
    result = run("--seed", "2")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"[A-Za-z]+", result.stdout)) >= 20
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
                 "--top-p", "--top-k", "--frequency-penalty", "--presence-penalty", "--seed",
                 "--mesh", "--dtype", "--no-stream", "--quiet", "--interactive", "--preset", "--plan",
                 "--describe", "--trace"]:
        assert flag in text
    for default in ["(default: 100)", "(default: 0.8)", "(default: 0.95)", "(default: 40)",
                    "(default: 0.2)", "(default: 0.0)", "fresh randomness for every prompt",
                    "(default: auto)", "checkpoints/small"]:
        assert default in text


def test_help_gives_the_default_dtype_grok1_load_picks_as_the_readme_does():
    help_text = " ".join(run("--help").stdout.split())
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "auto = what grok1.load picks: float32 on CPU, bfloat16 on GPU/TPU" in help_text
    assert "the default is bfloat16 on GPU/TPU and float32 on CPU" in readme


def test_plan_help_explains_batch_and_dtype():
    result = subprocess.run([sys.executable, "-m", "grok1.plan", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--batch BATCH rows prefilled and decoded together" in text
    assert "--dtype {bfloat16,float32} compute dtype" in text


@pytest.mark.slow
def test_no_stream_json_returns_one_completion_per_prompt():
    result = run("--prompt", "The module", "--prompt", "A list", "--max-new-tokens", "5",
                 "--temperature", "0", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    completions = json.loads(result.stdout)
    assert [c["prompt"] for c in completions] == ["The module", "A list"]
    assert all(len(c["token_ids"]) == 5 or c["finish_reason"] == "stop" for c in completions)


def test_building_the_native_kernels_is_a_status_line_on_stderr_and_stdout_holds_only_the_text(greedy,
                                                                                               tmp_path):
    result = run(*GREEDY, env_vars={"GROK1_NATIVE_CACHE": str(tmp_path)})     # a first build
    assert result.returncode == 0, result.stderr
    assert f"grok1: compiling the native CPU kernels into {tmp_path} (once)" in result.stderr.splitlines()
    assert result.stdout == greedy


def test_a_run_served_from_the_compilation_cache_says_so_instead_of_compiling(tmp_path):
    argv = ["--compilation-cache", str(tmp_path), "--prompt", "The module", "--max-new-tokens", "2",
            "--temperature", "0"]
    first, again = run(*argv), run(*argv)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    first_stats, again_stats = first.stderr.splitlines()[-1], again.stderr.splitlines()[-1]
    assert "s of it compiling" in first_stats and "compilation cache" not in first_stats
    assert "read from the compilation cache" in again_stats and "compilation included" not in again_stats


def test_piped_input_that_is_not_read_is_named_in_one_note_line():
    result = run("--max-new-tokens", "1", "--temperature", "0", stdin="Once upon a time\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(DEFAULT_PROMPT)
    assert ("note: piped standard input is ignored; --prompt - continues it, --interactive each of its lines"
            in result.stderr.splitlines())


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


# ---- in-process: run.main(argv) with the shipped model loaded once ---------------------------

@pytest.fixture(scope="module")
def cli():
    """run.py as a module."""
    spec = importlib.util.spec_from_file_location("run_cli", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped():
    import grok1
    return grok1.load(REPO / "checkpoints" / "small", progress=False)


@pytest.fixture
def main(cli, shipped, monkeypatch, capsys):
    """run.main(argv) -> (exit status, stdout, stderr), with the shipped model already loaded."""
    monkeypatch.setattr(cli, "load_model", lambda args, config, tokenizer_path: shipped)

    def call(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("flag, value, allowed", [
    ("--max-new-tokens", "0", "(or max: up to the context end)"),
    ("--seed", "-1", "(or leave it out: a fresh seed)")])
def test_a_bad_sampling_value_is_refused_in_the_command_lines_words(main, flag, value, allowed):
    code, _, err = main(flag, value)
    assert_one_line_error(code, err, flag, allowed)
    assert "None" not in err


def test_prompt_dash_continues_standard_input(main):
    _, expected, _ = main(*GREEDY)
    code, out, err = main("--prompt", "-", *GREEDY[2:], stdin="Once upon a time\n")
    assert code == 0, err
    assert out == expected


def test_prompt_dash_with_empty_standard_input_is_a_one_line_error(main):
    code, _, err = main("--prompt", "-", stdin="")
    assert_one_line_error(code, err, "--prompt -", "standard input is empty")


def test_prompt_dash_twice_is_a_one_line_error(main):
    code, _, err = main("--prompt", "-", "--prompt", "-", stdin="x")
    assert_one_line_error(code, err, "--prompt -", "once")


def test_interactive_json_answers_each_line_with_one_completion_object(main):
    code, out, err = main("--interactive", "--json", "--max-new-tokens", "3", "--temperature", "0", "--quiet",
                          stdin="The module\nA list\n")
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["prompt"] for a in answers] == ["The module", "A list"]
    assert all(len(a["token_ids"]) == 3 or a["finish_reason"] == "stop" for a in answers)


def test_native_kernels_are_built_before_the_prompt_is_echoed(main, monkeypatch):
    from grok1.kernels import native
    real, calls, status = native.available, [], "grok1: compiling the native CPU kernels into DIR (once)"

    def building() -> bool:          # says what a first build says, once
        if not calls:
            print(status, file=sys.stderr, flush=True)
        calls.append(True)
        return real()
    monkeypatch.setattr(native, "available", building)
    terminal = io.StringIO()          # stdout and stderr interleaved, as on a terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    code, _, _ = main("--prompt", "The module", "--max-new-tokens", "2", "--temperature", "0")
    lines = terminal.getvalue().splitlines()
    assert code == 0 and lines[0] == status and lines[1].startswith("The module"), lines


def test_serve_without_the_serve_extra_says_what_to_install(main, monkeypatch):
    # As if starlette were not installed: its submodules go too (an import of one that is still
    # in sys.modules would succeed, as after the server tests in the same session).
    for name in [n for n in sys.modules if n.split(".")[:2] == ["grok1", "server"]
                 or n.split(".")[0] in ("starlette", "uvicorn")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    code, _, err = main("--serve", "--port", "0")
    assert_one_line_error(code, err, "--serve needs starlette", "pip install", "[serve]", "requirements.txt")


@pytest.mark.parametrize("mode", [[], ["--trace"]])
def test_empty_prompt_is_a_one_line_error(main, mode):
    code, _, err = main(*mode, "--prompt", "")
    assert_one_line_error(code, err, "--prompt is empty")


@pytest.mark.parametrize("argv, fragment", [
    (["--describe", "--trace"], "--describe and --trace do not go together"),
    (["--plan", "--describe", "--mesh", "1x1"], "--plan and --describe do not go together"),
    (["--trace", "--interactive"], "--trace and --interactive do not go together"),
    (["--batch", "2"], "--batch has no effect with generation"),
    (["--context", "64"], "--context has no effect with generation"),
    (["--plan", "--mesh", "1x1", "--temperature", "0"], "--temperature has no effect with --plan"),
    (["--describe", "--prompt", "x"], "--prompt has no effect with --describe"),
    (["--describe", "--tokenizer", "t.model"], "--tokenizer has no effect with --describe"),
    (["--trace", "--max-new-tokens", "5"], "--max-new-tokens has no effect with --trace"),
    (["--trace", "--json"], "--json has no effect with --trace"),
    (["--interactive", "--no-stream"], "--no-stream has no effect with --interactive"),
    (["--plot", "x.png"], "--plot has no effect with generation; it goes with --trace"),
    (["--describe", "--cpu-devices", "8"], "--cpu-devices has no effect with --describe"),
    (["--plan", "--mesh", "1x1", "--compilation-cache", "x"], "--compilation-cache has no effect with --plan"),
    (["--describe", "--preset", "grok-1", "--checkpoint", "x"], "--checkpoint has no effect with --describe --preset")])
def test_flags_that_would_be_ignored_are_refused(main, argv, fragment):
    code, _, err = main(*argv)
    assert_one_line_error(code, err, fragment)


def test_plot_into_a_missing_folder_is_refused_before_the_trace(main, tmp_path):
    code, out, err = main("--trace", "--plot", str(tmp_path / "missing" / "x.png"))
    assert_one_line_error(code, err, "--plot", "does not exist")
    assert out == ""


def test_plot_with_an_unknown_extension_lists_the_allowed_ones(main, tmp_path):
    code, _, err = main("--trace", "--plot", str(tmp_path / "x.bmpx"))
    assert_one_line_error(code, err, "--plot", ".png", ".svg", ".jpg")


def test_plot_writes_the_format_its_extension_names(main, tmp_path):
    code, _, err = main("--trace", "--prompt", "The module", "--plot", str(tmp_path / "x.jpg"))
    assert code == 0, err
    assert (tmp_path / "x.jpg").read_bytes().startswith(b"\xff\xd8\xff")   # JPEG, not PNG


def test_max_new_tokens_beyond_the_context_is_lowered_with_one_note_line_even_when_quiet(main):
    code, out, err = main("--prompt", "Once upon a time", "--max-new-tokens", "1000000",
                          "--temperature", "0", "--quiet")
    assert code == 0, err
    assert err.splitlines() == [err.splitlines()[0]]
    assert err.startswith("note: --max-new-tokens 1000000 lowered to ") and "Warning" not in err


def test_max_new_tokens_max_means_up_to_the_context_end(cli):
    assert cli.parse_args(["--max-new-tokens", "max"]).max_new_tokens is None
    assert cli.parse_args(["--max-new-tokens", "7"]).max_new_tokens == 7


@pytest.mark.parametrize("mode", [["--no-stream"], ["--interactive"]])
def test_prompt_longer_than_the_context_is_one_plain_note_line(main, mode):
    long = "the word " * 300
    argv = [*mode, "--max-new-tokens", "1", "--temperature", "0", "--quiet"]
    code, _, err = main(*argv, *([] if "--interactive" in mode else ["--prompt", long]),
                        stdin=long + "\n" if "--interactive" in mode else None)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"note: .* its first \d+ tokens were dropped", lines[0]), err


@pytest.mark.parametrize("mode", [[], ["--no-stream"]])
def test_prompt_longer_than_the_context_makes_room_for_max_new_tokens_and_echoes_what_the_model_saw(
        main, shipped, mode):
    long = " ".join(str(i) for i in range(400))
    ids, context = shipped.tokenizer.encode(long), shipped.config.sequence_len
    bos = 1 if shipped.config.add_bos else 0
    kept = ids[len(ids) - (context - 20 - bos):]                    # room for 20 new tokens
    code, out, err = main(*mode, "--prompt", long, "--max-new-tokens", "20", "--temperature", "0")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: the prompt is longer than the {context}-token context allows with "
                     f"--max-new-tokens 20: its first {len(ids) - len(kept)} tokens were dropped"]
    assert out.startswith(shipped.tokenizer.decode(kept)) and not out.startswith("0 1 2")


def test_stats_line_says_why_generation_ended(main):
    _, _, err = main("--prompt", "The module", "--max-new-tokens", "3", "--temperature", "0", "--no-stream")
    assert err.strip().endswith("ended at max-new-tokens]")
    _, _, err = main("--prompt", "The module", "--max-new-tokens", "3", "--temperature", "0")
    assert err.strip().endswith("ended at max-new-tokens]")


def test_stats_line_names_a_stop_at_eos(cli, shipped):
    assert cli.ending("stop", None, 5, 3, shipped.config) == "ended at EOS"
    assert cli.ending("stop", "\n", 5, 3, shipped.config) == "ended at stop string '\\n'"
    assert cli.ending("length", None, 6, shipped.config.sequence_len - 6, shipped.config) == \
        "ended at the context end"


def test_no_stream_rate_leaves_compilation_out(cli):
    line = cli.report(9, 14.58, 14.0, "ended at EOS")
    assert "9 tokens in 14.58 s (14.00 s of it compiling): 15.5 tokens/s" in line


def test_compile_clock_counts_compilation(cli):
    import jax
    import jax.numpy as jnp
    before = cli.CompileClock.now()
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(5)).block_until_ready()
    assert cli.CompileClock.now() > before


def test_interactive_mentions_compiling_only_when_something_compiled(main, shipped):
    warm = bool(shipped.__dict__.get("_runners"))
    code, _, err = main("--interactive", "--max-new-tokens", "2", "--temperature", "0",
                        stdin="The module\nA list\n")
    assert code == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[")]
    compiled = [bool(re.search(r"of it compiling|compilation cache", line)) for line in stats]
    assert compiled == [not warm, False]


def test_interactive_terminal_edits_lines_with_readline_and_does_not_echo_the_prompt(main, monkeypatch):
    lines = iter(["Zebra quartz"])

    def fake_input(cue: str) -> str:
        assert cue == "prompt> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, out, err = main("--interactive", "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0, err
    assert "readline" in sys.modules
    assert "Zebra" not in out and len(out.splitlines()) == 1
