"""Tokenizers: the fixed byte-level one (UTF-8 bytes + EOS, :data:`jscale.config.BYTE_VOCAB_SIZE`
ids) and byte-level BPE (a Hugging Face ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as EOS), and
:func:`encode_documents`: documents -> one int32 token stream, EOS after each. The data pipeline that
reads corpora and caches trained tokenizers is :mod:`jscale.data`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jscale import files
from jscale.config import BYTE_VOCAB_SIZE, ConfigError

BYTE_EOS_ID = 256
EOS_TOKEN = "<|endoftext|>"


class DataError(ConfigError):
    """Data that cannot be used as configured; the message names the config field to fix."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus :data:`BYTE_EOS_ID` (256) ending each document."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as an int32 array (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` for each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Bytes back to text (bad UTF-8 becomes U+FFFD); EOS and out-of-range ids are dropped."""
        ids = np.asarray(ids)
        ids = ids[(ids >= 0) & (ids < 256)]
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (a HF ``tokenizers.Tokenizer``) with ``<|endoftext|>`` as its EOS token.

    Text that literally contains ``<|endoftext|>`` is encoded as text, never as EOS, so EOS ids in a
    stream mark exactly the document boundaries.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"data.tokenizer: the BPE tokenizer has no {EOS_TOKEN!r} token")
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of ``vocab_size`` tokens (EOS, 256 bytes, merges) on ``texts``."""
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer saved by :meth:`save` (any HF tokenizer JSON with ``<|endoftext|>``)."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as HF JSON, atomically."""
        files.atomic_write(pathlib.Path(path), lambda f: f.write(self.tokenizer.to_str().encode()))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (no EOS appended)."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` for each text, in parallel (HF ``encode_batch``)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        """Ids back to text; EOS is dropped."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])


Tokenizer = ByteTokenizer | BPETokenizer


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """One int32 stream: each document's tokens followed by EOS."""
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [d.encode("utf-8") for d in docs]
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        lengths = [len(e) for e in encoded]
    else:
        parts = tokenizer.encode_batch(docs)
        flat = np.concatenate(parts + [np.zeros(0, np.int32)])
        lengths = [len(p) for p in parts]
    ends = np.cumsum(lengths, dtype=np.int64)
    return np.insert(flat, ends, tokenizer.eos_id).astype(np.int32)


def check_byte_vocab(vocab_size: int) -> None:
    if vocab_size != BYTE_VOCAB_SIZE:
        raise DataError(f"model.vocab_size: must be {BYTE_VOCAB_SIZE} (256 bytes + EOS) with "
                        f"data.tokenizer='byte' (got {vocab_size})")
