"""Data: corpus -> documents -> token streams -> packed windows -> grain batches (the tokenizers:
:mod:`jscale.tokenize`).

Flow::

    data.path ──read──> documents [str]      bundled SOTU (None), .txt, directory of .txt, .jsonl
       └─ .npy ───────> token stream         pre-tokenized; split in blocks of seq_len + 1 tokens
    documents ──i % val_every == val_every - 1 ?──> validation : train          (deterministic)
    train documents ──BpeTrainer (cached on disk)──> tokenizer    (or the fixed 257-id byte one)
    documents ──tokenizer, EOS after each──> Corpus(train_tokens, val_tokens)   1-D int32 streams
    stream ──WindowSource: window i = stream[i*T : i*T + T + 1]──> {inputs, targets, segment_ids}
    train: MapDataset.source ─shuffle(seed)─repeat─shard─batch(B)─> IterDataset of [B, T] dicts
    eval:  the first n_batches * B validation windows, in order (wrapping around)

Consecutive windows overlap by one token, so every token after the first is a target exactly once
per epoch. ``segment_ids`` number the documents inside a window from 1; the EOS belongs to the
document it ends. Shape names: B batch, T sequence length (``train.seq_len``). All arrays are int32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import lzma
import pathlib
import re

import grain
import numpy as np

from jscale import files
from jscale.config import BYTE_VOCAB_SIZE, DataConfig
from jscale.tokenize import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Tokenizer,
    check_byte_vocab,
    encode_documents,
)

_CACHE_FORMAT = 1  # bump when tokenization or the cache layout changes
#: Prefetch a few batches in a background thread; windows are cheap slices, so more buys nothing.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Tokenized train and validation streams.

    Attributes:
      train_tokens: 1-D int32 stream, every training document followed by ``tokenizer.eos_id``.
      val_tokens: the same for validation documents.
      tokenizer: the tokenizer that produced (and decodes) the streams.
      n_train_docs, n_val_docs: documents in each split (for ``.npy`` corpora: blocks of
        ``seq_len + 1`` tokens, the unit of the split).
    """

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    tokenizer: Tokenizer
    n_train_docs: int
    n_val_docs: int


def default_corpus_path() -> pathlib.Path:
    """The bundled State-of-the-Union corpus: 233 xz-compressed JSON lines with a ``text`` field."""
    return pathlib.Path(str(importlib.resources.files("jscale") / "corpora" / "sotu.jsonl.xz"))


def cache_dir(data_cfg: DataConfig) -> pathlib.Path:
    """``data.cache_dir``, else ``$JSCALE_CACHE``, else ``~/.cache/jscale``."""
    return files.cache_dir(data_cfg.cache_dir)


def load_corpus(data_cfg: DataConfig, vocab_size: int, seq_len: int) -> Corpus:
    """Read ``data.path``, split it into train/validation, tokenize both; raise :class:`DataError`.

    ``vocab_size`` is ``model.vocab_size``: 257 for the byte tokenizer, the BPE size otherwise.
    Each split must hold at least ``seq_len + 1`` tokens (one training window).
    """
    path = None if data_cfg.path is None else pathlib.Path(data_cfg.path).expanduser()
    if path is not None and not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if path is not None and path.suffix == ".npy":
        corpus = _load_pretokenized(path, data_cfg, vocab_size, seq_len)
    elif data_cfg.tokenizer == "byte":
        check_byte_vocab(vocab_size)
        train_docs, val_docs = _split(_read_documents(path, data_cfg), data_cfg, path)
        tok = ByteTokenizer()
        corpus = Corpus(encode_documents(tok, train_docs), encode_documents(tok, val_docs),
                        tok, len(train_docs), len(val_docs))
    else:
        corpus = _load_bpe(path, data_cfg, vocab_size)
    for name, tokens in (("training", corpus.train_tokens), ("validation", corpus.val_tokens)):
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"data.path / data.val_every: the {name} split of {_name(path)} has "
                f"{len(tokens)} tokens, but one sequence needs train.seq_len + 1 = {seq_len + 1}; "
                "use more data, a shorter train.seq_len, or a different data.val_every")
    return corpus


# -- packing and pipelines -------------------------------------------------------------------------

def pack(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Windows ``[..., T + 1]`` -> ``inputs``, ``targets`` and ``segment_ids``, each ``[..., T]``.

    ``targets`` are ``inputs`` shifted by one; ``segment_ids`` start at 1 and increase after each
    EOS in ``inputs`` (the EOS belongs to the document it ends).
    """
    inputs = np.asarray(windows[..., :-1], dtype=np.int32)
    is_eos = (inputs == eos_id).astype(np.int32)
    segment_ids = 1 + np.cumsum(is_eos, axis=-1, dtype=np.int32) - is_eos
    return {"inputs": inputs, "targets": np.asarray(windows[..., 1:], dtype=np.int32),
            "segment_ids": segment_ids}


class WindowSource:
    """Random-access grain source: example ``i`` packs ``tokens[i*T : i*T + T + 1]``; nothing is
    materialised up front."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        return pack(self.tokens[start:start + self.seq_len + 1], self.eos_id)

    def __repr__(self) -> str:
        return f"WindowSource(n_tokens={len(self.tokens)}, seq_len={self.seq_len}, n={len(self)})"


def train_dataset(corpus: Corpus, *, seq_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Endless shuffled training batches: dicts of ``[B, T]`` int32 arrays, ``B = batch_size``.

    Deterministic given ``seed``; reshuffled each epoch. For multi-host runs each process passes its
    ``shard_index`` (``jax.process_index()``) and ``shard_count`` and gets every ``shard_count``-th
    example of the shared shuffled stream, a disjoint share; ``batch_size`` is then per process. The
    iterator's ``get_state()``/``set_state()`` resume exactly where it stopped.
    """
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index: must be in [0, shard_count={shard_count}) "
                        f"(got {shard_index})")
    source = WindowSource(corpus.train_tokens, seq_len, corpus.tokenizer.eos_id)
    if len(source) == 0:
        raise DataError(f"data.path: the training split has no window of train.seq_len + 1 = "
                        f"{seq_len + 1} tokens")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)


def eval_windows(n_available: int, n_wanted: int) -> np.ndarray:
    """Indices of the validation windows an evaluation uses: ``n_wanted`` spread evenly over all
    ``n_available`` (window ``floor((i + ½)·n_available / n_wanted)``, so the first and last parts of
    the split are covered alike), or every window, in order and wrapping around, when there are no
    more than ``n_wanted``."""
    if n_wanted <= n_available:
        return ((2 * np.arange(n_wanted) + 1) * n_available) // (2 * n_wanted)
    return np.arange(n_wanted) % n_available


def eval_batches(corpus: Corpus, *, seq_len: int, batch_size: int,
                 n_batches: int) -> list[dict[str, np.ndarray]]:
    """``n_batches * batch_size`` validation windows spread evenly over the whole validation split
    (:func:`eval_windows`), as ``n_batches`` dicts of ``[B, T]`` int32 arrays. The same batches every
    call, for every run of the same data and ``seq_len``; :func:`eval_tokens` says how many distinct
    validation tokens they cover."""
    source = WindowSource(corpus.val_tokens, seq_len, corpus.tokenizer.eos_id)
    if len(source) == 0:
        raise DataError(f"data.val_every: the validation split has no window of train.seq_len + 1 "
                        f"= {seq_len + 1} tokens")
    index_B = eval_windows(len(source), n_batches * batch_size)
    starts_BT1 = (index_B * seq_len)[:, None] + np.arange(seq_len + 1)
    packed = pack(corpus.val_tokens[starts_BT1], corpus.tokenizer.eos_id)
    return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in packed.items()}
            for i in range(n_batches)]


def eval_tokens(corpus: Corpus, *, seq_len: int, batch_size: int, n_batches: int) -> int:
    """Distinct validation tokens (predicted targets) one evaluation by :func:`eval_batches`
    covers."""
    n_available = max(len(corpus.val_tokens) - 1, 0) // seq_len
    return min(n_available, n_batches * batch_size) * seq_len


def epochs(corpus: Corpus, tokens: int) -> float:
    """Passes over the training split that ``tokens`` training tokens make (tokens seen / training
    tokens available)."""
    return tokens / max(len(corpus.train_tokens), 1)


# -- reading documents -----------------------------------------------------------------------------

def _name(path: pathlib.Path | None) -> str:
    return "the bundled corpus" if path is None else str(path)


def _decode_utf8(raw: bytes, name: object) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path: {name} is not valid UTF-8 ({e})") from None


@functools.lru_cache(maxsize=1)
def _bundled_documents() -> tuple[str, ...]:
    text = lzma.decompress(default_corpus_path().read_bytes()).decode("utf-8")
    return tuple(_jsonl_documents(text, "text", "the bundled corpus"))


def _jsonl_documents(text: str, field: str, name: object) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.path: line {lineno} of {name} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"data.text_field: line {lineno} of {name} has no field {field!r}")
        if not isinstance(record[field], str):
            raise DataError(f"data.text_field: field {field!r} on line {lineno} of {name} is not a "
                            "string")
        docs.append(record[field])
    return docs


def _txt_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.rglob("*.txt") if p.is_file())


def _read_documents(path: pathlib.Path | None, data_cfg: DataConfig) -> list[str]:
    """Non-empty documents of ``data.path`` (``None``: the bundled corpus), in order."""
    if path is None:
        docs = list(_bundled_documents())
    elif path.is_dir():
        files = _txt_files(path)
        if not files:
            raise DataError(f"data.path: directory {path} contains no .txt files")
        docs = [_decode_utf8(f.read_bytes(), f) for f in files]
    else:
        text = _decode_utf8(path.read_bytes(), path)
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(text, data_cfg.text_field, path)
        else:
            docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.path: {_name(path)} has no documents (empty or only whitespace)")
    return docs


def _split(docs: list[str], data_cfg: DataConfig, path) -> tuple[list[str], list[str]]:
    k = data_cfg.val_every
    val = [d for i, d in enumerate(docs) if i % k == k - 1]
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    if not val:
        raise DataError(f"data.val_every: {_name(path)} has {len(docs)} documents, "
                        f"so none is a validation document (index % {k} == {k - 1}); lower "
                        "data.val_every or add documents to data.path")
    return train, val


# -- pre-tokenized .npy ----------------------------------------------------------------------------

def _load_pretokenized(path: pathlib.Path, data_cfg: DataConfig, vocab_size: int,
                       seq_len: int) -> Corpus:
    """A 1-D token array split by blocks of ``seq_len + 1``: block ``b`` is validation iff
    ``b % val_every == val_every - 1``. With ``data.tokenizer='bpe'`` the tokenizer that made it
    must lie next to it as ``<stem>.tokenizer.json``."""
    if data_cfg.tokenizer == "byte":
        check_byte_vocab(vocab_size)
        tok: Tokenizer = ByteTokenizer()
    else:
        sidecar = path.with_suffix(".tokenizer.json")
        if not sidecar.exists():
            raise DataError(f"data.tokenizer: 'bpe' with pre-tokenized {path} needs the tokenizer "
                            f"that made it at {sidecar} (HF tokenizers JSON with {EOS_TOKEN!r})")
        tok = BPETokenizer.load(sidecar)
        if tok.vocab_size > vocab_size:
            raise DataError(f"model.vocab_size: must be >= the tokenizer's {tok.vocab_size} tokens "
                            f"({sidecar}) (got {vocab_size})")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"data.path: cannot read {path} as a .npy array ({e})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise DataError(f"data.path: {path} must hold a non-empty 1-D integer token array (got "
                        f"shape {tokens.shape}, dtype {tokens.dtype})")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"data.path: token ids in {path} must be in [0, model.vocab_size="
                        f"{vocab_size}) (found ids in [{lo}, {hi}])")
    k, n_blocks = data_cfg.val_every, -(-len(tokens) // (seq_len + 1))  # the last may be partial
    val_blocks = np.arange(n_blocks) % k == k - 1
    is_val = np.repeat(val_blocks, seq_len + 1)[:len(tokens)]
    n_val = int(val_blocks.sum())
    return Corpus(np.asarray(tokens[~is_val], dtype=np.int32),
                  np.asarray(tokens[is_val], dtype=np.int32), tok, n_blocks - n_val, n_val)


# -- BPE and its cache -----------------------------------------------------------------------------

def _corpus_identity(path: pathlib.Path | None) -> str:
    """Changes whenever the corpus may have: content hash (bundled) or path, sizes and mtimes."""
    if path is None:
        return "bundled:" + hashlib.sha256(default_corpus_path().read_bytes()).hexdigest()
    files = _txt_files(path) if path.is_dir() else [path]
    stats = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return f"{path.resolve()}|" + "|".join(stats)


def _load_bpe(path: pathlib.Path | None, data_cfg: DataConfig, vocab_size: int) -> Corpus:
    """Train (or reuse) the BPE tokenizer and tokenized streams cached under ``cache_dir``."""
    if vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"model.vocab_size: must be >= {BYTE_VOCAB_SIZE} (EOS + 256 byte tokens) "
                        f"with data.tokenizer='bpe' (got {vocab_size})")
    key_src = json.dumps([_CACHE_FORMAT, _corpus_identity(path), data_cfg.text_field, vocab_size,
                          data_cfg.val_every])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    tok_path = cache_dir(data_cfg) / "tokenizers" / f"{key}.json"
    tokens_path = tok_path.with_name(f"{key}.tokens.npz")
    if tok_path.exists() and tokens_path.exists():
        with np.load(tokens_path) as z:
            return Corpus(z["train"], z["val"], BPETokenizer.load(tok_path),
                          int(z["n_train_docs"]), int(z["n_val_docs"]))
    train_docs, val_docs = _split(_read_documents(path, data_cfg), data_cfg, path)
    if tok_path.exists():
        tok = BPETokenizer.load(tok_path)
    else:
        tok = BPETokenizer.train(train_docs, vocab_size)
        if tok.vocab_size != vocab_size:
            raise DataError(f"model.vocab_size: the training split of {_name(path)}"
                            f" is too small for {vocab_size} BPE tokens (training stopped at "
                            f"{tok.vocab_size}); lower model.vocab_size or use more data")
        tok.save(tok_path)
    corpus = Corpus(encode_documents(tok, train_docs), encode_documents(tok, val_docs), tok,
                    len(train_docs), len(val_docs))
    files.atomic_write(tokens_path, lambda f: np.savez(
        f, train=corpus.train_tokens, val=corpus.val_tokens,
        n_train_docs=corpus.n_train_docs, n_val_docs=corpus.n_val_docs))
    return corpus
