"""Model.score: the log-probability of each prompt token given the ones before it equals
log_softmax(Model.logits) at that token, for ragged batches, on one device, on a 1x8 mesh and
across two processes; the top alternatives are the likeliest tokens; bad prompts are refused."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest

import grok1
from conftest import run_with_devices
from test_distributed import launch

TOLERANCE = 1e-4


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def reference(model, prompt: list[int]) -> np.ndarray:
    """log_softmax of the model's logits [T, V] for one unpadded prompt."""
    return log_softmax(model.logits(np.asarray([prompt]))[0])


def ragged(prompts: list[list[int]]) -> list[list[int]]:
    """Prompts of many lengths (one of a single token, which scores nothing)."""
    return [prompts[0], prompts[1][:5], prompts[2], prompts[1], prompts[0][:1], prompts[0] + prompts[1]]


@pytest.fixture(scope="module")
def two_layer_model():
    from conftest import Golden
    golden = Golden("two_layer")
    return grok1.load(golden.path, dtype="float32"), golden.prompts


def test_score_equals_log_softmax_of_logits_for_a_ragged_batch(two_layer_model):
    model, prompts = two_layer_model
    batch = ragged(prompts)
    scores = model.score(batch)
    assert len(scores) == len(batch)
    for prompt, score in zip(batch, scores):
        assert score.token_ids.tolist() == prompt
        assert score.logprobs.dtype == np.float32 and score.logprobs.shape == (len(prompt) - 1,)
        expected = reference(model, prompt)[np.arange(len(prompt) - 1), prompt[1:]]
        assert np.abs(score.logprobs - expected).max(initial=0) <= TOLERANCE


def test_top_alternatives_are_the_likeliest_tokens_with_their_logprobs(two_layer_model):
    model, prompts = two_layer_model
    [score] = model.score([prompts[0]], top_n=3)
    expected = reference(model, prompts[0])[:-1]
    assert score.top_ids.shape == score.top_logprobs.shape == (len(prompts[0]) - 1, 3)
    assert (score.top_ids[:, 0] == expected.argmax(-1)).all()
    chosen = np.take_along_axis(expected, score.top_ids, axis=-1)
    assert np.abs(score.top_logprobs - chosen).max() <= TOLERANCE
    assert (np.diff(score.top_logprobs, axis=-1) <= 0).all()


def test_scores_do_not_depend_on_the_batch_they_run_in(two_layer_model):
    model, prompts = two_layer_model
    alone = model.score([prompts[1]])[0].logprobs
    together = model.score([prompts[0], prompts[1], prompts[2]])[1].logprobs
    assert np.abs(alone - together).max() <= TOLERANCE


def test_a_prompt_filling_the_whole_context_is_scored(two_layer_model):
    model, prompts = two_layer_model
    prompt = (prompts[0] * 64)[:model.config.sequence_len]
    [score] = model.score([prompt])
    expected = reference(model, prompt)[np.arange(len(prompt) - 1), prompt[1:]]
    assert np.abs(score.logprobs - expected).max() <= TOLERANCE


@pytest.mark.parametrize("prompts, top_n, message", [
    ([[]], 0, "at least one token"),
    ([[1, 2, 99999]], 0, "token ids must lie in [0, 512)"),
    ([[1] * 65], 0, "does not fit the model's context of 64"),
    ([[1, 2]], -1, "top_n must be an integer in [0, 512]"),
    ([], 0, "at least one prompt"),
    ([1, 2, 3], 0, "each prompt must be a string or a list of token ids"),
    ("text", 0, "wrap a single prompt as [prompt]"),
])
def test_bad_prompts_are_refused_naming_what_is_allowed(two_layer_model, prompts, top_n, message):
    model, _ = two_layer_model
    with pytest.raises(ValueError, match=re.escape(message)):
        model.score(prompts, top_n=top_n)


def test_scoring_beside_generation_leaves_the_generated_tokens_unchanged(two_layer_model):
    model, prompts = two_layer_model
    import threading
    alone = model.generate([prompts[0]], max_new_tokens=8, temperature=0)[0].token_ids
    scored = []
    thread = threading.Thread(target=lambda: scored.extend(model.score(ragged(prompts) * 3)))
    thread.start()
    beside = model.generate([prompts[0]], max_new_tokens=8, temperature=0)[0].token_ids
    thread.join()
    assert beside == alone and len(scored) == 18


# ---- on a mesh and on a cluster ---------------------------------------------------------------

SCORE_WORKER = """
import json, sys
{init}
import jax, grok1
from grok1.mesh import make_mesh
path = sys.argv[1]
model = grok1.load(path, mesh=make_mesh("1x8"), dtype="float32")
prompts = json.load(open(path + "/golden.json"))["prompts"]
batch = [prompts[0], prompts[1][:5], prompts[2], prompts[1], prompts[0][:1], prompts[0] + prompts[1]]
scores = model.score(batch, top_n=2)
result = {{"process": jax.process_index(), "logprobs": [s.logprobs.tolist() for s in scores],
          "top_ids": [s.top_ids.tolist() for s in scores]}}
sys.stdout.write("RESULT " + json.dumps(result) + "\\n")
sys.stdout.flush()
"""


def check_against_one_device(model, prompts: list[list[int]], result: dict) -> None:
    for prompt, logprobs, top_ids in zip(ragged(prompts), result["logprobs"], result["top_ids"]):
        expected = reference(model, prompt)[:-1]
        assert np.abs(np.asarray(logprobs) - expected[np.arange(len(prompt) - 1), prompt[1:]]
                      ).max(initial=0) <= TOLERANCE
        assert [row[0] for row in top_ids] == expected.argmax(-1).tolist()


def test_score_on_a_1x8_mesh_equals_one_device(two_layer_model):
    from conftest import Golden
    model, prompts = two_layer_model
    worker = SCORE_WORKER.format(init="")
    out = run_with_devices(worker.replace("path = sys.argv[1]", f"path = {str(Golden('two_layer').path)!r}"))
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    check_against_one_device(model, prompts, json.loads(line.split(" ", 1)[1]))


def test_score_on_two_processes_equals_one_device(two_layer_model):
    from conftest import Golden
    model, prompts = two_layer_model
    worker = SCORE_WORKER.format(init="from grok1 import distributed\ndistributed.initialize()")
    proc = launch("--num-processes", "2", "--devices-per-process", "4", "--timeout", "240", "--",
                  sys.executable, "-c", worker, str(Golden("two_layer").path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(r["process"] for r in results) == [0, 1]
    for result in results:
        check_against_one_device(model, prompts, result)


def test_waiting_scoring_requests_run_together_in_one_call(two_layer_model):
    from grok1.generation.engine import Engine
    model, prompts = two_layer_model
    engine = Engine(model, slots=1)
    calls = []
    score = engine.runner.score
    engine.runner.score = lambda params, tokens, top_n: (calls.append(tokens.shape)
                                                         or score(params, tokens, top_n))
    try:
        results = []
        engine.submit_scores([(p, 0, results.append) for p in ragged(prompts)[:4]])
        with engine:
            while len(results) < 4:
                time.sleep(0.01)
    finally:
        del engine.runner.score
    assert calls == [(4, 32)]            # four prompts, one call: rows a power of two, a 32-token bucket
    assert [len(r.logprobs) for r in results] == [len(p) - 1 for p in ragged(prompts)[:4]]


def test_the_scoring_step_never_holds_the_full_logits():
    """Its compiled temporaries stay well below the [B, T, V] float32 logits a naive log-softmax
    would hold (here 128 MiB for 1024 positions of a 32768-token vocabulary)."""
    import functools
    import jax
    import jax.numpy as jnp
    from grok1.config import PRESETS
    from grok1.generation.steps import score_rows
    from grok1.model import transformed
    config = PRESETS["bench-1b"].replace(vocab_size=32768, emb_size=64, num_layers=1, num_q_heads=2,
                                         num_kv_heads=1, key_size=32, widening_factor=1, sequence_len=1024)
    model = transformed(config, jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    compiled = jax.jit(functools.partial(score_rows, model.apply, 5)).lower(params, tokens).compile()
    full_logits = 1024 * config.vocab_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits / 2
