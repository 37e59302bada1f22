"""The sampling function on its own, and the checks on sampling settings and prompts."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.config import ModelConfig
from grok1.generation import sampling as sampler_module
from grok1.generation.sampling import penalize, request_keys, sample
from grok1.generation.settings import (draw_fresh_seeds, encode_text, fit_prompt, prompt_token_ids,
                                       sampling_settings)
from grok1.inference import Model

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
DRAWS = 40_000


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The textbook definition: temperature, then keep the k most likely, then the smallest
    most-likely set whose probability reaches top_p; renormalise."""
    probs = softmax(logits / temperature)
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    keep[order[:top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    mass = 0.0
    nucleus = np.zeros(len(probs), bool)
    for i in order:
        if mass >= top_p or not keep[i]:
            break
        nucleus[i] = True
        mass += probs[i]
    probs = np.where(nucleus, probs, 0)
    return probs / probs.sum()


@jax.jit
def draw_many(logits, temperature, top_p, top_k):
    """DRAWS samples from one logits vector, each row with its own key (seed 7, step = row)."""
    n = DRAWS
    keys = request_keys(jnp.full((n,), 7, jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    tokens, _ = sample(jnp.broadcast_to(logits, (n, logits.shape[0])), keys,
                       jnp.full((n,), temperature), jnp.full((n,), top_p), jnp.full((n,), top_k))
    return tokens


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.9)])
def test_draw_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    tokens = np.asarray(draw_many(LOGITS, np.float32(temperature), np.float32(top_p), np.int32(top_k)))
    freq = np.bincount(tokens, minlength=len(LOGITS)) / DRAWS
    p = expected_distribution(LOGITS.astype(np.float64), temperature, top_k, top_p)
    # Five standard errors per token (binomial), plus a floor for float32 rounding.
    bound = 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-4
    assert np.all(np.abs(freq - p) <= bound), (freq, p)
    assert np.all(freq[p == 0] == 0), "a filtered-out token was drawn"


# Small candidate tiers (8, then 32) over a shuffled 100-token vocabulary of slowly falling
# probabilities, so that each filter below ends in a known tier: the first, the second, or the
# whole vocabulary (a full sort).
TIERS = (8, 32)
TIERED_ORDER = np.random.default_rng(5).permutation(100)      # TIERED_ORDER[r]: the token of rank r
TIERED_LOGITS = np.empty(100, np.float32)
TIERED_LOGITS[TIERED_ORDER] = -np.arange(100, dtype=np.float32) / 25


def draw_many_in_tiers(monkeypatch, logits, top_p, top_k) -> np.ndarray:
    """draw_many at temperature 1 with FILTER_CANDIDATES = TIERS and draws inverted over blocks of
    16 entries (100 tokens: 6 whole blocks and a padded one); both are read when a step is traced."""
    monkeypatch.setattr(sampler_module, "FILTER_CANDIDATES", TIERS)
    monkeypatch.setattr(sampler_module, "DRAW_BLOCK", 16)
    traced_anew = jax.jit(draw_many.__wrapped__)
    return np.asarray(traced_anew(jnp.asarray(logits), np.float32(1.0), np.float32(top_p), np.int32(top_k)))


@pytest.mark.parametrize("top_k, top_p, kept_reaches", [
    (0, 1.0, "past both"), (5, 1.0, "first tier"), (20, 1.0, "second tier"), (50, 1.0, "past both"),
    (0, 0.2, "first tier"), (0, 0.6, "second tier"), (0, 0.9, "past both"),
    (20, 0.3, "first tier")])                        # a top-k past the first tier, cut by top-p
def test_filters_keep_the_same_tokens_in_every_candidate_tier(monkeypatch, top_k, top_p, kept_reaches):
    tokens = draw_many_in_tiers(monkeypatch, TIERED_LOGITS, top_p, top_k)
    freq = np.bincount(tokens, minlength=len(TIERED_LOGITS)) / DRAWS
    p = expected_distribution(TIERED_LOGITS.astype(np.float64), 1.0, top_k, top_p)
    assert np.all(freq[p == 0] == 0), "a filtered-out token was drawn"
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-4)
    deepest_rank = np.flatnonzero(freq[TIERED_ORDER]).max()
    tier = ("first tier", "second tier", "past both")[np.searchsorted(TIERS, deepest_rank, side="right")]
    assert tier == kept_reaches


def test_tokens_tied_with_the_last_kept_one_are_all_kept(monkeypatch):
    logits = np.full(100, -20.0, np.float32)
    logits[:10] = 0.1 + np.arange(10, dtype=np.float32)[::-1] / 100    # distinct, above the tie
    logits[10:40] = 0.0                         # 30 tokens tied at ranks 10-39, past both tiers
    tokens = draw_many_in_tiers(monkeypatch, logits, 1.0, 12)
    assert set(tokens) == set(range(40))


def test_temperature_zero_takes_the_argmax_whatever_the_key_and_filters():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 50)), jnp.float32)
    keys = request_keys(jnp.arange(6, dtype=jnp.uint32), jnp.zeros(6, jnp.int32))
    tokens, _ = sample(logits, keys, jnp.zeros(6), jnp.array([1, .1, 1, .5, 1, 1]),
                       jnp.array([0, 0, 3, 1, 0, 50], jnp.int32))
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))


def test_a_rows_draw_does_not_depend_on_its_neighbours_filters():
    n = 1000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS)))
    keys = request_keys(jnp.full((n,), 3, jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    ones = jnp.ones(n)
    plain, _ = sample(logits, keys, ones, ones, jnp.zeros(n, jnp.int32))
    odd_rows_filtered = jnp.arange(n) % 2 == 1
    mixed, _ = sample(logits, keys, ones, jnp.where(odd_rows_filtered, 0.5, 1.0),
                      jnp.where(odd_rows_filtered, 2, 0).astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(plain)[::2], np.asarray(mixed)[::2])
    assert set(np.asarray(mixed)[1::2]) <= {0, 1}


def test_logprobs_are_log_softmax_of_the_logits_at_the_chosen_token():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)), jnp.float32)
    keys = request_keys(jnp.arange(4, dtype=jnp.uint32), jnp.zeros(4, jnp.int32))
    tokens, logprobs = sample(logits, keys, jnp.array([0, 1, 0.7, 2.0]), jnp.ones(4), jnp.zeros(4, jnp.int32))
    expected = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(4), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6)


# ---- settings and prompts ---------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=100, emb_size=32, num_layers=1, num_q_heads=4, num_kv_heads=2,
                     key_size=8, widening_factor=1, sequence_len=64)


@pytest.mark.parametrize("name, value, allowed", [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
    ("top_k", -1, ">= 0"), ("top_k", 2.5, ">= 0"),
    ("max_new_tokens", 0, ">= 1"), ("max_new_tokens", True, ">= 1"),
    ("seed", -1, "[0, 2**32)"), ("seed", 2.0, "[0, 2**32)"),
    ("frequency_penalty", 2.5, "[-2, 2]"), ("presence_penalty", -2.1, "[-2, 2]"),
    ("frequency_penalty", float("inf"), "[-2, 2]"), ("presence_penalty", "1", "[-2, 2]"), ("stop", [100], "[0, 100)"), ("stop", [""], "empty"),
    ("logprobs", "yes", "True or False")])
def test_bad_setting_raises_value_error_naming_it_and_its_range(name, value, allowed):
    with pytest.raises(ValueError) as err:
        sampling_settings(CONFIG, **{name: value})
    assert name in str(err.value) and allowed in str(err.value)


def test_unknown_setting_is_refused_with_the_allowed_names():
    with pytest.raises(TypeError, match="temperature"):
        sampling_settings(CONFIG, temprature=0.5)


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        sampling_settings(CONFIG, stop=["\n"])


def test_stop_accepts_token_ids_and_a_single_id():
    assert sampling_settings(CONFIG, stop=[5, 7]).stop_token_ids == (5, 7)
    assert sampling_settings(CONFIG, stop=9).stop_token_ids == (9,)


@pytest.mark.parametrize("prompt, message", [
    ([0, 5, 100], r"\[0, 100\)"), ([-1], r"\[0, 100\)"), ([], "at least one token"),
    (3.5, "string or a list of token ids"), ([[1, 2]], "flat list"), (["a"], "flat list"),
    ("text", "no tokenizer")])
def test_bad_prompt_raises_value_error(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt_token_ids(prompt, CONFIG, None, sampling_settings(CONFIG))


def test_max_new_tokens_beyond_the_room_left_is_lowered_and_reported():
    fitted = fit_prompt(list(range(1, 31)), CONFIG, None, sampling_settings(CONFIG, max_new_tokens=54))
    assert fitted.token_ids == list(range(1, 31))
    assert fitted.max_new_tokens == 34 and fitted.max_new_tokens_lowered_from == 54
    assert fitted.dropped_prompt_tokens == 0


def test_prompt_longer_than_the_context_keeps_its_last_tokens_and_reports_how_many_it_dropped():
    fitted = fit_prompt(list(range(1, 71)), CONFIG, None, sampling_settings(CONFIG))
    assert fitted.token_ids == list(range(8, 71)) and fitted.dropped_prompt_tokens == 7
    assert fitted.max_new_tokens == 1 and fitted.max_new_tokens_lowered_from is None


def test_prompt_longer_than_the_context_makes_room_for_the_new_tokens_asked():
    fitted = fit_prompt(list(range(1, 71)), CONFIG, None, sampling_settings(CONFIG, max_new_tokens=10))
    assert fitted.token_ids == list(range(17, 71)) and fitted.dropped_prompt_tokens == 16
    assert fitted.max_new_tokens == 10 and fitted.max_new_tokens_lowered_from is None


def test_prompt_longer_than_the_context_keeps_one_token_when_max_new_tokens_exceeds_the_context():
    fitted = fit_prompt(list(range(1, 71)), CONFIG, None, sampling_settings(CONFIG, max_new_tokens=1000))
    assert fitted.token_ids == [70] and fitted.dropped_prompt_tokens == 69
    assert fitted.max_new_tokens == 63 and fitted.max_new_tokens_lowered_from == 1000


def test_fitting_a_prompt_raises_no_python_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_prompt(list(range(1, 90)), CONFIG, None, sampling_settings(CONFIG, max_new_tokens=10 ** 6))


def test_without_max_new_tokens_the_request_runs_to_the_context_end():
    fitted = fit_prompt([4, 5, 6], CONFIG, None, sampling_settings(CONFIG, max_new_tokens=None))
    assert fitted.max_new_tokens == 61 and fitted.max_new_tokens_lowered_from is None


@pytest.mark.parametrize("prompt, max_new_tokens, message", [
    (list(range(1, 31)), 54, "at most 34"), (list(range(1, 71)), None, "at most 63 tokens"),
    (list(range(1, 71)), 10, "room for max_new_tokens 10 .* at most 54 tokens")])
def test_strict_refuses_to_lower_max_new_tokens_or_drop_prompt_tokens(prompt, max_new_tokens, message):
    settings = sampling_settings(CONFIG, max_new_tokens=max_new_tokens, strict=True)
    with pytest.raises(ValueError, match=message):
        fit_prompt(prompt, CONFIG, None, settings)


def test_prompt_that_fits_is_kept_whole():
    assert prompt_token_ids([4, 5, 6], CONFIG, None, sampling_settings(CONFIG, max_new_tokens=61)) == [4, 5, 6]


# Model-level checks happen before anything runs, so a parameterless Model suffices.
MODEL = Model(config=CONFIG, params={}, dtype=jnp.float32)


@pytest.mark.parametrize("prompts, message", [
    ([], "empty batch"), ("one prompt", "list of prompts"), (42, "list of prompts"),
    ([[1, 2], {"a": 1}], "string or a list of token ids"), ([[1, 200]], r"\[0, 100\)")])
def test_generate_rejects_bad_batches(prompts, message):
    with pytest.raises(ValueError, match=message):
        MODEL.generate(prompts)


def test_stream_checks_settings_when_called_not_when_iterated():
    with pytest.raises(ValueError, match="top_p"):
        MODEL.stream([1, 2], top_p=2)


def test_seed_per_prompt_must_match_the_batch():
    with pytest.raises(ValueError, match="one per prompt"):
        MODEL.generate([[1], [2]], seed=[1, 2, 3])


# ---- penalties, seeds, BOS --------------------------------------------------------------------

def test_penalties_lower_generated_tokens_as_the_openai_api_defines_them():
    logits = jnp.array([[1.0, 1.0, 1.0, 1.0]])
    counts = jnp.array([[0, 1, 3, 0]])
    out = penalize(logits, counts, jnp.array([0.5]), jnp.array([0.25]))
    # logit - count * frequency_penalty - (count > 0) * presence_penalty
    np.testing.assert_allclose(out, [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]])


def test_negative_penalties_raise_generated_tokens():
    out = penalize(jnp.zeros((1, 3)), jnp.array([[2, 0, 0]]), jnp.array([-1.0]), jnp.array([-0.5]))
    np.testing.assert_allclose(out, [[2.5, 0.0, 0.0]])


def test_no_seed_is_none_in_the_settings_and_fresh_seeds_differ():
    assert sampling_settings(CONFIG).seed is None
    seeds = draw_fresh_seeds(8)
    assert len(set(seeds)) == 8 and all(0 <= s < 2 ** 32 for s in seeds)


class Characters:
    """A stand-in tokenizer: one token per character (ids 10, 11, ...)."""

    def encode(self, text):
        return [10 + ord(c) - ord("a") for c in text]


def test_text_prompts_start_with_bos_when_the_config_says_so():
    assert encode_text("ab", CONFIG.replace(add_bos=True), Characters()) == [CONFIG.bos_token, 10, 11]
    assert encode_text("ab", CONFIG.replace(add_bos=False), Characters()) == [10, 11]


def test_token_id_prompts_are_taken_as_given_whatever_add_bos_says():
    config = CONFIG.replace(add_bos=True)
    assert prompt_token_ids([10, 11], config, Characters(), sampling_settings(config)) == [10, 11]


def test_a_text_prompt_longer_than_the_context_keeps_its_bos():
    config = CONFIG.replace(add_bos=True)
    fitted = fit_prompt("abcdefghij" * 7, config, Characters(), sampling_settings(config))
    assert fitted.token_ids[0] == config.bos_token and len(fitted.token_ids) == config.sequence_len - 1
    assert fitted.token_ids[1:] == Characters().encode("abcdefghij" * 7)[-62:]
    assert fitted.dropped_prompt_tokens == 71 - 63


def test_a_text_prompt_longer_than_the_context_keeps_its_bos_and_room_for_the_new_tokens_asked():
    config = CONFIG.replace(add_bos=True)
    text = "abcdefghij" * 7
    fitted = fit_prompt(text, config, Characters(), sampling_settings(config, max_new_tokens=10))
    assert fitted.token_ids == [config.bos_token, *Characters().encode(text)[-53:]]
    assert fitted.dropped_prompt_tokens == 71 - 54 and fitted.max_new_tokens == 10
    fitted = fit_prompt(text, config, Characters(), sampling_settings(config, max_new_tokens=1000))
    assert fitted.token_ids == [config.bos_token, Characters().encode(text)[-1]]
    assert fitted.max_new_tokens == 62 and fitted.max_new_tokens_lowered_from == 1000
