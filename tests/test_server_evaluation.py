"""The server as lm-evaluation-harness's `local-completions` backend uses it (its requests, sent
here with plain HTTP): the remote tokenizer it detects (/tokenizer_info, /tokenize, /detokenize),
log-likelihoods by echo with top alternatives, rolling windows, generate_until; and the 400s of
malformed scoring requests."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import grok1
from grok1.server import BackgroundServer

from conftest import REPO

MODEL = "small"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    return grok1.load(REPO / "checkpoints" / "small")


@pytest.fixture(scope="module")
def http(model):
    with BackgroundServer(model, slots=2, model_name=MODEL) as server, \
            httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def encode(http: httpx.Client, text: str) -> list[int]:
    """lm-eval's RemoteTokenizer.encode."""
    response = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert response.status_code == 200
    return response.json()["tokens"]


def loglikelihood_payload(inputs: list[list[int]]) -> dict:
    """What lm-eval's local-completions sends for loglikelihood requests."""
    return {"model": MODEL, "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}


def parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's parse: the listed tokens after the context, but the last (the generated one)."""
    result = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        result.append((sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))))
    return result


# ---- the remote tokenizer ---------------------------------------------------------------------

def test_tokenizer_info_names_the_special_tokens_and_the_context(http, model):
    info = http.get("/tokenizer_info").json()
    pieces = model.tokenizer.id_to_piece
    assert info["eos_token"] == pieces(model.config.eos_token)
    assert info["bos_token"] == pieces(model.config.bos_token)
    assert info["pad_token"] == pieces(model.config.pad_token)
    assert info["model_max_length"] == model.config.sequence_len


def test_tokenize_as_lm_eval_probes_it_returns_the_tokens_count_and_context(http, model):
    out = http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert out == {"tokens": model.tokenizer.encode("test"), "count": len(model.tokenizer.encode("test")),
                   "max_model_len": model.config.sequence_len}


def test_special_token_strings_tokenize_to_their_ids(http, model):
    """lm-eval takes eos_token_id = encode(eos_token)[0] and bos_token_id likewise."""
    info = http.get("/tokenizer_info").json()
    assert encode(http, info["eos_token"]) == [model.config.eos_token]
    expected = [*model.tokenizer.encode("a"), model.config.bos_token, *model.tokenizer.encode("b")]
    assert encode(http, "a" + info["bos_token"] + "b") == expected


def test_tokenize_adds_bos_by_default_and_detokenize_inverts_it(http, model):
    ids = http.post("/tokenize", json={"prompt": "The function returns"}).json()["tokens"]
    assert ids == [model.config.bos_token, *model.tokenizer.encode("The function returns")]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "The function returns"}


# ---- lm-eval's requests -----------------------------------------------------------------------

def test_loglikelihoods_of_a_batch_equal_model_score(http, model):
    pairs = [("The function returns", " the value"), ("Return a copy of", " the list."),
             ("Raise", " an exception if the file is missing")]
    inputs, ctxlens = [], []
    for context, continuation in pairs:
        whole, context_ids = encode(http, context + continuation), encode(http, context)
        inputs.append(whole)
        ctxlens.append(len(context_ids))
    response = http.post("/v1/completions", json=loglikelihood_payload(inputs))
    assert response.status_code == 200
    results = parse_logprobs(response.json(), ctxlens)
    for (loglikelihood, greedy), ids, ctxlen in zip(results, inputs, ctxlens):
        [score] = model.score([ids], top_n=1)
        expected = score.logprobs[ctxlen - 1:]
        assert abs(loglikelihood - float(expected.sum())) <= TOLERANCE * len(expected)
        assert greedy == bool((score.top_ids[ctxlen - 1:, 0] == np.asarray(ids[ctxlen:])).all())


def test_a_rolling_window_scores_every_token_after_the_prefix(http, model):
    info = http.get("/tokenizer_info").json()
    prefix = encode(http, info["bos_token"])[0]           # lm-eval's prefix_token_id
    document = encode(http, "Return the number of items in the container.")
    [(loglikelihood, _)] = parse_logprobs(
        http.post("/v1/completions", json=loglikelihood_payload([[prefix, *document]])).json(), [1])
    [score] = model.score([[prefix, *document]])
    assert abs(loglikelihood - score.total) <= TOLERANCE * len(document)


def test_generate_until_as_lm_eval_sends_it_gives_the_greedy_completion(http, model):
    ids = encode(http, "The function returns")
    out = http.post("/v1/completions", json={"model": MODEL, "prompt": [ids], "max_tokens": 8, "temperature": 0,
                                             "stop": ["\n\n", "[EOS]"], "seed": 1234}).json()
    expected = model.generate([ids], max_new_tokens=8, temperature=0, stop=["\n\n", "[EOS]"])[0].text
    assert out["choices"][0]["text"] == expected


# ---- echo and top alternatives ----------------------------------------------------------------

def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(http, model):
    out = http.post("/v1/completions", json={"model": MODEL, "prompt": "Return a copy of the list.",
                                             "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    [choice] = out["choices"]
    logprobs = choice["logprobs"]
    [score] = model.score(["Return a copy of the list."], top_n=3)
    assert choice["text"] == "Return a copy of the list."
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert np.abs(np.asarray(logprobs["token_logprobs"][1:]) - score.logprobs).max() <= TOLERANCE
    assert all(len(top) == 3 for top in logprobs["top_logprobs"][1:])
    assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == len(score.token_ids)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert out["usage"] == {"prompt_tokens": len(score.token_ids), "completion_tokens": 0,
                            "total_tokens": len(score.token_ids)}


def test_logprobs_without_echo_list_top_alternatives_of_the_generated_tokens(http):
    out = http.post("/v1/completions", json={"model": MODEL, "prompt": "The function returns",
                                             "max_tokens": 4, "logprobs": 2, "temperature": 0}).json()
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["top_logprobs"]) == out["usage"]["completion_tokens"]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 2 and top[token] == pytest.approx(logprob, abs=TOLERANCE)   # greedy: the likeliest


def test_chat_logprobs_list_top_alternatives(http):
    out = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3,
        "logprobs": True, "top_logprobs": 4, "temperature": 0}).json()
    content = out["choices"][0]["logprobs"]["content"]
    assert content and all(len(entry["top_logprobs"]) == 4 for entry in content)
    assert all(entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=TOLERANCE)
               for entry in content)


@pytest.mark.parametrize("fields, param, message", [
    ({"logprobs": 6, "echo": True, "max_tokens": 0}, "logprobs", "integer in [0, 5]"),
    ({"echo": True, "n": 2}, "n", "echo takes n = 1"),
    ({"prompt": [[1, 99999]], "echo": True, "max_tokens": 0}, "prompt", "token ids must lie in [0, 4096)"),
    ({"prompt": [[5] * 257], "echo": True, "max_tokens": 0}, "prompt",
     "does not fit the model's context of 256"),
    ({"max_tokens": 0}, "max_tokens", "give echo: true"),
    ({"echo": True, "stream": True}, "stream", "not streamed"),
])
def test_malformed_scoring_requests_get_openai_shaped_400s(http, fields, param, message):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body, message", [
    ("/tokenize", {"prompt": 5}, "prompt must be a string"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens must be true or false"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens must be a list of token ids in [0, 4096)"),
    ("/tokenize", {"prompt": "a", "extra": 1}, "unknown field"),
])
def test_malformed_tokenizer_requests_get_400s(http, path, body, message):
    response = http.post(path, json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_chat_top_logprobs_above_20_are_refused(http):
    response = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
        "top_logprobs": 21})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


# A third served cluster (20-28 s) in the default suite took it past 15 minutes on 2 cores; two
# processes scoring alike is also tests/test_scoring.py's, this is the server's schedule path.
@pytest.mark.slow
def test_a_served_cluster_of_two_processes_scores_like_one_process(model):
    """Process 0 publishes the scoring batch in its engine's schedule; process 1 runs it too."""
    from test_distributed import serving_cluster
    launcher, url = serving_cluster()
    try:
        ids = model.tokenizer.encode("Return a copy of the list.")
        out = httpx.post(url + "/completions", timeout=300, json={
            "model": MODEL, "prompt": [ids, ids[:4]], "max_tokens": 0, "echo": True, "logprobs": 1}).json()
        for choice, prompt in zip(out["choices"], [ids, ids[:4]]):
            expected = model.score([prompt])[0].logprobs
            assert np.abs(np.asarray(choice["logprobs"]["token_logprobs"][1:]) - expected).max() <= TOLERANCE
    finally:
        launcher.kill()
        launcher.wait()
