"""The benchmarks' synthetic corpus: its constants are the bundled sample's Korean statistics, the text it writes
reads back to exactly the pieces it was written from (ours and transformers' tokenizers), and `prepare` makes
vocab-30000 shards of it whose word pieces whole-word masking sees."""

from __future__ import annotations

import numpy as np
import pytest

from mlmtrain.benchmarks import synthetic_data as sd
from mlmtrain.kernels.mlm_mask import pieces_per_word, word_start_table
from mlmtrain.prepare import check_tokenizer_match, load_split, read_meta
from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer
from mlmtrain.tokenizer_folder import load_tokenizer, read_vocab


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sd.make_synthetic_data(
        tmp_path_factory.mktemp("synthetic"), seq_caps=(128,), train_tokens=60_000, valid_tokens=3_000, log=print
    )


def test_constants_are_the_korean_sample_measured_again(sample_corpus, tmp_path):
    """Re-measured with a freshly trained tokenizer (WordPiece training breaks ties in hash order, so a few
    pieces may differ from the run that gave the constants): within a few percent."""
    train_tokenizer([sample_corpus], tmp_path / "tok", TokenizerSettings(vocab_size=30000), progress=False)
    m = sd.measure_sample(tmp_path / "tok")
    print(m)
    assert m["log_mean_tokens"] == pytest.approx(sd.LOG_MEAN_TOKENS, abs=0.05)
    assert m["log_sd_tokens"] == pytest.approx(sd.LOG_SD_TOKENS, abs=0.05)
    np.testing.assert_allclose(m["pieces_per_word"][:3], sd.PIECES_PER_WORD[:3], atol=0.03)
    assert tuple(m["sentences_per_document"]) == sd.SENTENCES_PER_DOCUMENT
    assert m["continuation_share"] == pytest.approx(sd.CONTINUATION_SHARE, abs=0.03)


def test_generated_sentences_follow_the_constants(tmp_path):
    rng = np.random.default_rng(7)
    vocab = sd.make_vocab(30000, rng)
    _, ids = sd.write_corpus(tmp_path / "text.txt", sd.Lexicon(vocab, rng), 200_000)
    st = sd.statistics(ids, vocab)
    print(st)
    assert st["log_mean_tokens"] == pytest.approx(sd.LOG_MEAN_TOKENS, abs=0.05)
    assert st["log_sd_tokens"] == pytest.approx(sd.LOG_SD_TOKENS, abs=0.05)
    # a sentence's last word may be cut short, which adds a few one-piece words
    assert st["pieces_per_word"][0] == pytest.approx(sd.PIECES_PER_WORD[0], abs=0.05)
    mean_k = sum((i + 1) * p for i, p in enumerate(st["pieces_per_word"]))
    assert mean_k == pytest.approx(sum((i + 1) * p for i, p in enumerate(sd.PIECES_PER_WORD)), abs=0.1)
    assert st["distinct_ids"] > 20_000  # most of the vocabulary occurs: the vocab head sees all of it


def test_text_reads_back_to_the_pieces_it_was_written_from(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = read_vocab(corpus.tokenizer_dir)
    assert len(vocab) == 30000 and corpus.vocab_size == 30000
    lines, ids = sd.write_corpus(tmp_path / "more.txt", sd.Lexicon(vocab, np.random.default_rng(3)), 5_000)
    ours = load_tokenizer(corpus.tokenizer_dir).encode_batch(lines, add_special_tokens=False)
    assert all(e.ids == s.tolist() for e, s in zip(ours, ids))
    hf = transformers.AutoTokenizer.from_pretrained(str(corpus.tokenizer_dir))
    assert hf(lines[0])["input_ids"] == [2, *ids[0].tolist(), 3]  # [CLS] ... [SEP]


def test_shards_are_prepares_and_whole_word_masking_sees_the_words(corpus):
    data = corpus.data_dirs[128]
    meta = read_meta(data)
    assert meta["vocab_size"] == 30000 and meta["max_seq_len"] == 128 and meta["sentences_split"] == 0
    check_tokenizer_match(meta["tokenizer_fingerprint"], corpus.tokenizer_dir, "the synthetic shards")
    shard = load_split(data, "train")
    vocab = read_vocab(corpus.tokenizer_dir)
    starts = word_start_table(vocab).numpy()
    assert starts[5:].sum() == 30000 - 5 - round(sd.CONTINUATION_SHARE * 30000)
    first = shard.tokens[shard.offsets[:-1]]  # every sentence opens with a word-start piece
    assert starts[first].all()
    assert 1.5 < pieces_per_word(shard.tokens, vocab) < 2.5  # E[k^2]/E[k]: the sample's is ~1.9


def test_same_seed_same_corpus(tmp_path):
    a = sd.make_synthetic_data(tmp_path / "a", train_tokens=5_000, valid_tokens=500, log=lambda m: None)
    b = sd.make_synthetic_data(tmp_path / "b", train_tokens=5_000, valid_tokens=500, log=lambda m: None)
    assert (tmp_path / "a" / "train.txt").read_bytes() == (tmp_path / "b" / "train.txt").read_bytes()
    assert a.train_lines == b.train_lines and a.valid_lines == b.valid_lines
    for name in ("tokens.npy", "offsets.npy", "doc_offsets.npy"):
        assert (a.data_dirs[128] / "train" / name).read_bytes() == (b.data_dirs[128] / "train" / name).read_bytes()


def test_held_out_text_speaks_the_training_texts_words(corpus):
    """The held-out sentences are other documents of the same lexicon: their commonest pieces are the training
    text's (a lexicon of its own would be another language, whose loss ranks models by luck)."""
    tokenizer = load_tokenizer(corpus.tokenizer_dir)

    def top(lines, n):
        ids = np.concatenate([e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)])
        return set(np.argsort(-np.bincount(ids, minlength=corpus.vocab_size))[:n].tolist())

    assert len(top(corpus.valid_lines, 20) & top(corpus.train_lines, 50)) >= 15
