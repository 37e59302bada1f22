"""The OpenAI-compatible server: the official client, the chat template and the seeds of `n`
choices, compiling before listening, requests joining while others decode, determinism against
`generate`, a load test with disconnecting clients, malformed and hostile input, an API key, and
graceful shutdown.

One server (4 slots, on 127.0.0.1 and a free port, in a thread of this process) serves the
shipped model for the whole file; it shares its compiled steps with `model.generate(slots=4)`.
Prompts stay under 32 tokens so one prefill bucket is compiled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from starlette.testclient import TestClient

import grok1
from grok1.generation.engine import Engine
from grok1.generation.requests import Request
from grok1.generation.runner import runner_for
from grok1.generation.settings import sampling_settings
from grok1.server import BackgroundServer, api_key_from, build_app

from conftest import REPO
from test_distributed import launched_process

MODEL = "small"
SLOTS = 4
PROMPT = "The function returns"


@pytest.fixture(scope="module")
def model():
    return grok1.load(REPO / "checkpoints" / "small")


@pytest.fixture(scope="module")
def server(model):
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def metrics(http: httpx.Client) -> dict[str, float]:
    """/metrics as {name{labels}: value}."""
    text = http.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def wait_until_idle(http: httpx.Client, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if (m["grok1_requests_running"], m["grok1_requests_waiting"]) == (0, 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# ---- the official client ----------------------------------------------------------------------

def test_openai_client_gets_a_completion_with_usage_and_finish_reason(client, model):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=1, temperature=0.8)
    assert out.object == "text_completion" and out.model == MODEL
    [choice] = out.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert out.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT)) + 1      # and BOS
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_client_gets_a_chat_completion(client):
    out = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "You write code."}, {"role": "user", "content": "Say hello"}],
        max_tokens=10, seed=2)
    [choice] = out.choices
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 10 and out.usage.prompt_tokens > 0


def test_streamed_completion_has_the_text_finish_reason_and_usage_of_the_whole_one(client):
    settings = dict(model=MODEL, prompt=PROMPT, max_tokens=20, seed=3, temperature=0.9, top_p=0.95)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_chat_starts_with_the_role_and_ends_with_a_finish_reason(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 8


def test_a_list_of_prompts_with_n_gives_every_choice_in_order(client):
    out = client.completions.create(model=MODEL, prompt=[PROMPT, [1, 450, 600]], n=2, max_tokens=5, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)


def test_logprobs_come_with_each_returned_token(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, seed=6, logprobs=0)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == out.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_models_lists_the_served_model_and_health_is_ok(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").json() == {"status": "ok"}


# ---- the chat template and the seeds of n choices ---------------------------------------------

def test_chat_answers_what_generate_continues_greedily_from_the_documented_template(client, model):
    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Say hello"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Say it twice"}]
    # protocol.py's module docstring, written out by hand
    template = ("System: You write code.\n\nUser: Say hello\n\nAssistant: Hello.\n\n"
                "User: Say it twice\n\nAssistant:")
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    [expected] = model.generate([template], slots=SLOTS, max_new_tokens=20, temperature=0.0,
                                stop=["\nUser:"])
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.choices[0].message.content == expected.text.lstrip()
    assert out.choices[0].finish_reason == expected.finish_reason


@contextlib.contextmanager
def submitted_settings(engine: Engine):
    """The SamplingSettings of each request submitted to `engine` inside the block (submitted
    as usual; the engine's own `submit` is back after it)."""
    seen, submit = [], engine.submit

    def recording(requests, **options):
        seen.extend(settings for _, settings, _ in requests)
        return submit(requests, **options)

    engine.submit = recording
    try:
        yield seen
    finally:
        del engine.submit


def test_chat_generation_stops_at_the_next_user_turn(server, client, model):
    # The shipped model never writes "\nUser:" itself (greedy or sampled), so the reply that does
    # is given as token ids to the progress of a request with the settings the server submitted.
    with submitted_settings(server.engine) as seen:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, stop=["END"])
    [settings] = seen
    assert sorted(settings.stop_strings) == ["\nUser:", "END"]
    prompt = model.tokenizer.encode("User: Hi\n\nAssistant:")
    progress = Request(prompt, dataclasses.replace(settings, max_new_tokens=None), model.config,
                       model.tokenizer)
    for token in model.tokenizer.encode(" Hello.\n\nUser: and the model speaks for the user"):
        if progress.add(token, 0.0).finish_reason is not None:
            break
    assert (progress.finish_reason, progress.stop_reason) == ("stop", "\nUser:")
    assert progress.text.strip() == "Hello."


def test_n_choices_sample_with_seeds_seed_seed_plus_1_and_so_on(client):
    settings = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0)
    together = client.completions.create(**settings, n=3, seed=40)
    alone = [client.completions.create(**settings, seed=40 + i).choices[0].text for i in range(3)]
    assert [choice.text for choice in together.choices] == alone
    assert len(set(alone)) == 3, "the seeds must sample different texts for the check to mean anything"


# ---- compiling before listening ---------------------------------------------------------------

SERVING_STEPS = ("decode", "_prefill_slot", "_prefill_chunk", "_start_slot")


def test_a_server_compiles_its_serving_steps_before_it_listens_so_requests_compile_nothing(model):
    runner = runner_for(model, 3)   # slots=3: a runner no other test compiles
    steps = {name: getattr(runner, name) for name in SERVING_STEPS}
    assert not any(step._cache_size() for step in steps.values())
    with BackgroundServer(model, slots=3, model_name=MODEL) as fresh:
        compiled = {name: step._cache_size() for name, step in steps.items()}
        assert all(compiled.values()), compiled
        ids = model.tokenizer.encode(LONG_PROMPT)
        # a short prompt, one of the bucket a prefill chunk fills, and one prefilled in chunks
        for prompt in (PROMPT, ids[:100], ids[:150]):
            response = httpx.post(fresh.url + "/v1/completions", timeout=60,
                                  json=dict(model=MODEL, prompt=prompt, max_tokens=3))
            assert response.status_code == 200, response.text
    assert {name: step._cache_size() for name, step in steps.items()} == compiled


def test_a_server_says_in_one_line_on_stderr_that_it_compiles_before_it_starts(model, capfd):
    capfd.readouterr()
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL, log_level="info"):
        pass
    lines = capfd.readouterr().err.splitlines()
    [compiling] = [i for i, line in enumerate(lines) if "compiling" in line]
    assert re.fullmatch(r"grok1: compiling the serving steps \(or loading them from the compilation "
                        r"cache\) \.\.\. done in \d+\.\d s", lines[compiling])
    assert compiling < next(i for i, line in enumerate(lines) if "startup complete" in line)


# ---- scheduling -------------------------------------------------------------------------------

def test_a_short_request_sent_during_a_long_one_completes_first(client, http):
    order, long_started = [], threading.Event()

    def long_request():   # seed 11 samples all 200 tokens (no EOS before)
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, seed=11,
                                           temperature=1.0, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            long_started.set()
        order.append(("long", chunk.usage.completion_tokens))

    thread = threading.Thread(target=long_request)
    thread.start()
    assert long_started.wait(60)
    short = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, seed=12)
    order.append(("short", short.choices[0].finish_reason))
    thread.join(120)
    assert order[0][0] == "short"
    assert order[1][1] > 100, "the long request must really be long"


@contextlib.contextmanager
def recorded_calls(runner, *names: str):
    """The names of `runner`'s jitted steps among `names`, in the order they are called inside
    the block (the steps themselves run as usual and are put back after it)."""
    calls, steps = [], {name: getattr(runner, name) for name in names}
    for name, step in steps.items():
        setattr(runner, name, lambda *args, name=name, step=step: calls.append(name) or step(*args))
    try:
        yield calls
    finally:
        for name, step in steps.items():
            setattr(runner, name, step)


def test_newcomers_join_one_per_decode_step_while_others_decode(model):
    with recorded_calls(runner_for(model, SLOTS), "prefill", "decode") as calls, \
            Engine(model, slots=SLOTS) as engine:
        settings = sampling_settings(model.config, model.tokenizer, max_new_tokens=200, seed=11)
        ids = engine.fit(PROMPT, settings).token_ids
        long = engine.stream(ids, settings)
        next(long)
        finished = queue.SimpleQueue()
        short = [sampling_settings(model.config, model.tokenizer, max_new_tokens=3, seed=s) for s in (1, 2, 3)]
        engine.submit([(ids, s, lambda d: d.finish_reason and finished.put(d)) for s in short])
        for _ in short:
            finished.get(timeout=60)
        long.close()
    while_decoding = calls[calls.index("decode"):]
    assert while_decoding.count("prefill") == 3
    assert "prefill, prefill" not in ", ".join(while_decoding)


LONG_PROMPT = "The function returns the value of its argument, or raises an error. " * 12


def long_prompt_ids(engine: Engine, settings, length: int = 150) -> list[int]:
    ids = engine.fit(LONG_PROMPT, settings).token_ids[:length]
    assert len(ids) == length
    return ids


def test_a_prompt_prefilled_in_chunks_generates_what_it_generates_prefilled_whole(model):
    settings = sampling_settings(model.config, model.tokenizer, max_new_tokens=20, temperature=0.8,
                                 seed=5, logprobs=True)
    results = {}
    for chunk in (32, model.config.sequence_len):   # 150 tokens: 5 chunks, or one prefill
        with Engine(model, slots=2, prefill_chunk=chunk) as engine:
            deltas = list(engine.stream(long_prompt_ids(engine, settings), settings))
        results[chunk] = ([t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas),
                          [p for d in deltas for p in d.logprobs or []])
    (chunked_ids, chunked_text, chunked_logprobs), (whole_ids, whole_text, whole_logprobs) = results.values()
    assert chunked_ids == whole_ids and chunked_text == whole_text and len(chunked_ids) > 10
    # Not bitwise: grok1.load's CPU default computes the experts of long prompts in bfloat16.
    assert max(abs(a - b) for a, b in zip(chunked_logprobs, whole_logprobs)) < 1e-2


def test_a_running_request_decodes_between_the_chunks_of_a_newcomers_prompt(model):
    with recorded_calls(runner_for(model, SLOTS), "prefill_chunk", "decode") as calls, \
            Engine(model, slots=SLOTS, prefill_chunk=32) as engine:
        settings = sampling_settings(model.config, model.tokenizer, max_new_tokens=200, seed=11)
        long = engine.stream(engine.fit(PROMPT, settings).token_ids, settings)
        next(long)
        newcomer = sampling_settings(model.config, model.tokenizer, max_new_tokens=3, seed=1)
        deltas = list(engine.stream(long_prompt_ids(engine, newcomer), newcomer))
        long.close()
    assert deltas[-1].finish_reason == "length"
    chunks = [i for i, call in enumerate(calls) if call == "prefill_chunk"]
    assert len(chunks) == 5                              # ceil(150 / 32)
    assert all("decode" in calls[a + 1:b] for a, b in zip(chunks, chunks[1:]))


def test_same_seed_and_settings_through_the_server_equal_generate_alone(client, model):
    cases = [dict(prompt=PROMPT, max_tokens=24, seed=21, temperature=0.8, top_p=0.9),
             dict(prompt="Once upon a time", max_tokens=30, seed=22, temperature=1.0, top_k=40),
             dict(prompt="import numpy", max_tokens=16, seed=23, temperature=0.0),
             dict(prompt="def main():", max_tokens=20, seed=24, temperature=0.7, frequency_penalty=0.5,
                  presence_penalty=0.3)]
    texts = [None] * len(cases)

    def ask(i, case):
        extra = {"top_k": case["top_k"]} if "top_k" in case else {}
        settings = {k: v for k, v in case.items() if k != "top_k"}
        texts[i] = client.completions.create(model=MODEL, **settings, extra_body=extra).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, case)) for i, case in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for case, text in zip(cases, texts):
        case = dict(case)
        prompt, case["max_new_tokens"] = case.pop("prompt"), case.pop("max_tokens")
        assert text == model.generate([prompt], slots=SLOTS, **case)[0].text


# ---- cancellation and load --------------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, http):
    cancelled_before = metrics(http).get('grok1_requests_finished_total{reason="cancelled"}', 0)
    with httpx.Client(base_url=server.url, timeout=60) as own:
        with own.stream("POST", "/v1/completions", json=dict(
                model=MODEL, prompt=PROMPT, max_tokens=250, seed=11, stream=True)) as response:
            next(response.iter_lines())
    m = wait_until_idle(http)
    assert m["grok1_requests_running"] == 0
    assert m['grok1_requests_finished_total{reason="cancelled"}'] == cancelled_before + 1


async def one_client(url: str, index: int, rng: random.Random) -> str:
    """One streaming client; a quarter mean to disconnect after a few events (those that reach
    EOS first end normally). -> "done" | "left"."""
    leave_after = rng.randint(1, 6) if index % 4 == 0 else None
    body = dict(model=MODEL, prompt=f"{PROMPT} {index}",
                max_tokens=rng.randint(4, 24) if leave_after is None else 200,
                seed=index, stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async with c.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            events = []
            async for line in response.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: ")
                events.append(line[len("data: "):])
                if leave_after is not None and len(events) >= leave_after:
                    return "left"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= body["max_tokens"]
    return "done"


def test_64_concurrent_clients_with_a_quarter_leaving_end_well_and_free_every_slot(server, http):
    before = metrics(http)
    rng = random.Random(0)

    async def all_clients():
        return await asyncio.gather(*(one_client(server.url, i, rng) for i in range(64)))

    start = time.monotonic()
    outcomes = asyncio.run(asyncio.wait_for(all_clients(), timeout=120))
    m = wait_until_idle(http)
    assert outcomes.count("left") >= 12 and outcomes.count("done") + outcomes.count("left") == 64
    assert (m["grok1_requests_running"], m["grok1_requests_waiting"]) == (0, 0)
    assert not [k for k in m if k.startswith('grok1_http_responses_total{code="5')]
    assert m["grok1_http_responses_total{code=\"200\"}"] - before["grok1_http_responses_total{code=\"200\"}"] >= 64
    assert time.monotonic() - start < 120


def test_a_full_queue_answers_429_with_retry_after(model):
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL, max_waiting=0) as busy:
        with httpx.stream("POST", busy.url + "/v1/completions", timeout=60, json=dict(
                model=MODEL, prompt=PROMPT, max_tokens=200, n=SLOTS, stream=True)) as every_slot:
            assert every_slot.status_code == 200
            response = httpx.post(busy.url + "/v1/completions", timeout=60,
                                  json=dict(model=MODEL, prompt=PROMPT, max_tokens=2))
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_no_queue_still_serves_requests_that_free_slots_take(model):
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL, max_waiting=0) as server:
        response = httpx.post(server.url + "/v1/completions", timeout=60,
                              json=dict(model=MODEL, prompt=PROMPT, max_tokens=2, n=SLOTS))
    assert response.status_code == 200 and len(response.json()["choices"]) == SLOTS


def test_more_completions_than_the_server_ever_holds_are_refused_before_reading_prompts(model):
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL, max_waiting=1) as server:
        response = httpx.post(server.url + "/v1/completions", timeout=60,
                              json=dict(model=MODEL, prompt=[[1, 2]] * 1000, max_tokens=2, n=16))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"the request asks for 16000 completions (prompts x n); this server takes at most "
        f"{SLOTS + 1} at once (slots + max_waiting)")


# ---- malformed input --------------------------------------------------------------------------

GOOD = dict(model=MODEL, prompt=PROMPT, max_tokens=2)
MALFORMED = {
    "not JSON": (b'{"model": "small", ', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "NaN is not JSON": (b'{"model": "small", "prompt": "a", "temperature": NaN}', 400, None),
    "missing prompt": (dict(model=MODEL), 400, "prompt"),
    "unknown field": ({**GOOD, "temprature": 0.5}, 400, "temprature"),
    "unknown model": ({**GOOD, "model": "gpt-4"}, 404, "model"),
    "temperature above 2": ({**GOOD, "temperature": 2.5}, 400, "temperature"),
    "top_p of 0": ({**GOOD, "top_p": 0}, 400, "top_p"),
    "n of 0": ({**GOOD, "n": 0}, 400, "n"),
    "max_tokens of 0": ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens as text": ({**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    "penalty out of range": ({**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    "negative seed": ({**GOOD, "seed": -1}, 400, "seed"),
    "five stop strings": ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "token id past the vocabulary": ({**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    "empty prompt list": ({**GOOD, "prompt": []}, 400, "prompt"),
    "prompt longer than the context": ({**GOOD, "prompt": [5] * 300}, 400, "prompt"),
    "max_tokens past the context": ({**GOOD, "max_tokens": 1000}, 400, "max_tokens"),
    "logprobs above 5": ({**GOOD, "logprobs": 6}, 400, "logprobs"),
}


@pytest.mark.parametrize("body,status,param", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_completion_gets_a_4xx_json_error_and_the_server_keeps_serving(http, body, status, param):
    response = http.post("/v1/completions", **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_prompt_longer_than_the_context_names_the_limit(http):
    message = http.post("/v1/completions", json={**GOOD, "prompt": [5] * 300}).json()["error"]["message"]
    assert "256" in message


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "hi"}], [{"role": "user"}],
                                      "hello"])
def test_malformed_chat_messages_get_a_400(http, messages):
    response = http.post("/v1/chat/completions", json=dict(model=MODEL, messages=messages))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_unknown_path_and_wrong_method_get_json_errors(http):
    assert http.get("/v1/nothing").json()["error"]["message"]
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["message"]


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def test_a_body_nested_100000_arrays_deep_gets_a_400_and_the_server_keeps_serving(http):
    response = http.post("/v1/completions", content=nested(100_000).encode())
    assert response.status_code == 400
    assert "nests" in response.json()["error"]["message"]
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def completion_with(field: str, raw_json: str) -> bytes:
    return f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 2, "{field}": {raw_json}}}'.encode()


def chat_with(raw_message: str) -> bytes:
    return f'{{"model": "{MODEL}", "max_tokens": 2, "messages": [{raw_message}]}}'.encode()


HUGE = "1" + "0" * 4000      # within Python's 4300-digit limit on parsing ints
HOSTILE = {   # (path, raw body): each gets a 4xx JSON error, never a 5xx
    "a deep prompt": ("completions", completion_with("prompt", nested(900))),
    "a deep stop list": ("completions", completion_with("stop", nested(900, '"x"'))),
    "a deep model": ("completions", f'{{"model": {nested(900)}, "prompt": "a"}}'.encode()),
    "a deep ignored field": ("completions", completion_with("user", nested(900))),
    "deep objects": ("completions", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
    "deep messages": ("chat/completions", f'{{"model": "{MODEL}", "messages": {nested(900)}}}'.encode()),
    "deep message content": ("chat/completions", chat_with(f'{{"role": "user", "content": {nested(900)}}}')),
    "a list as role": ("chat/completions", chat_with('{"role": ["user"], "content": "hi"}')),
    "a huge integer temperature": ("completions", completion_with("temperature", HUGE)),
    "a huge integer top_p": ("completions", completion_with("top_p", HUGE)),
    "a huge integer max_tokens": ("completions", completion_with("max_tokens", HUGE)),
    "a huge integer seed": ("completions", completion_with("seed", HUGE)),
    "a huge token id": ("completions", completion_with("prompt", f"[1, {HUGE}]")),
    "an integer past the parser's limit": ("completions", completion_with("n", "1" + "0" * 5000)),
    "1e999 (infinite) temperature": ("completions", completion_with("temperature", "1e999")),
    "NaN": ("completions", completion_with("top_p", "NaN")),
    "Infinity": ("completions", completion_with("presence_penalty", "Infinity")),
    "-Infinity": ("chat/completions", chat_with('{"role": "user", "content": -Infinity}')),
    "bytes that are not UTF-8": ("completions", completion_with("prompt", '"?"').replace(b"?", b"\xff\xfe")),
    "a lone surrogate in the prompt": ("completions", completion_with("prompt", '"\\ud800"')),
    "a lone surrogate in a message": ("chat/completions",
                                      chat_with('{"role": "user", "content": "\\udc00"}')),
    "a JSON number": ("completions", b"42"),
    "a JSON string": ("chat/completions", b'"hello"'),
    "a JSON null": ("completions", b"null"),
    "a JSON array": ("chat/completions", f'[{{"model": "{MODEL}"}}]'.encode()),
}


@pytest.mark.parametrize("path,body", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_body_gets_a_4xx_json_error_in_one_short_line(http, path, body):
    response = http.post(f"/v1/{path}", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text[:300]
    message = response.json()["error"]["message"]
    assert message and "\n" not in message and len(message) < 300
    assert http.post("/v1/completions", json=GOOD).status_code == 200


# ---- an API key -------------------------------------------------------------------------------

KEY = "sk-grok1-test-3f9a7c"


@pytest.fixture(scope="module")
def keyed(model):
    with BackgroundServer(model, slots=SLOTS, model_name=MODEL, api_key=KEY) as running:
        yield running


def test_with_an_api_key_the_openai_client_given_the_key_is_served(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, seed=1)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_with_an_api_key_the_openai_client_with_a_wrong_key_gets_authentication_error(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {KEY}x"}],
                         ids=["no header", "wrong key", "not bearer", "empty key", "key with more"])
@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/models"), ("GET", "/v1/nothing")])
def test_with_an_api_key_every_v1_request_without_it_gets_401_in_the_openai_error_shape(
        keyed, method, path, headers):
    response = httpx.request(method, keyed.url + path, headers=headers, timeout=60,
                             json=dict(model=MODEL, prompt=PROMPT, max_tokens=2))
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert "Bearer" in error["message"] and "\n" not in error["message"] and KEY not in error["message"]


def test_with_an_api_key_health_and_metrics_stay_open(keyed):
    assert httpx.get(keyed.url + "/health", timeout=60).json() == {"status": "ok"}
    assert "grok1_slots" in httpx.get(keyed.url + "/metrics", timeout=60).text


def unstarted_app(model, **options) -> TestClient:
    """The app over an engine that never starts: enough for the key checks and GET endpoints."""
    return TestClient(build_app(Engine(model, slots=SLOTS), MODEL, **options))


def test_metrics_need_key_closes_metrics_to_requests_without_the_key(model):
    app = unstarted_app(model, api_key=KEY, metrics_need_key=True)
    assert app.get("/metrics").status_code == 401
    assert app.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert app.get("/health").status_code == 200


ENV_KEY = "sk-from-the-environment"


def test_the_key_comes_from_grok1_api_key_when_none_is_given(model, monkeypatch):
    monkeypatch.setenv("GROK1_API_KEY", ENV_KEY)
    app = unstarted_app(model)
    assert app.get("/v1/models").status_code == 401
    assert app.get("/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}).status_code == 200


def test_a_key_given_as_an_argument_wins_over_grok1_api_key(model, monkeypatch):
    monkeypatch.setenv("GROK1_API_KEY", ENV_KEY)
    app = unstarted_app(model, api_key=KEY)
    assert app.get("/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}).status_code == 401
    assert app.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_an_empty_grok1_api_key_means_no_key(model, monkeypatch):
    monkeypatch.setenv("GROK1_API_KEY", "")
    assert unstarted_app(model).get("/v1/models").status_code == 200


@pytest.mark.parametrize("options", [dict(api_key=""), dict(api_key="two words"), dict(api_key="clé"),
                                     dict(metrics_need_key=True)])
def test_a_key_that_cannot_be_sent_or_metrics_need_key_without_one_is_refused_in_one_line(
        model, monkeypatch, options):
    monkeypatch.delenv("GROK1_API_KEY", raising=False)
    with pytest.raises(ValueError) as refused:
        api_key_from(**options)
    message = str(refused.value)
    assert "\n" not in message and (not options.get("api_key") or options["api_key"] not in message)
    assert ("api_key" if "api_key" in options else "metrics_need_key") in message


# ---- run.py --serve and shutdown --------------------------------------------------------------

def test_run_py_serves_and_sigterm_ends_a_running_stream_and_frees_the_port():
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--serve", "--port", "0", "--quiet"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        url = re.search(r"(http://\S+)/v1", line).group(1)
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "small"
            with c.stream("POST", "/v1/completions", json=dict(
                    model="small", prompt=PROMPT, max_tokens=250, seed=11, stream=True)) as response:
                lines = response.iter_lines()
                next(lines)      # seed 11 samples all 250 tokens: SIGTERM arrives while they decode
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
        process.wait(60)
        assert process.returncode == -signal.SIGTERM
        with socket.socket() as s:       # a new server can listen on the port again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_run_py_with_an_api_key_refuses_requests_without_it_and_serves_the_openai_client_with_it():
    env = {k: v for k, v in os.environ.items() if k != "GROK1_API_KEY"}
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--serve", "--port", "0", "--quiet",
                                "--api-key", "sesame-42"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        url = re.search(r"(http://\S+/v1)", line).group(1)
        refused = httpx.post(url + "/completions", json=dict(model="small", prompt=PROMPT, max_tokens=2))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url, api_key="sesame-42")
        out = client.completions.create(model="small", prompt=PROMPT, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def test_run_py_refuses_metrics_need_key_without_a_key_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "GROK1_API_KEY"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--serve", "--metrics-need-key"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("run.py: error: --metrics-need-key needs --api-key KEY "
                                     "(or GROK1_API_KEY in the environment)")


def test_run_py_refuses_a_port_in_use_in_one_line_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(REPO / "run.py"), "--serve", "--port", str(port)],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"run.py: error: --serve: cannot listen on 127.0.0.1:{port} (Address already in use)"]


# ---- several processes ------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the launched processes in /proc")
def test_two_processes_of_four_devices_serve_what_one_process_generates(model):
    # Process 0 serves; process 1 follows its engine's steps over a 1x8 mesh spanning both.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "grok1.distributed", "--num-processes", "2", "--devices-per-process", "4",
         "--timeout", "170", "--", sys.executable, "run.py", "--serve", "--port", "0", "--mesh", "1x8",
         "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        line = launcher.stdout.readline()
        assert "serving" in line, launcher.stderr.read()[-3000:] if launcher.poll() is not None else line
        url = re.search(r"(http://\S+)/v1", line).group(1)
        cases = [dict(prompt=PROMPT, max_tokens=20, seed=31, temperature=0.8),
                 dict(prompt="Once upon a time", max_tokens=12, seed=32, temperature=1.0),
                 dict(prompt="import numpy", max_tokens=16, seed=33, temperature=0.0)]
        texts = [None] * len(cases)
        with httpx.Client(base_url=url, timeout=120) as c:
            def ask(i):
                response = c.post("/v1/completions", json=dict(model="small", **cases[i]))
                texts[i] = response.json()["choices"][0]["text"]

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            with c.stream("POST", "/v1/completions", json=dict(model="small", stream=True, **cases[0])) as r:
                streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                   if line.startswith("data: {"))
            assert wait_until_idle(c)["grok1_requests_running"] == 0
        for case, text in zip(cases, texts):
            case = dict(case)
            prompt, case["max_new_tokens"] = case.pop("prompt"), case.pop("max_tokens")
            assert text == model.generate([prompt], slots=SLOTS, **case)[0].text
        assert streamed == texts[0]
        os.kill(launched_process(launcher, 1), signal.SIGKILL)   # a failed follower ends the server
        assert launcher.wait(30) != 0
        assert "process 1 was killed by signal 9" in launcher.stderr.read()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
