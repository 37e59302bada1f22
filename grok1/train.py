"""Train the small model shipped in `checkpoints/small/`: corpus, tokenizer, optax, int8 checkpoint.

    python -m grok1.train --overwrite          # rewrites checkpoints/small/ (about 20 min on 2 cores)

Corpus: the English prose bundled with CPython itself (the language reference topics of
`pydoc_data.topics` and the docstrings of the standard library, read with `ast`, never imported),
so it exists offline wherever Python does; licence PSF-2.0. Documents are split into training and
held-out sets by index; a SentencePiece tokenizer is trained on the training set; the model is the
Grok-1 architecture (`grok1.model.transformed`) at a small width, trained with AdamW; its linear
weights are then quantized to int8 like the release and the held-out loss is measured again through
the inference path (`grok1.load(...).logits`) and recorded in `training.json`.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import checkpoint, model
from grok1.config import ModelConfig
from grok1.inference import load
from grok1.params import release_storage
from grok1.weights.quant import quantize

# Training multiplies the experts' rows with the "blocked" grouped product (grok1/kernels/xla.py,
# `blocked_grouped_matmul`): on CPU jax.lax.ragged_dot computes every expert for every row. The
# checkpoint's held-out loss is then re-measured through the unchanged inference path.
TRAINING = model.ComputeOptions(expert_product="blocked")

PAD, BOS, EOS, UNK = 0, 1, 2, 3
HELDOUT_EVERY = 20           # document i is held out when i % 20 == 19
METADATA_FILE = "training.json"
HELDOUT_FILE = "heldout.npy"
TOKENIZER_FILE = "tokenizer.model"


def small_config(vocab_size: int = 4096, emb_size: int = 256, num_layers: int = 4,
                 num_kv_heads: int = 2, key_size: int = 32, widening_factor: float = 2,
                 sequence_len: int = 256) -> ModelConfig:
    """Grok-1 unchanged but narrow: 8 experts top-2, GQA, multipliers scaled to the width."""
    return ModelConfig(
        vocab_size=vocab_size, emb_size=emb_size, num_layers=num_layers,
        num_q_heads=emb_size // key_size, num_kv_heads=num_kv_heads, key_size=key_size,
        widening_factor=widening_factor, num_experts=8, num_selected_experts=2,
        sequence_len=sequence_len, embedding_multiplier_scale=math.sqrt(emb_size),
        output_multiplier_scale=1 / math.sqrt(3), attn_output_multiplier=1 / math.sqrt(key_size),
        pad_token=PAD, eos_token=EOS, bos_token=BOS, add_bos=True)


# ---- corpus -----------------------------------------------------------------------------------

def prose(text: str) -> str:
    """The prose paragraphs of a reST-ish text on one line: code (indented or doctest), tables and
    title underlines are dropped, whitespace collapsed."""
    kept = []
    for paragraph in text.split("\n\n"):
        lines = [line for line in paragraph.split("\n")
                 if line.strip() and any(c.isalnum() for c in line)]
        if not lines or lines[0].startswith((" ", "\t")) or any(">>>" in line for line in lines):
            continue
        words = " ".join(" ".join(lines).split())
        letters = sum(c.isalpha() for c in words)
        if len(words.split()) >= 4 and letters >= 0.6 * len(words.replace(" ", "")):
            kept.append(words)
    return " ".join(kept)


def corpus_documents() -> list[str]:
    """Every document of the corpus in a fixed order: the reference topics (sorted by name), then
    the docstrings of each stdlib module, class and function (files in sorted order)."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc)
    documents = [prose(t) for t in texts]
    return [d for d in documents if len(d) >= 80]


def split_documents(documents: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training, held-out): every HELDOUT_EVERY-th document is held out."""
    train = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


# ---- tokenizer --------------------------------------------------------------------------------

def train_tokenizer(documents: Sequence[str], path: str, vocab_size: int) -> None:
    """A byte-fallback BPE SentencePiece model with Grok-1's special ids (pad 0, bos 1, eos 2,
    unk 3), written to `path`."""
    import sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(documents), model_prefix=prefix, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
            pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
            max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=1,
            minloglevel=2)
        shutil.copyfile(prefix + ".model", path + ".tmp")
    os.replace(path + ".tmp", path)


def token_stream(tokenizer_path: str, documents: Sequence[str]) -> np.ndarray:
    """All documents as one int32 stream, each as [BOS] tokens [EOS]."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    pieces = []
    for ids in sp.encode(list(documents)):
        pieces.append(np.asarray([BOS, *ids, EOS], np.int32))
    return np.concatenate(pieces)


def heldout_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """The first `count` non-overlapping windows of seq_len + 1 tokens (inputs and targets)."""
    n = min(count, len(stream) // (seq_len + 1))
    return stream[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def next_token_loss(logits: np.ndarray, windows: np.ndarray) -> float:
    """Mean cross-entropy (nats) of windows[:, 1:] under logits computed from windows[:, :-1]."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = windows[:, 1:]
    return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())


# ---- training ---------------------------------------------------------------------------------

def init_params(config: ModelConfig, seed: int) -> dict:
    """Haiku's init of the model, with embeddings at std 1/sqrt(d) so that after the
    sqrt(d) input multiplier the residual stream starts at unit scale."""
    fn = model.transformed(config, jnp.float32)
    params = fn.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32))
    params = jax.tree_util.tree_map(lambda x: x, params)
    embed = params["language_model/in_out_embed"]
    embed["embeddings"] = embed["embeddings"] / math.sqrt(config.emb_size)
    return params


def import_optax() -> Any:
    """optax (an optional dependency: the clone's [train] extra), or ImportError saying in one line what to
    install."""
    try:
        import optax
    except ModuleNotFoundError as e:
        if e.name != "optax":  # optax is there but something it needs is not: that error says what
            raise
        raise ImportError("training needs optax, which is not installed: pip install optax "
                          "(or, in the clone, pip install -e '.[train]')") from None
    return optax


def train(config: ModelConfig, stream: np.ndarray, *, steps: int, batch: int, learning_rate: float,
          seed: int, log_every: int = 25) -> dict:
    """AdamW (warmup + cosine decay, clipping) on random windows of the stream; float32 params."""
    optax = import_optax()
    fn = model.transformed(config, jnp.float32, TRAINING)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10), steps,
                                                  learning_rate / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01))
    params = init_params(config, seed)
    opt_state = optimizer.init(params)

    def loss_fn(params, windows):
        logits, _ = fn.apply(params, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    seq = config.sequence_len
    start, losses = time.time(), []
    for i in range(1, steps + 1):
        offsets = rng.integers(0, len(stream) - seq - 1, batch)
        windows = np.stack([stream[o:o + seq + 1] for o in offsets])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(windows))
        losses.append(float(loss))
        if i % log_every == 0 or i == steps:
            elapsed = time.time() - start
            print(f"step {i}/{steps}  loss {np.mean(losses[-log_every:]):.3f}  "
                  f"{i * batch * seq / elapsed:.0f} tokens/s  {elapsed / 60:.1f} min", flush=True)
    return jax.device_get(params)


def release_format(params: dict) -> dict:
    """Linear weights as int8 with bfloat16 per-column scales (one block, like the release),
    the router in float32, embeddings and norm scales in bfloat16."""
    out: dict[str, dict] = {}
    for module, values in params.items():
        for name, value in values.items():
            value = np.asarray(value, np.float32)
            storage = release_storage(module, name, value.shape)
            if storage.quantized:
                stored = quantize(value, 1, scale_dtype=storage.scales_dtype)
            else:
                stored = value.astype(storage.dtype)
            out.setdefault(module, {})[name] = stored
    return out


def heldout_loss_of(params: dict, config: ModelConfig, windows: np.ndarray) -> float:
    """Held-out loss of float training params (same forward as inference)."""
    fn = jax.jit(model.transformed(config, jnp.float32).apply)
    logits, _ = fn(params, jnp.asarray(windows[:, :-1]))
    return next_token_loss(np.asarray(logits), windows)


# ---- command line -----------------------------------------------------------------------------

def out_problem(out: str, overwrite: bool) -> str | None:
    """Why training may not write to `out`, or None: an existing checkpoint (the shipped, tracked
    one by default) is only replaced when asked for."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder"
    existing = [name for name in (checkpoint.CKPT_DIR, checkpoint.CONFIG_FILE)
                if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        return (f"--out {out} already holds a checkpoint ({', '.join(existing)}); pass --overwrite to "
                f"replace it, or choose another --out")
    return None


# What the flags allow. The tokenizer needs its 4 special and 256 byte pieces plus the corpus's
# characters (346 pieces in all on CPython 3.11), and the corpus yields about 35,900 BPE pieces.
MIN_VOCAB, MAX_VOCAB = 512, 32768
# small_config's heads are 32 wide and share each key/value head in pairs (2 kv heads).
EMB_MULTIPLE = 2 * 32
MAX_WIDENING = 64  # experts 64 x d wide at most (Grok-1's factor is 8)
MAX_SEED = 2 ** 32 - 1


def _integer(low: int, high: Optional[int] = None, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer >= low (and <= high), a multiple of `multiple`."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if multiple > 1:
        allowed = f"a multiple of {multiple}, at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high) or value % multiple:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value
    return parse


def _positive_number(high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number in (0, high]."""
    allowed = "a finite number > 0" if high == math.inf else f"a number in (0, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m grok1.train`: every number checked against its range."""
    parser = argparse.ArgumentParser(prog="python -m grok1.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="checkpoints/small", help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint that --out already holds (by default refused)")
    parser.add_argument("--steps", type=_integer(1), default=200, help="optimizer steps (>= 1)")
    parser.add_argument("--batch", type=_integer(1), default=16, help="windows per step (>= 1)")
    parser.add_argument("--learning-rate", type=_positive_number(), default=3e-3,
                        help="peak AdamW learning rate (> 0)")
    parser.add_argument("--vocab-size", type=_integer(MIN_VOCAB, MAX_VOCAB), default=4096,
                        help=f"SentencePiece vocabulary size ({MIN_VOCAB} to {MAX_VOCAB})")
    parser.add_argument("--emb-size", type=_integer(EMB_MULTIPLE, multiple=EMB_MULTIPLE), default=256,
                        help=f"model width d (a multiple of {EMB_MULTIPLE}: heads of 32 in pairs)")
    parser.add_argument("--num-layers", type=_integer(1), default=4, help="decoder layers (>= 1)")
    parser.add_argument("--widening-factor", type=_positive_number(MAX_WIDENING), default=2,
                        help=f"expert ffn width factor (> 0, at most {MAX_WIDENING})")
    parser.add_argument("--seq-len", type=_integer(1), default=256, help="training window length (>= 1)")
    parser.add_argument("--heldout-windows", type=_integer(1), default=16,
                        help="held-out windows to evaluate (>= 1)")
    parser.add_argument("--seed", type=_integer(0, MAX_SEED), default=0,
                        help=f"seed of init and batch order (0 to {MAX_SEED})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = small_config(vocab_size=args.vocab_size, emb_size=args.emb_size, num_layers=args.num_layers,
                          widening_factor=args.widening_factor, sequence_len=args.seq_len)
    if config.ffn_size == 0:
        parser.error(f"--widening-factor {args.widening_factor} with --emb-size {args.emb_size} gives "
                     f"experts no hidden units: widening factor x emb size must be at least 2")
    problem = out_problem(args.out, args.overwrite)
    if problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        import_optax()
    except ImportError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1

    t0 = time.time()
    documents = corpus_documents()
    train_docs, heldout_docs = split_documents(documents)
    print(f"corpus: {len(documents)} documents, {sum(map(len, documents)) / 1e6:.2f} M characters "
          f"({len(heldout_docs)} held out)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    tokenizer_path = os.path.join(args.out, TOKENIZER_FILE)
    try:
        train_tokenizer(train_docs, tokenizer_path, args.vocab_size)
    except RuntimeError as e:  # SentencePiece: "... Vocabulary size too high (N). Please set ..."
        if "Vocabulary size" not in str(e):
            raise
        print(f"{parser.prog}: error: --vocab-size {args.vocab_size}: {str(e).rsplit('] ', 1)[-1]}",
              file=sys.stderr)
        return 2
    train_stream = token_stream(tokenizer_path, train_docs)
    windows = heldout_windows(token_stream(tokenizer_path, heldout_docs), args.seq_len,
                              args.heldout_windows)
    print(f"tokens: {len(train_stream)} training, {windows.size} held out; "
          f"{config.param_count / 1e6:.1f} M parameters", flush=True)

    t_train = time.time()
    params = train(config, train_stream, steps=args.steps, batch=args.batch,
                   learning_rate=args.learning_rate, seed=args.seed)
    train_minutes = (time.time() - t_train) / 60
    float_loss = heldout_loss_of(params, config, windows)

    checkpoint.save(release_format(params), args.out, config)
    np.save(os.path.join(args.out, HELDOUT_FILE + ".tmp.npy"), windows)
    os.replace(os.path.join(args.out, HELDOUT_FILE + ".tmp.npy"), os.path.join(args.out, HELDOUT_FILE))

    shipped = load(args.out, dtype="float32")
    int8_loss = next_token_loss(shipped.logits(windows[:, :-1]), windows)
    metadata = {
        "heldout_loss": int8_loss,
        "heldout_loss_float32_params": float_loss,
        "heldout": f"{HELDOUT_FILE}: the first {len(windows)} windows of {args.seq_len + 1} tokens of "
                   f"the held-out documents; loss = mean next-token cross-entropy in nats through "
                   f"grok1.load(...).logits (float32 compute, int8 weights)",
        "corpus": "English prose bundled with CPython: pydoc_data.topics and standard-library "
                  "docstrings (code, doctests and tables dropped)",
        "corpus_licence": "PSF-2.0 (Python Software Foundation License)",
        "python": platform.python_version(),
        "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "tokens": {"train": int(len(train_stream)), "seen": args.steps * args.batch * args.seq_len},
        "command": " ".join(["python -m grok1.train", *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "training_minutes": round(train_minutes, 1),
        "total_minutes": round((time.time() - t0) / 60, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}",
    }
    text = json.dumps(metadata, indent=1) + "\n"
    with open(os.path.join(args.out, METADATA_FILE + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(args.out, METADATA_FILE + ".tmp"), os.path.join(args.out, METADATA_FILE))
    print(f"held-out loss {int8_loss:.4f} (int8 checkpoint via grok1.load), {float_loss:.4f} "
          f"(float32 params); wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
