"""Perplexity of a text (grok1/perplexity.py, run.py --perplexity): llama-perplexity's windows,
the sliding-window alternative, figures equal to those computed from Model.logits, and one-line
errors for files that cannot be scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import grok1
from grok1.perplexity import llama_cpp_windows, perplexity, strided_windows, token_bytes

from conftest import REPO
from test_run import assert_user_error, run

TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key "
        "function can be supplied to customize the sort order, and the reverse flag can be set to "
        "request the result in descending order. The sort is guaranteed to be stable. ") * 6


@pytest.fixture(scope="module")
def model():
    return grok1.load(REPO / "checkpoints" / "small")


def nll_from_logits(model, tokens: list[int], start: int, end: int) -> float:
    """Sum of -log p(tokens[i] | tokens[:i]) for i in [start, end), from Model.logits."""
    logits = model.logits(np.asarray([tokens]))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logsoftmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -sum(logsoftmax[i - 1, tokens[i]] for i in range(start, end))


def test_llama_cpp_windows_are_whole_non_overlapping_and_score_their_second_half():
    ids = list(range(10, 10 + 53))
    windows = llama_cpp_windows(ids, 16, bos=1)
    assert len(windows) == 3                                   # 53 // 16; the remainder is left out
    for i, window in enumerate(windows):
        assert window.tokens == [1, *ids[i * 16 + 1:(i + 1) * 16]]   # first token replaced by BOS
        assert (window.start, window.end) == (9, 16)           # n_ctx - n_ctx/2 - 1 = 7 tokens scored


def test_llama_cpp_windows_keep_the_first_token_without_bos():
    assert llama_cpp_windows(list(range(32)), 16, bos=None)[1].tokens == list(range(16, 32))


def test_strided_windows_score_every_token_but_the_first_once():
    ids = list(range(100))
    windows = strided_windows(ids, 32, 8)
    scored = [w.tokens[i] for w in windows for i in range(w.start, w.end)]
    assert scored == ids[1:]
    assert all(len(w.tokens) <= 32 for w in windows)
    assert all(w.start >= 32 - 8 for w in windows[1:])        # at least context - stride before


def test_llama_cpp_perplexity_equals_the_one_from_logits(model):
    ids = [model.config.bos_token, *model.tokenizer.encode(TEXT)]
    context = 64
    result = perplexity(model, TEXT, context=context)
    nll, count = 0.0, 0
    for i in range(len(ids) // context):
        window = [model.config.bos_token, *ids[i * context + 1:(i + 1) * context]]
        nll += nll_from_logits(model, window, context // 2 + 1, context)
        count += context - context // 2 - 1
    assert result.scored_tokens == count and result.windows == len(ids) // context
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_strided_perplexity_of_a_text_in_one_window_is_that_of_the_whole_text(model):
    ids = [model.config.bos_token, *model.tokenizer.encode(TEXT[:300])]
    result = perplexity(model, TEXT[:300], context=model.config.sequence_len, stride=16)
    nll = nll_from_logits(model, ids, 1, len(ids))
    assert result.windows == 1 and result.scored_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / result.scored_bytes, rel=1e-5)


def test_scored_bytes_count_the_text_the_tokens_spell(model):
    ids = np.asarray(model.tokenizer.encode("sort the list"))
    assert token_bytes(model.tokenizer, ids) == len(" sort the list")     # the leading "▁" too


@pytest.mark.parametrize("kwargs, message", [
    (dict(context=64), "need at least 128"),
    (dict(context=300), "between 1 and the model's sequence_len (256)"),
    (dict(context=64, stride=65), "stride must be between 1 and the context (64)"),
])
def test_unscorable_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        perplexity(model, "A short text.", **kwargs)


# ---- run.py --perplexity ----------------------------------------------------------------------

def test_run_py_perplexity_json_reports_the_figures(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    result = run("--perplexity", str(path), "--context", "64", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["windowing"] == "llama.cpp" and out["context"] == 64 and out["windows"] >= 2
    assert out["perplexity"] == pytest.approx(math.exp(out["negative_log_likelihood"]))
    assert out["tokens_per_second"] > 0


def test_run_py_perplexity_reads_standard_input_with_a_stride():
    result = run("--perplexity", "-", "--stride", "64", stdin=TEXT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("perplexity ") and "stride 64" in result.stdout


@pytest.mark.parametrize("setup, message", [
    ("empty", "is empty"),
    ("missing", "cannot read"),
    ("folder", "is a folder"),
    ("binary", "is not UTF-8 text"),
])
def test_run_py_perplexity_of_an_unreadable_file_is_a_one_line_error(tmp_path, setup, message):
    path = tmp_path / "text.txt"
    if setup == "empty":
        path.write_text("\n")
    elif setup == "folder":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00abc")
    assert_user_error(run("--perplexity", str(path)), message)


def test_run_py_stride_without_perplexity_is_refused():
    assert_user_error(run("--stride", "8"), "--stride has no effect with generation")


@pytest.mark.parametrize("argv, fragment", [
    (["--perplexity", "x.txt", "--temperature", "0"], "--temperature has no effect with --perplexity"),
    (["--perplexity", "x.txt", "--serve"], "do not go together"),
])
def test_run_py_perplexity_refuses_flags_it_would_ignore(argv, fragment):
    assert_user_error(run(*argv), fragment)
