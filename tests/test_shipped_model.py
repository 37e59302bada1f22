"""The small model shipped in checkpoints/small: what was trained is what inference computes."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess

import numpy as np
import pytest

import grok1
from grok1.checkpoint import iter_tensors
from grok1.train import next_token_loss

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = REPO / "checkpoints" / "small"


@pytest.fixture(scope="module")
def record() -> dict:
    with open(SMALL / "training.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    return grok1.load(SMALL, dtype="float32", progress=False)


def test_heldout_loss_through_model_logits_equals_the_training_record(model, record):
    windows = np.load(SMALL / "heldout.npy")
    loss = next_token_loss(model.logits(windows[:, :-1]), windows)
    assert loss == pytest.approx(record["heldout_loss"], rel=0.01)


def test_heldout_loss_is_far_below_a_uniform_guess(model, record):
    assert record["heldout_loss"] < 0.6 * math.log(model.config.vocab_size)


def test_architecture_is_grok1_scaled_to_its_width(model):
    c = model.config
    assert (c.num_experts, c.num_selected_experts) == (8, 2)
    assert c.num_kv_heads < c.num_q_heads and c.num_q_heads * c.key_size == c.emb_size
    assert c.embedding_multiplier_scale == pytest.approx(math.sqrt(c.emb_size))
    assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(c.key_size))
    assert c.output_multiplier_scale == pytest.approx(1 / math.sqrt(3))


def test_linear_weights_are_int8_like_the_release_and_the_router_float32(model):
    for spec, value in iter_tensors(str(SMALL / "ckpt-0"), model.config):
        if spec.quantized:
            assert isinstance(value, grok1.QuantizedWeight8bit), spec.name
            assert value.weight.dtype == np.int8
        elif spec.module.endswith("/router"):
            assert value.dtype == np.float32, spec.name


def test_shipped_folder_is_at_most_50_mb():
    size = sum(p.stat().st_size for p in SMALL.rglob("*") if p.is_file())
    assert size <= 50 * 2 ** 20


def test_tokenizer_has_grok1_special_ids_and_byte_fallback(model):
    sp = model.tokenizer.sp
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    text = "naïve café → ok"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    assert sp.vocab_size() == model.config.vocab_size


def git_ignored(path: str) -> bool:
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    if result.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    return result.returncode == 0


def test_git_keeps_the_shipped_model_and_ignores_downloaded_weights():
    assert not git_ignored("checkpoints/small/ckpt-0/tensor00000_000")
    assert not git_ignored("checkpoints/small/tokenizer.model")
    assert not git_ignored("checkpoints/README.md")
    assert git_ignored("checkpoints/grok-1/ckpt-0/tensor00000_000")


def test_small_model_predicts_heldout_documents_better_with_bos_as_its_config_says(model):
    """The small model saw [BOS] at every document start, so its config adds it to text prompts."""
    import sentencepiece
    from grok1.train import BOS, corpus_documents, split_documents

    assert model.config.add_bos and model.config.bos_token == BOS
    _, heldout = split_documents(corpus_documents())
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(SMALL / "tokenizer.model"))
    docs = np.array([ids[:65] for ids in tokenizer.encode(heldout) if len(ids) >= 65][:32], np.int32)

    def loss(with_bos: bool, targets: int) -> float:   # the same targets docs[:, 1:] either way
        inputs = np.concatenate([np.full((len(docs), 1), BOS), docs[:, :-1]], 1) if with_bos else docs[:, :-1]
        logits = model.logits(inputs)[:, 1:] if with_bos else model.logits(inputs)
        return next_token_loss(logits[:, :targets], docs[:, :targets + 1])

    # BOS helps most at the start of a document, and does not hurt later.
    assert loss(with_bos=True, targets=8) < loss(with_bos=False, targets=8) - 0.1
    assert loss(with_bos=True, targets=64) < loss(with_bos=False, targets=64)
