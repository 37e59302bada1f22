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
        return self.sp.decode(list(ids))

    def id_to_piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)
