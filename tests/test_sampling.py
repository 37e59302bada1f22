"""The sampling function on its own, and the checks on sampling settings and prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.config import ModelConfig
from grok1.inference import Model
from grok1.sampler import prompt_token_ids, request_keys, sample, sampling_settings

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
    ("seed", -1, "[0, 2**32)"), ("stop", [100], "[0, 100)"), ("stop", [""], "empty"),
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


def test_long_prompt_loses_its_oldest_tokens_with_a_warning():
    settings = sampling_settings(CONFIG, max_new_tokens=54)
    with pytest.warns(UserWarning, match="keeping its last 10 tokens"):
        ids = prompt_token_ids(list(range(1, 31)), CONFIG, None, settings)
    assert ids == list(range(21, 31))


def test_long_prompt_raises_when_strict():
    settings = sampling_settings(CONFIG, max_new_tokens=54, strict=True)
    with pytest.raises(ValueError, match="at most 10 tokens"):
        prompt_token_ids(list(range(1, 31)), CONFIG, None, settings)


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
