"""grok1.inspect's analyses over run_with_cache / run_with_hooks: the logit lens, attention
patterns, routing statistics, activation patching, expert ablation, and their command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHIPPED
from grok1.inspect import interventions, lens, routing

PROMPT = [1, 415, 2130, 3354, 356, 272, 1610, 304]


def test_the_lens_last_reading_is_the_models_own_top_tokens(shipped):
    result = lens.logit_lens(shipped, PROMPT, top=3)
    own = np.argmax(shipped.logits([PROMPT])[0], axis=-1)
    np.testing.assert_array_equal(result.top_ids[-1, :, 0], own)
    np.testing.assert_array_equal(result.final, own)
    assert result.readings == ["embed", "0", "1", "2", "3"]
    assert result.top_ids.shape == (5, len(PROMPT), 3)
    np.testing.assert_allclose(result.final_prob[-1], result.top_probs[-1, :, 0], rtol=1e-6)


def test_patterns_of_chosen_layers_come_one_per_head(shipped):
    patterns = lens.attention_patterns(shipped, PROMPT, layers=[1, 3])
    assert patterns.shape == (2, shipped.config.num_q_heads, len(PROMPT), len(PROMPT))
    assert len(lens.format_patterns(patterns, np.array(PROMPT), layers=[1, 3]).splitlines()) == 1 + 2 * 8


def test_routing_counts_every_real_token_once_per_layer_and_expert_choice(shipped):
    corpus = np.array(PROMPT * 5)  # 40 tokens: windows of 16, the last one padded
    r = routing.routing(shipped, corpus, window=16, batch=2)
    assert len(r.tokens) == 40 and r.experts.shape == (40, 4, 2)
    np.testing.assert_allclose(r.load.sum(axis=1), 1.0)
    _, cache = shipped.run_with_cache([corpus[:16]], ["blocks.2.mlp.hook_expert_indices"])
    np.testing.assert_array_equal(r.experts[:16, 2], cache["blocks.2.mlp.hook_expert_indices"][0])
    pairs = r.co_activation(1)
    assert np.array_equal(pairs, pairs.T) and np.trace(pairs) == 2 * 40  # k = 2 choices per token
    np.testing.assert_allclose(r.transitions(0).sum(axis=1)[r.load[0] > 0], 2.0)


def test_preferred_tokens_are_those_routed_to_the_expert_most_often(shipped):
    r = routing.Routing(tokens=np.array([7, 7, 7, 9, 9, 9, 9, 5]),
                        experts=np.array([[[0, 1]], [[0, 2]], [[3, 1]], [[0, 1]], [[2, 3]], [[2, 3]],
                                          [[2, 3]], [[0, 1]]]), num_experts=4)
    assert r.preferred_tokens(0, 0, min_occurrences=2) == [(7, 2 / 3, 3), (9, 1 / 4, 4)]


def test_patching_the_clean_prompt_into_itself_keeps_the_clean_answer(shipped):
    result = interventions.patching(shipped, PROMPT, PROMPT)
    np.testing.assert_allclose(result.prob, result.clean_prob, rtol=1e-4)
    assert result.prob.shape == (4, len(PROMPT))


def test_patching_the_differing_position_at_layer_0_restores_the_clean_answer(shipped):
    corrupt = PROMPT[:6] + [2418] + PROMPT[7:]
    result = interventions.patching(shipped, PROMPT, corrupt)
    assert result.corrupt_prob != pytest.approx(result.clean_prob, rel=1e-3)
    assert result.prob[0, 6] == pytest.approx(result.clean_prob, rel=1e-4)  # all that differs, at layer 0
    np.testing.assert_allclose(result.prob[:, :6], result.corrupt_prob, rtol=1e-4)  # same tokens: no change


def test_ablating_an_expert_routes_around_it_and_is_measured_per_layer(shipped):
    tokens = np.array([PROMPT, PROMPT[::-1]])
    result = interventions.expert_ablation(shipped, tokens, layers=[2])
    assert np.isnan(result.loss[0]).all() and not np.isnan(result.loss[2]).any()
    unused = result.load[2] == 0
    np.testing.assert_allclose(result.loss[2][unused], result.baseline, rtol=1e-5)
    assert np.any(np.abs(result.loss[2] - result.baseline) > 1e-3)


def test_plots_write_images(shipped, tmp_path):
    pytest.importorskip("matplotlib")
    from grok1.inspect import plots
    plots.plot_lens(lens.logit_lens(shipped, PROMPT), tmp_path / "lens.png", shipped.tokenizer)
    plots.plot_patterns(lens.attention_patterns(shipped, PROMPT), PROMPT, tmp_path / "attention.png")
    plots.plot_routing(routing.routing(shipped, np.array(PROMPT * 4), window=16), tmp_path / "routing.svg")
    for name in ("lens.png", "attention.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "routing.svg").read_bytes()[:1000]


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grok1.analyze", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_the_command_prints_the_lens_and_plots_it(tmp_path):
    if not (SHIPPED / "ckpt-0").is_dir():
        pytest.skip("the shipped model checkpoints/small is absent")
    pytest.importorskip("matplotlib")
    result = run_command("lens", "--prompt", "The cat sat on the mat", "--plot", str(tmp_path / "lens.png"))
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[2:]] == ["embed", "0", "1", "2", "3"]
    assert (tmp_path / "lens.png").stat().st_size > 1000


def test_the_command_refuses_a_bad_plot_path_in_one_line_before_loading(tmp_path):
    result = run_command("routing", "--text", "LICENSE", "--plot", str(tmp_path / "missing" / "r.png"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m grok1.analyze: --plot: folder {tmp_path / 'missing'} does not exist"]
