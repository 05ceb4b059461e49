"""Data pipeline and tokenizers: corpus reading, train/validation split, byte and BPE tokenizers
(jscale.tokenize), packing, grain iterators."""

import json
import lzma

import numpy as np
import pytest

from jscale.config import BYTE_VOCAB_SIZE, ConfigError, DataConfig
from jscale.data import (
    Corpus,
    DataError,
    WindowSource,
    default_corpus_path,
    epochs,
    eval_batches,
    eval_tokens,
    eval_windows,
    load_corpus,
    pack,
    train_dataset,
)
from jscale.tokenize import BYTE_EOS_ID, BPETokenizer, ByteTokenizer

T = 16  # sequence length used by the small synthetic tests


def _words_corpus(n_docs, seed=0):
    """Distinct short documents made of a small vocabulary (enough repetition for BPE merges)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda",
             "omega", "scaling", "laws", "tokens", "model", "compute", "data"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=12)) + "." for i in range(n_docs)]


def _write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _split_docs(stream, tokenizer):
    """Decode a stream back into its documents (each ends with EOS)."""
    assert stream[-1] == tokenizer.eos_id
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(stream[s:e]) for s, e in zip(starts, ends, strict=True)]


def _synthetic_corpus(n_windows, seq_len=T):
    """A corpus whose windows are identified by their first input token (no EOS inside)."""
    tokens = 1000 + np.arange(n_windows * seq_len + 1, dtype=np.int32)
    return Corpus(tokens, tokens.copy(), ByteTokenizer(), 1, 1)


# -- bundled corpus --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sotu_docs():
    text = lzma.decompress(default_corpus_path().read_bytes()).decode("utf-8")
    return [json.loads(line)["text"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def sotu():
    return load_corpus(DataConfig(), BYTE_VOCAB_SIZE, 128)


def test_bundled_corpus_loads_and_splits_by_rule(sotu, sotu_docs):
    assert len(sotu_docs) == 233
    assert (sotu.n_train_docs, sotu.n_val_docs) == (210, 23)
    for stream, n in ((sotu.train_tokens, 210), (sotu.val_tokens, 23)):
        assert stream.dtype == np.int32 and stream.ndim == 1
        assert stream[-1] == BYTE_EOS_ID
        assert np.sum(stream == BYTE_EOS_ID) == n
    tok = sotu.tokenizer
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_id == 256
    # Document i is validation iff i % 10 == 9 (val_every=10), and decoding restores the text.
    val_docs = [d for i, d in enumerate(sotu_docs) if i % 10 == 9]
    train_docs = [d for i, d in enumerate(sotu_docs) if i % 10 != 9]
    assert _split_docs(sotu.val_tokens, tok) == val_docs
    assert _split_docs(sotu.train_tokens, tok) == train_docs


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "Fellow-Citizens — naïve 日本語 🙂\n\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, BYTE_EOS_ID)) == text  # EOS is dropped
    assert tok.decode([0xFF]) == "\ufffd"


def test_data_error_is_config_error():
    assert issubclass(DataError, ConfigError) and issubclass(DataError, ValueError)


# -- split -----------------------------------------------------------------------------------------

def test_split_is_disjoint_and_deterministic(tmp_path):
    docs = _words_corpus(50)
    cfg = DataConfig(path=str(_write_txt(tmp_path / "c.txt", docs)), val_every=5)
    a, b = load_corpus(cfg, BYTE_VOCAB_SIZE, T), load_corpus(cfg, BYTE_VOCAB_SIZE, T)
    np.testing.assert_array_equal(a.train_tokens, b.train_tokens)
    np.testing.assert_array_equal(a.val_tokens, b.val_tokens)
    train_docs = _split_docs(a.train_tokens, a.tokenizer)
    val_docs = _split_docs(a.val_tokens, a.tokenizer)
    assert (len(train_docs), len(val_docs)) == (a.n_train_docs, a.n_val_docs) == (40, 10)
    assert set(train_docs) | set(val_docs) == set(docs)
    train_text = a.tokenizer.decode(a.train_tokens)
    assert not any(d in train_text for d in val_docs)


def test_too_small_split_names_val_every(tmp_path):
    cfg = DataConfig(path=str(_write_txt(tmp_path / "c.txt", _words_corpus(5))), val_every=10)
    with pytest.raises(DataError, match="data.val_every"):
        load_corpus(cfg, BYTE_VOCAB_SIZE, T)
    cfg = DataConfig(path=str(_write_txt(tmp_path / "c.txt", _words_corpus(10))), val_every=10)
    with pytest.raises(DataError, match="data.val_every"):  # one 60-byte val doc < 1025 tokens
        load_corpus(cfg, BYTE_VOCAB_SIZE, 1024)


# -- packing ---------------------------------------------------------------------------------------

def test_pack_hand_made_example():
    eos = 9
    out = pack(np.array([1, 2, eos, 3, eos, 4, 5]), eos)
    np.testing.assert_array_equal(out["inputs"], [1, 2, eos, 3, eos, 4])
    np.testing.assert_array_equal(out["targets"], [2, eos, 3, eos, 4, 5])
    np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 2, 2, 3])
    assert all(v.dtype == np.int32 for v in out.values())
    batched = pack(np.array([[eos, 1, 2], [1, 2, 3]]), eos)  # also works on [B, T + 1]
    np.testing.assert_array_equal(batched["segment_ids"], [[1, 2], [1, 1]])


def test_windows_overlap_by_one_and_cover_every_target():
    tokens = np.arange(3 * 4 + 1 + 2, dtype=np.int32)  # 3 windows of T=4, remainder of 2 dropped
    source = WindowSource(tokens, 4, eos_id=-1)
    assert len(source) == 3
    targets = np.concatenate([source[i]["targets"] for i in range(len(source))])
    np.testing.assert_array_equal(targets, np.arange(1, 13))
    np.testing.assert_array_equal(source[1]["inputs"], [4, 5, 6, 7])
    with pytest.raises(IndexError):
        source[3]


# -- train_dataset / eval_batches ------------------------------------------------------------------

def _take(ds_or_it, n):
    it = iter(ds_or_it)
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_train_dataset_batches_are_deterministic(sotu):
    batches = _take(train_dataset(sotu, seq_len=32, batch_size=4, seed=0), 3)
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids"}
        assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in b.values())
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    _assert_same(batches, _take(train_dataset(sotu, seq_len=32, batch_size=4, seed=0), 3))
    other = _take(train_dataset(sotu, seq_len=32, batch_size=4, seed=1), 3)
    assert not all(np.array_equal(a["inputs"], b["inputs"])
                   for a, b in zip(batches, other, strict=True))


def test_train_iterator_state_restores_exactly():
    corpus = _synthetic_corpus(20)
    ds = train_dataset(corpus, seq_len=T, batch_size=3, seed=7)
    reference = _take(ds, 12)  # crosses epoch boundaries (20 windows, 3 per batch)
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    fresh = iter(train_dataset(corpus, seq_len=T, batch_size=3, seed=7))
    fresh.set_state(state)
    _assert_same(_take(fresh, 7), reference[5:])


def test_epochs_are_permutations_and_shards_disjoint():
    corpus, n, b = _synthetic_corpus(64), 64, 4
    first_token = lambda batches: [int(x) for bt in batches for x in bt["inputs"][:, 0]]  # noqa: E731
    ids = first_token(_take(train_dataset(corpus, seq_len=T, batch_size=b, seed=3), 2 * n // b))
    assert sorted(ids[:n]) == sorted(ids[n:]) == [1000 + T * i for i in range(n)]
    assert ids[:n] != ids[n:]  # reshuffled each epoch
    shards = [first_token(_take(train_dataset(corpus, seq_len=T, batch_size=b, seed=3,
                                              shard_index=i, shard_count=2), n // (2 * b)))
              for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(ids[:n])
    # Each step's per-host batches together hold the single-host global batch of the same step.
    for step in range(n // (2 * b)):
        per_step = shards[0][step * b:(step + 1) * b] + shards[1][step * b:(step + 1) * b]
        assert sorted(per_step) == sorted(ids[step * 2 * b:(step + 1) * 2 * b])
    with pytest.raises(DataError, match="shard_index"):
        train_dataset(corpus, seq_len=T, batch_size=b, seed=3, shard_index=2, shard_count=2)


def test_eval_batches_wrap_around_when_the_split_is_small():
    corpus = _synthetic_corpus(5)
    batches = eval_batches(corpus, seq_len=T, batch_size=3, n_batches=3)
    assert len(batches) == 3 and all(v.shape == (3, T) for b in batches for v in b.values())
    starts = [int(x) for b in batches for x in b["inputs"][:, 0]]
    assert starts == [1000 + T * (i % 5) for i in range(9)]
    _assert_same(batches, eval_batches(corpus, seq_len=T, batch_size=3, n_batches=3))
    assert eval_tokens(corpus, seq_len=T, batch_size=3, n_batches=3) == 5 * T


def test_eval_batches_cover_the_whole_validation_split():
    # 100 windows, 8 evaluated: spread from the first tenth to the last, not the first 8 in order.
    corpus = _synthetic_corpus(100)
    batches = eval_batches(corpus, seq_len=T, batch_size=4, n_batches=2)
    windows = [(int(x) - 1000) // T for b in batches for x in b["inputs"][:, 0]]
    assert windows == [6, 18, 31, 43, 56, 68, 81, 93]
    assert len(set(windows)) == 8 and windows[0] < 100 / 8 and windows[-1] >= 100 * 7 / 8
    assert eval_tokens(corpus, seq_len=T, batch_size=4, n_batches=2) == 8 * T


def test_eval_set_of_the_bundled_corpus_spans_every_validation_document():
    corpus = load_corpus(DataConfig(), BYTE_VOCAB_SIZE, 64)
    batches = eval_batches(corpus, seq_len=64, batch_size=16, n_batches=8)
    # which validation document each window starts in
    doc_of_token = np.cumsum(corpus.val_tokens == corpus.tokenizer.eos_id) - (
        corpus.val_tokens == corpus.tokenizer.eos_id)
    starts = [int(i) for i in eval_windows((len(corpus.val_tokens) - 1) // 64, 128) * 64]
    assert {int(doc_of_token[s]) for s in starts} == set(range(corpus.n_val_docs))
    assert sum(b["inputs"].shape[0] for b in batches) == 128


def test_epochs():
    corpus = _synthetic_corpus(10)
    assert epochs(corpus, len(corpus.train_tokens) * 3) == 3.0


# -- user data -------------------------------------------------------------------------------------

def test_txt_file_blank_line_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"first doc\nsecond line\n\n \n\nsecond doc\r\n\r\nthird\n\n\n")
    corpus = load_corpus(DataConfig(path=str(path), val_every=3), BYTE_VOCAB_SIZE, 4)
    assert _split_docs(corpus.train_tokens, corpus.tokenizer) == ["first doc\nsecond line",
                                                                 "second doc"]
    assert _split_docs(corpus.val_tokens, corpus.tokenizer) == ["third"]


def test_directory_of_txt_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("b.txt", "bravo text"), ("a.txt", "alpha text"), ("sub/c.txt", "charlie"),
                       ("skip.md", "not a txt"), ("empty.txt", "  \n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(path=str(tmp_path), val_every=2), BYTE_VOCAB_SIZE, 4)
    assert _split_docs(corpus.train_tokens, corpus.tokenizer) == ["alpha text", "charlie"]
    assert _split_docs(corpus.val_tokens, corpus.tokenizer) == ["bravo text"]


def test_jsonl_with_custom_field(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": f"document number {i}", "id": i}) for i in range(6)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    corpus = load_corpus(DataConfig(path=str(path), text_field="body", val_every=3),
                         BYTE_VOCAB_SIZE, 8)
    assert _split_docs(corpus.val_tokens, corpus.tokenizer) == ["document number 2",
                                                               "document number 5"]
    with pytest.raises(DataError, match=r"data.text_field.*line 1.*'text'"):
        load_corpus(DataConfig(path=str(path), val_every=3), BYTE_VOCAB_SIZE, 8)


def test_npy_tokens_split_by_blocks(tmp_path):
    tokens = np.arange(10 * 5 + 3, dtype=np.int64) % 257  # 10 full blocks of 5 and a tail of 3
    np.save(tmp_path / "t.npy", tokens)
    corpus = load_corpus(DataConfig(path=str(tmp_path / "t.npy"), val_every=3), BYTE_VOCAB_SIZE, 4)
    blocks = [tokens[i:i + 5] for i in range(0, len(tokens), 5)]
    np.testing.assert_array_equal(corpus.val_tokens, np.concatenate(blocks[2::3]))
    np.testing.assert_array_equal(corpus.train_tokens, np.concatenate(
        [b for i, b in enumerate(blocks) if i % 3 != 2]))
    assert corpus.train_tokens.dtype == np.int32
    assert (corpus.n_train_docs, corpus.n_val_docs) == (8, 3)


@pytest.mark.parametrize("name, content, field", [
    ("missing.txt", None, r"data.path: .*missing.txt does not exist"),
    ("empty.txt", b"", "data.path: .*no documents"),
    ("blank.txt", b" \n\n \n", "data.path: .*no documents"),
    ("emptydir/", None, "data.path: .*no .txt files"),
    ("bad.txt", b"ok text\n\n\xff\xfe bad", r"data.path: .*bad.txt is not valid UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r"data.text_field: line 2 .* no field 'text'"),
    ("notjson.jsonl", b'{"text": "a"}\n{text\n', r"data.path: line 2 .* not valid JSON"),
    ("big.npy", np.array([1, 300]), r"data.path: .*model.vocab_size=257"),
    ("2d.npy", np.ones((2, 2), np.int32), "data.path: .*1-D integer"),
])
def test_bad_user_data_raises_naming_the_field(tmp_path, name, content, field):
    path = tmp_path / name
    if name.endswith("/"):
        path.mkdir()
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=field):
        load_corpus(DataConfig(path=str(path), val_every=2), BYTE_VOCAB_SIZE, 2)


def test_byte_tokenizer_needs_vocab_257():
    with pytest.raises(DataError, match="model.vocab_size"):
        load_corpus(DataConfig(), 300, 128)


# -- BPE -------------------------------------------------------------------------------------------

def test_bpe_trains_caches_and_reuses(tmp_path, monkeypatch):
    docs = _words_corpus(300)
    cfg = DataConfig(path=str(_write_txt(tmp_path / "c.txt", docs)), tokenizer="bpe",
                     cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, 300, T)
    tok = corpus.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert (corpus.n_train_docs, corpus.n_val_docs) == (270, 30)
    assert corpus.train_tokens.max() < 300 and corpus.train_tokens.dtype == np.int32
    assert np.sum(corpus.train_tokens == tok.eos_id) == 270
    assert len(corpus.train_tokens) < sum(len(d) for d in docs) / 2  # merges compress
    assert _split_docs(corpus.val_tokens, tok) == [d for i, d in enumerate(docs) if i % 10 == 9]
    text = "omega laws <|endoftext|> naïve 🙂"
    assert tok.decode(tok.encode(text)) == text and tok.eos_id not in tok.encode(text)
    cached = sorted(p.name for p in (tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".tokens.npz")

    calls = []
    train = BPETokenizer.train
    monkeypatch.setattr(BPETokenizer, "train",
                        lambda *a, **kw: calls.append(1) or train(*a, **kw))
    again = load_corpus(cfg, 300, T)
    assert not calls  # reused from the cache
    np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
    np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
    assert again.tokenizer.tokenizer.to_str() == tok.tokenizer.to_str()
    _write_txt(tmp_path / "c.txt", docs[:-1])  # a changed corpus gets a new tokenizer
    load_corpus(cfg, 300, T)
    assert len(calls) == 1


def test_bpe_pretokenized_npy_with_sidecar_tokenizer(tmp_path):
    docs = _words_corpus(100)
    tok = BPETokenizer.train(docs, 280)
    stream = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    np.save(tmp_path / "t.npy", stream)
    cfg = DataConfig(path=str(tmp_path / "t.npy"), tokenizer="bpe", val_every=4)
    with pytest.raises(DataError, match="data.tokenizer.*t.tokenizer.json"):
        load_corpus(cfg, 280, T)
    tok.save(tmp_path / "t.tokenizer.json")
    corpus = load_corpus(cfg, 280, T)
    assert corpus.tokenizer.eos_id == tok.eos_id and corpus.tokenizer.vocab_size == 280
    assert len(corpus.train_tokens) + len(corpus.val_tokens) == len(stream)
    assert corpus.n_val_docs == len(range(3, -(-len(stream) // (T + 1)), 4))


def test_bpe_vocab_too_large_for_corpus(tmp_path):
    cfg = DataConfig(path=str(_write_txt(tmp_path / "c.txt", _words_corpus(20))), tokenizer="bpe",
                     val_every=2)
    with pytest.raises(DataError, match="model.vocab_size.*too small"):
        load_corpus(cfg, 5000, 4)
    with pytest.raises(DataError, match="model.vocab_size"):
        load_corpus(cfg, 100, 4)
