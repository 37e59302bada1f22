"""Generation through the KV cache: golden greedy continuations, continuous batching, seeds,
stopping, streaming text and compilation counts.

Most tests share one float32 `two_layer` model and its 4-slot runner, so the file compiles one
decode step and one prefill bucket for it (plus the same for `twelve_layer`).
"""

from __future__ import annotations

import io

import jax.monitoring
import numpy as np
import pytest

import grok1
from grok1.generation import api
from grok1.generation.engine import Engine, engine_for
from grok1.generation.requests import Request
from grok1.generation.runner import Runner, runner_for
from grok1.generation.settings import sampling_settings
from grok1.generation.steps import empty_state
from grok1.tokenizer import REPLACEMENT_CHAR, IncrementalDecoder, Tokenizer

from conftest import GOLDEN, Golden, run_with_devices

SLOTS = 4
TRAINING_TEXT = ["The quick brown fox jumps over the lazy dog.", "你好，世界！今天天气很好。",
                 "Emoji 🎉🦜 and more text here.", "hello world, hello again, and again"] * 40


@pytest.fixture(scope="module")
def small_tokenizer_path(tmp_path_factory):
    """A 320-piece SentencePiece model with byte fallback (fits the golden vocab of 512), so text
    tests run without ../shared/reference."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=proto, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False,
        normalization_rule_name="identity", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]", minloglevel=2)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(proto.getvalue())
    return path


@pytest.fixture(scope="module")
def model(small_tokenizer_path):
    """The float32 two_layer golden model with the small tokenizer."""
    path = GOLDEN / "two_layer"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside the repo)")
    return grok1.load(path, dtype="float32", tokenizer=small_tokenizer_path)


def prompts_of_lengths(*lengths: int) -> list[list[int]]:
    rng = np.random.default_rng(sum(lengths))
    return [[int(t) for t in rng.integers(3, 500, size=n)] for n in lengths]


def alone(model, prompt, **settings):
    """The request run as the only one in the runner."""
    return model.generate([prompt], slots=SLOTS, **settings)[0]


# ---- golden greedy ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["two_layer", "twelve_layer"])
def test_greedy_through_the_cache_reproduces_full_recompute(name, model):
    golden = Golden(name)
    m = model if name == "two_layer" else grok1.load(golden.path, dtype="float32")
    expected = golden.data["greedy_full_recompute"]
    margins = golden.data["greedy_top2_margin"]
    outs = m.generate(golden.prompts, slots=SLOTS, temperature=0, max_new_tokens=len(expected[0]))
    checked = 0
    for out, ref, margin in zip(outs, expected, margins):
        # A near-tie (margin < 0.05) may go either way; after it the sequences may diverge.
        n = next((i for i, m in enumerate(margin) if m < 0.05), len(margin))
        assert out.token_ids[:n] == ref[:n]
        checked += n
    assert checked > 0, "every step is a near-tie: nothing was compared"


# ---- continuous batching ----------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=[11, 12, 13, 14])])
def test_prompts_of_different_lengths_together_equal_each_alone(model, settings):
    prompts = prompts_of_lengths(2, 7, 13, 29)
    together = model.generate(prompts, slots=SLOTS, max_new_tokens=12, **settings)
    seeds = settings.get("seed", [0] * 4)
    for prompt, seed, out in zip(prompts, seeds, together):
        solo = alone(model, prompt, max_new_tokens=12, **{**settings, "seed": seed})
        assert out.token_ids == solo.token_ids


def test_ten_requests_through_four_slots_all_finish_each_equal_to_its_solo_run(model):
    prompts = prompts_of_lengths(*range(1, 30, 3))
    settings = [sampling_settings(model.config, max_new_tokens=3 + 2 * i, temperature=0.8, seed=i)
                for i in range(len(prompts))]
    finished = {}
    for index, delta, request in engine_for(model, SLOTS).run(list(zip(prompts, settings))):
        if delta.finish_reason is not None:
            finished[index] = request.completion()
    assert sorted(finished) == list(range(10))
    for i, prompt in enumerate(prompts):
        solo = alone(model, prompt, max_new_tokens=3 + 2 * i, temperature=0.8, seed=i)
        assert finished[i].token_ids == solo.token_ids


def test_same_seed_gives_the_same_output(model):
    prompt = prompts_of_lengths(5)[0]
    first = alone(model, prompt, max_new_tokens=16, temperature=1.0, seed=5)
    again = alone(model, prompt, max_new_tokens=16, temperature=1.0, seed=5)
    assert first.token_ids == again.token_ids


def test_different_seeds_give_different_outputs(model):
    prompt = prompts_of_lengths(5)[0]
    outs = model.generate([prompt] * 3, slots=SLOTS, max_new_tokens=16, temperature=1.0, seed=[1, 2, 3])
    assert len({tuple(o.token_ids) for o in outs}) == 3


def test_no_seed_gives_fresh_samples_for_a_repeated_prompt(model):
    prompt = prompts_of_lengths(5)[0]
    outs = [alone(model, prompt, max_new_tokens=16, temperature=1.0) for _ in range(2)]
    assert outs[0].token_ids != outs[1].token_ids and outs[0].seed != outs[1].seed


def test_no_seed_gives_batch_neighbours_their_own_streams(model):
    prompt = prompts_of_lengths(5)[0]
    outs = model.generate([prompt] * 3, slots=SLOTS, max_new_tokens=16, temperature=1.0)
    assert len({tuple(o.token_ids) for o in outs}) == 3


def test_unseeded_requests_take_their_seeds_from_draw_fresh_seeds(model, monkeypatch):
    prompt = prompts_of_lengths(5)[0]
    monkeypatch.setattr(api, "draw_fresh_seeds", lambda count: [11] * count)
    unseeded = alone(model, prompt, max_new_tokens=16, temperature=1.0)
    assert unseeded.seed == 11
    assert unseeded.token_ids == alone(model, prompt, max_new_tokens=16, temperature=1.0, seed=11).token_ids


def test_an_explicit_seed_gives_a_prompt_the_same_output_alone_or_in_a_batch(model):
    prompts = prompts_of_lengths(5, 9, 3)
    together = model.generate(prompts, slots=SLOTS, max_new_tokens=12, temperature=1.0, seed=4)
    assert together[1].token_ids == alone(model, prompts[1], max_new_tokens=12, temperature=1.0, seed=4).token_ids


# ---- penalties --------------------------------------------------------------------------------

def greedy_with_penalties_by_full_recompute(model, prompt, steps, frequency, presence):
    """The definition, on the host: argmax of logits - count * frequency - (count > 0) * presence."""
    tokens, counts = list(prompt), np.zeros(model.config.vocab_size)
    for _ in range(steps):
        logits = model.logits([tokens])[0, -1].astype(np.float64)
        token = int(np.argmax(logits - counts * frequency - (counts > 0) * presence))
        tokens.append(token)
        counts[token] += 1
    return tokens[len(prompt):]


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.7, 0.5)])
def test_greedy_with_penalties_follows_their_definition(model, frequency, presence):
    prompt = [300, 12, 8, 8, 450]
    out = alone(model, prompt, max_new_tokens=12, temperature=0, frequency_penalty=frequency,
                presence_penalty=presence, stop=[])
    expected = greedy_with_penalties_by_full_recompute(model, prompt, 12, frequency, presence)
    assert out.token_ids == expected[:len(out.token_ids)]


def test_penalties_count_only_the_requests_own_tokens(model):
    prompts = prompts_of_lengths(5, 7)
    settings = dict(max_new_tokens=12, temperature=0, frequency_penalty=1.0, presence_penalty=1.0)
    together = model.generate(prompts, slots=SLOTS, **settings)
    assert [o.token_ids for o in together] == [alone(model, p, **settings).token_ids for p in prompts]


# ---- stopping ---------------------------------------------------------------------------------

def test_max_new_tokens_ends_with_finish_reason_length(model):
    out = alone(model, [5, 17, 99], max_new_tokens=5, temperature=0)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ends_generation_before_it(model):
    free = alone(model, [300, 12, 8, 8, 450], max_new_tokens=10, temperature=0).token_ids
    stop = free[4]
    first = free.index(stop)
    out = alone(model, [300, 12, 8, 8, 450], max_new_tokens=10, temperature=0, stop=[stop])
    assert out.token_ids == free[:first] and out.finish_reason == "stop"


def test_eos_token_ends_the_request_with_stop_and_is_not_output(model):
    request = Request([5, 6], sampling_settings(model.config), model.config, None)
    assert request.add(7, -1.0).finish_reason is None
    delta = request.add(model.config.eos_token, -1.0)
    assert delta.finish_reason == "stop" and delta.token_ids == []
    assert request.completion().token_ids == [7]
    assert delta.stop_reason is None and request.completion().stop_reason is None


def test_stop_reason_names_the_stop_token(model):
    request = Request([5, 6], sampling_settings(model.config, stop=[9]), model.config, None)
    assert request.add(9, -1.0).stop_reason == 9 and request.completion().stop_reason == 9


def test_generation_stops_at_the_context_end(model):
    prompt = prompts_of_lengths(60)[0]
    out = alone(model, prompt, temperature=0)                   # no max_new_tokens: up to the end
    assert len(out.prompt_token_ids) + len(out.token_ids) == model.config.sequence_len
    assert out.finish_reason == "length"


def test_max_new_tokens_beyond_the_context_is_lowered_and_reported_on_the_completion(model):
    prompt = prompts_of_lengths(40)[0]
    out = alone(model, prompt, max_new_tokens=1000, temperature=0)
    assert out.prompt_token_ids == prompt and len(out.token_ids) == model.config.sequence_len - 40
    assert out.max_new_tokens_lowered_from == 1000 and out.dropped_prompt_tokens == 0


def test_prompt_longer_than_the_context_is_reported_on_the_first_delta(model):
    prompt = prompts_of_lengths(70)[0]
    deltas = list(model.stream(prompt, max_new_tokens=1, temperature=0))
    assert deltas[0].dropped_prompt_tokens == 70 - (model.config.sequence_len - 1)


def test_logprobs_come_with_each_token_when_asked(model):
    out = alone(model, [5, 17, 99], max_new_tokens=6, temperature=1.0, logprobs=True)
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    assert alone(model, [5, 17, 99], max_new_tokens=6).logprobs is None


# ---- text and streaming -----------------------------------------------------------------------

def test_stream_deltas_concatenate_to_the_completion_text(model):
    prompt = "你好，世界！ Emoji 🎉 and"
    settings = dict(max_new_tokens=24, temperature=1.0, seed=3)
    deltas = list(model.stream(prompt, slots=SLOTS, **settings))
    completion = alone(model, prompt, **settings)
    assert "".join(d.text for d in deltas) == completion.text
    assert [t for d in deltas for t in d.token_ids] == completion.token_ids
    assert deltas[-1].finish_reason == completion.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_chinese_and_emoji_prompt_round_trips_through_the_tokenizer(model):
    prompt = "你好，世界！ Emoji 🎉🦜"
    out = alone(model, prompt, max_new_tokens=1)
    assert model.tokenizer.decode(out.prompt_token_ids) == prompt


def test_stop_string_cuts_the_text_and_streams_the_same(model):
    settings = dict(max_new_tokens=24, temperature=1.0, seed=3)
    text = alone(model, "hello world", **settings).text
    stop = text[5:8]
    assert stop and text.find(stop) == 5
    out = alone(model, "hello world", stop=[stop], **settings)
    assert out.text == text[:5] and out.finish_reason == "stop" and out.stop_reason == stop
    streamed = "".join(d.text for d in model.stream("hello world", slots=SLOTS, stop=[stop], **settings))
    assert streamed == out.text


def test_decoder_holds_back_a_character_until_its_last_byte(small_tokenizer_path):
    tok = Tokenizer(small_tokenizer_path)
    pieces = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "é你🎉".encode()]
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([p]) for p in pieces]
    assert deltas == ["", "é", "", "", "你", "", "", "", "🎉"]


def test_decoder_flush_returns_a_dangling_partial_character(small_tokenizer_path):
    tok = Tokenizer(small_tokenizer_path)
    decoder = IncrementalDecoder(tok)
    assert decoder.push([tok.sp.piece_to_id("<0xE4>")]) == ""
    assert decoder.flush() == REPLACEMENT_CHAR


@pytest.mark.parametrize("text", ["你好，世界 🎉 hello 🦜", "日本語のテキスト、絵文字👩‍👩‍👧‍👦とか\n\n  spaced  out 😀😀"])
def test_reference_tokenizer_streams_chinese_and_emoji_without_replacement_chars(tokenizer_path, text):
    tok = Tokenizer(tokenizer_path)
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([token]) for token in tok.encode(text)] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_decoder_keeps_the_space_before_the_first_generated_word(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    context = tok.encode("The capital of France is")
    generated = tok.encode("The capital of France is Paris")[len(context):]
    decoder = IncrementalDecoder(tok, context)
    assert "".join(decoder.push([t]) for t in generated) + decoder.flush() == " Paris"


def test_multi_token_decode_chunks_give_the_same_tokens(model):
    prompts = prompts_of_lengths(2, 7, 13)
    settings = [sampling_settings(model.config, max_new_tokens=5 + 3 * i, temperature=1.0, seed=i)
                for i in range(3)]
    chunked = {}
    with Engine(model, SLOTS, decode_chunk=4) as engine:
        for index, delta, request in engine.run(list(zip(prompts, settings))):
            if delta.finish_reason is not None:
                chunked[index] = request.completion().token_ids
    for i, prompt in enumerate(prompts):
        assert chunked[i] == alone(model, prompt, max_new_tokens=5 + 3 * i, temperature=1.0, seed=i).token_ids


def test_multi_token_decode_chunks_hold_no_float_copy_of_the_table(model):
    # XLA:CPU widens a bfloat16 gather to float32 by converting the whole table, and a loop of
    # decode steps hoists that conversion out of the loop: a float32 table beside the stored one.
    def temporaries(chunk: int) -> int:
        runner = Runner(model, slots=SLOTS, decode_chunk=chunk)
        state = empty_state(model.config, model.dtype, SLOTS)
        return runner.decode.lower(model.params, state).compile().memory_analysis().temp_size_in_bytes
    float_table = model.config.vocab_size * model.config.emb_size * 4
    assert temporaries(4) - temporaries(1) < float_table / 4


# ---- compilation ------------------------------------------------------------------------------

def test_no_compilation_during_64_decode_steps_after_warm_up(model):
    runner = runner_for(model, SLOTS)
    alone(model, [7, 8, 9], max_new_tokens=4)                     # warm-up: prefill and decode
    compilations = []
    listener = lambda event, duration, **kw: compilations.append(kw.get("fun_name", event)) \
        if event == "/jax/core/compile/backend_compile_duration" else None
    decode, steps = runner.decode, []
    runner.decode = lambda *args: steps.append(1) or decode(*args)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in range(5):                # EOS may end requests early: repeat until 64 steps
            model.generate(prompts_of_lengths(3, 9, 4, 20, 6, 2), slots=SLOTS, max_new_tokens=40,
                           temperature=0.7, top_p=0.9, top_k=40, seed=seed)
            if len(steps) >= 64:
                break
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        runner.decode = decode
    assert len(steps) >= 64
    assert compilations == []


# ---- on a mesh --------------------------------------------------------------------------------

SHARDED_GENERATE = """
import json, jax
import grok1
from grok1.mesh import make_mesh
model = grok1.load({path!r}, dtype="float32", mesh=make_mesh("2x4"))
outs = model.generate({prompts!r}, slots=4, temperature=0, max_new_tokens=8)
sampled = model.generate({prompts!r}, slots=4, max_new_tokens=8, seed=[1, 2, 3, 4], **{sampling!r})
runner = model._runners[4]
keys = runner._state.cache.keys[0]
spec = tuple(keys.sharding.spec) + (None,) * (keys.ndim - len(keys.sharding.spec))   # trailing Nones shown
print(json.dumps(dict(tokens=[o.token_ids for o in outs], sampled=[o.token_ids for o in sampled],
                      cache_spec=str(spec),
                      compilations=[runner.decode._cache_size(), runner._prefill_slot._cache_size()])))
"""


@pytest.mark.slow
def test_sharded_cache_on_a_2x4_mesh_generates_what_one_device_does(model):
    import json

    prompts = prompts_of_lengths(2, 7, 13, 29)
    sampling = dict(temperature=0.8, top_p=0.95, top_k=40)        # run.py's draw, on the mesh too
    result = json.loads(run_with_devices(SHARDED_GENERATE.format(
        path=str(GOLDEN / "two_layer"), prompts=prompts, sampling=sampling)).splitlines()[-1])
    assert result["tokens"] == [o.token_ids for o in
                                model.generate(prompts, slots=SLOTS, temperature=0, max_new_tokens=8)]
    assert result["sampled"] == [o.token_ids for o in model.generate(
        prompts, slots=SLOTS, max_new_tokens=8, seed=[1, 2, 3, 4], **sampling)]
    assert result["cache_spec"] == "('data', None, 'model', None)"   # slots over data, kv heads over model
    assert result["compilations"] == [1, 1]
