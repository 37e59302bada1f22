"""grok1.train: corpus preparation, the training-time expert matmul, and the release format."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok1.train as train_module
from grok1 import model
from grok1.kernels import xla
from grok1.kernels.xla import blocked_grouped_matmul
from grok1.train import (build_parser, heldout_windows, main, next_token_loss, out_problem, prose,
                         release_format, small_config, split_documents, train)
from grok1.weights.quant import QuantizedWeight8bit


def test_blocked_grouped_matmul_equals_the_models_ragged_dot():
    rng = np.random.default_rng(0)
    sizes = np.array([5, 0, 130, 1, 0, 40, 77, 3], np.int32)      # empty and multi-block groups
    rows = int(sizes.sum())
    xs = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 16, 24)), jnp.float32)
    row_expert = jnp.asarray(np.repeat(np.arange(8), sizes), jnp.int32)
    expected = xla.grouped_matmul(xs, w, jnp.asarray(sizes), row_expert, jnp.float32)
    got = blocked_grouped_matmul(xs, w, jnp.asarray(sizes), row_expert, jnp.float32, block=32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_prose_keeps_sentences_and_drops_titles_code_and_doctests():
    text = ("The \"if\" statement\n******************\n\n"
            "It selects exactly one of the suites\nby evaluating the expressions.\n\n"
            "   if_stmt ::= \"if\" expression\n\n"
            ">>> print(1)\n1\n")
    assert prose(text) == "It selects exactly one of the suites by evaluating the expressions."


def test_every_twentieth_document_is_held_out():
    documents = [f"doc {i}" for i in range(40)]
    train_docs, heldout = split_documents(documents)
    assert heldout == ["doc 19", "doc 39"]
    assert len(train_docs) == 38 and not set(heldout) & set(train_docs)


def test_heldout_windows_are_consecutive_and_do_not_overlap():
    windows = heldout_windows(np.arange(100, dtype=np.int32), seq_len=9, count=50)
    assert windows.shape == (10, 10)
    assert windows[1, 0] == windows[0, -1] + 1


def test_next_token_loss_of_uniform_logits_is_log_vocab():
    windows = np.array([[1, 2, 3, 4]])
    assert next_token_loss(np.zeros((1, 3, 16)), windows) == pytest.approx(np.log(16))


def test_release_format_makes_linear_weights_int8_and_keeps_the_router_float32():
    config = small_config(vocab_size=64, emb_size=32, num_layers=1, key_size=8, sequence_len=16)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                    model.param_shapes(config))
    stored = release_format(params)
    layer = "transformer/decoder_layer_0"
    assert isinstance(stored[f"{layer}/multi_head_attention/query"]["w"], QuantizedWeight8bit)
    assert isinstance(stored[f"{layer}/moe/linear_v"]["w"], QuantizedWeight8bit)
    assert stored[f"{layer}/router"]["w"].dtype == np.float32
    assert stored["language_model/in_out_embed"]["embeddings"].dtype.name == "bfloat16"


def test_training_lowers_the_loss_on_a_repeating_text():
    config = small_config(vocab_size=64, emb_size=32, num_layers=1, key_size=8, sequence_len=16)
    stream = np.tile(np.arange(4, 20, dtype=np.int32), 64)
    windows = heldout_windows(stream, 16, 4)
    fn = jax.jit(model.transformed(config).apply)
    from grok1.train import init_params
    before = next_token_loss(np.asarray(fn(init_params(config, 0), windows[:, :-1])[0]), windows)
    params = train(config, stream, steps=30, batch=4, learning_rate=1e-2, seed=0, log_every=1000)
    after = next_token_loss(np.asarray(fn(params, windows[:, :-1])[0]), windows)
    assert after < 0.5 * before


REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_default_run_refuses_to_overwrite_the_shipped_checkpoint(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    before = (REPO / "checkpoints" / "small" / "config.json").stat().st_mtime_ns
    assert main([]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoints/small already holds a checkpoint" in error[0]
    assert "--overwrite" in error[0]
    assert (REPO / "checkpoints" / "small" / "config.json").stat().st_mtime_ns == before


def test_overwrite_allows_an_existing_checkpoint_and_a_new_folder_needs_no_flag(tmp_path):
    assert out_problem(str(REPO / "checkpoints" / "small"), overwrite=True) is None
    assert out_problem(str(tmp_path / "new"), overwrite=False) is None


def test_an_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    assert "is a file" in out_problem(str(tmp_path / "f"), overwrite=True)


# ---- the command line: arguments and optax checked before any work ----------------------------

@pytest.fixture
def no_corpus(monkeypatch):
    """Fails the test if main gets as far as preparing the corpus (5 s)."""
    monkeypatch.setattr(train_module, "corpus_documents", lambda: pytest.fail("the corpus was prepared"))


OUT_OF_RANGE = [  # flag, value, what the flag allows
    ("--steps", "0", "an integer >= 1"),
    ("--steps", "-1", "an integer >= 1"),
    ("--steps", "ten", "an integer >= 1"),
    ("--batch", "0", "an integer >= 1"),
    ("--learning-rate", "0", "a finite number > 0"),
    ("--learning-rate", "nan", "a finite number > 0"),
    ("--vocab-size", "300", "an integer in [512, 32768]"),
    ("--vocab-size", "40000", "an integer in [512, 32768]"),
    ("--emb-size", "100", "a multiple of 64, at least 64"),
    ("--emb-size", "0", "a multiple of 64, at least 64"),
    ("--num-layers", "0", "an integer >= 1"),
    ("--widening-factor", "-2", "a number in (0, 64]"),
    ("--widening-factor", "100", "a number in (0, 64]"),
    ("--seq-len", "0", "an integer >= 1"),
    ("--heldout-windows", "0", "an integer >= 1"),
    ("--seed", "-1", "an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize("flag,value,allowed", OUT_OF_RANGE)
def test_a_number_out_of_its_range_is_refused_naming_the_flag_before_any_work(tmp_path, capsys, no_corpus,
                                                                              flag, value, allowed):
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path / "out"), flag, value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"python -m grok1.train: error: argument {flag}: expected {allowed}, got {value!r}"
    assert not (tmp_path / "out").exists()


def test_every_numeric_flag_has_its_range_tested():
    numeric = {action.option_strings[0] for action in build_parser()._actions
               if isinstance(action.default, (int, float)) and not isinstance(action.default, bool)}
    assert numeric == {flag for flag, _, _ in OUT_OF_RANGE}


def test_experts_without_hidden_units_are_refused_naming_both_flags(tmp_path, capsys, no_corpus):
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path / "out"), "--emb-size", "64", "--widening-factor", "0.01"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--widening-factor 0.01 with --emb-size 64 gives experts no hidden units" in error
    assert "at least 2" in error


def test_without_optax_the_command_says_in_one_line_what_to_install(tmp_path, capsys, monkeypatch, no_corpus):
    monkeypatch.setitem(sys.modules, "optax", None)  # `import optax` fails as when it is not installed
    assert main(["--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m grok1.train: error: training needs optax, which is not installed: pip install optax "
        "(or, in the clone, pip install -e '.[train]')"]
    assert not (tmp_path / "out").exists()


def test_without_optax_train_raises_an_import_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)
    config = small_config(vocab_size=64, emb_size=32, num_layers=1, key_size=8, sequence_len=16)
    with pytest.raises(ImportError, match=r"training needs optax, which is not installed: pip install optax"):
        train(config, np.arange(64, dtype=np.int32), steps=1, batch=1, learning_rate=1e-2, seed=0)


def test_a_vocabulary_the_corpus_cannot_fill_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "corpus_documents", lambda: ["A short document, said many times."] * 40)
    assert main(["--out", str(tmp_path / "out"), "--vocab-size", "512"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("python -m grok1.train: error: --vocab-size 512: "
                               "Vocabulary size too high (512)")
