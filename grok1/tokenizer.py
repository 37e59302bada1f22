"""SentencePiece tokenizer of a checkpoint (`tokenizer.model`)."""

from __future__ import annotations

import os
from typing import Optional, Sequence


class Tokenizer:
    """Text <-> token ids through a SentencePiece model, checked against the model's vocab."""

    def __init__(self, path: str | os.PathLike, vocab_size: Optional[int] = None):
        import sentencepiece

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        if vocab_size is not None and self.sp.vocab_size() > vocab_size:
            raise ValueError(f"tokenizer {path} has {self.sp.vocab_size()} pieces but the model's "
                             f"vocab_size is {vocab_size}: they do not belong together")

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; ids past the tokenizer's pieces (a model vocab may be padded
        beyond them) decode to nothing."""
        size = self.sp.vocab_size()
        return self.sp.decode([int(i) for i in ids if 0 <= i < size])

    def id_to_piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)


REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt kept as decoding context, so the first generated piece keeps its leading
# space ("▁Paris" after "is" -> " Paris") instead of having it stripped as a text start.
CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Text deltas of a growing token sequence that never end inside a character.

    A character may span several tokens (SentencePiece byte-fallback pieces such as <0xE4>);
    until its last byte arrives, decoding ends in U+FFFD, so that tail is held back. Each push
    re-decodes only a short window of recent tokens; both texts compared in a window are decoded
    from the same first token, so SentencePiece's stripping of a leading space cancels out.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)[-CONTEXT_TOKENS:]
        self.prefix_offset = 0                 # window start
        self.read_offset = len(self.ids)       # text of ids[:read_offset] has been returned

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete ("" while a character is incomplete)."""
        self.ids.extend(int(i) for i in ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """The text still held back (ending in U+FFFD if the tokens end inside a character)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
