"""Benchmark data at the real vocabulary: a synthetic corpus of 30,000 WordPiece pieces whose sentence lengths,
pieces per word and sentences per document are those of real Korean text, made without a download and run
through the real pipeline (`prepare`), so the shards are what a user's would be.

Why synthetic: the bundled sample supports a ~4,000-piece vocabulary only, and a step's cost at the real one
(~30,000) is not the sample's: the vocab head, its cross-entropy and the tied embedding's gradient grow ~7.5x.
What is measured from real text (`measure_sample`, on the sample's 422 Korean sentences, the constitution and
ten National Assembly bills, tokenized by a WordPiece trained on the sample with vocab_size=30000, which gives
~4,200 pieces; 2026-11-30, the test `test_synthetic_corpus_follows_the_korean_sample` re-measures it):
- tokens per sentence ([CLS]/[SEP] not counted): log-normal, log-mean 2.765, log-sd 0.683 (median 16, mean
  20), cut to max_seq_len - 2 = 126 as `prepare` would;
- pieces per word (a start piece and its `##` continuations): 70% one piece, 20% two, 7.3% three, ...;
- sentences per document: drawn from the sample's 24 Korean documents;
- 30% of the vocabulary are `##` continuation pieces.
The tokenizer trained on the sample has seen every word it splits, so real text at 30,000 pieces splits words
somewhat more often; these lengths are the sample's, not a claim about a larger corpus.

How the text is made: every start piece is two Hangul syllables, every continuation piece `##` + one, so
WordPiece's longest-match reads any sequence of words back to exactly the pieces it was written from (tested).
A lexicon of words (pieces drawn uniformly, so every id occurs) is used with Zipf(1) frequencies, and each
document prefers a topic of its own (30% of its words from 500 lexicon words), so the model has word-internal
structure to learn (what whole-word masking hides) and a document context.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from mlmtrain.benchmarks.bench_train import BenchData, prepare_at_caps

# measured on the sample's Korean sentences (module docstring); `measure_sample` recomputes them
LOG_MEAN_TOKENS, LOG_SD_TOKENS = 2.765, 0.683
PIECES_PER_WORD = np.array([0.6997, 0.1995, 0.0735, 0.0184, 0.0067, 0.0019, 0.0003])  # P(1), P(2), ...
SENTENCES_PER_DOCUMENT = (1, 1, 18, 90, 65, 97, 30, 16, 13, 5, 19, 7, 1, 12, 3, 3, 3, 5, 3, 4, 3, 10, 9, 4)
CONTINUATION_SHARE = 0.30
KOREAN_LINES = 445  # lines 1-445 of the sample are Korean (trainer/assets/SOURCES.md)

HANGUL_FIRST, HANGUL_COUNT = 0xAC00, 11172  # the precomposed syllables 가..힣
LEXICON_WORDS, TOPIC_WORDS, TOPIC_SHARE = 50_000, 500, 0.3


def make_vocab(vocab_size: int, rng: np.random.Generator) -> list[str]:
    """Specials, then start pieces (two syllables), then `##` pieces (one syllable): `vocab_size` entries."""
    from mlmtrain.tokenizer import SPECIAL_TOKENS

    n_cont = min(round(CONTINUATION_SHARE * vocab_size), HANGUL_COUNT)
    n_start = vocab_size - len(SPECIAL_TOKENS) - n_cont
    syllables = [chr(HANGUL_FIRST + i) for i in rng.permutation(HANGUL_COUNT)]
    pairs = rng.choice(HANGUL_COUNT * HANGUL_COUNT, size=n_start, replace=False)
    starts = [syllables[i // HANGUL_COUNT] + syllables[i % HANGUL_COUNT] for i in pairs.tolist()]
    return [*SPECIAL_TOKENS, *starts, *("##" + s for s in syllables[:n_cont])]


class Lexicon:
    """A language's words (a start piece and its `##` continuations each, Zipf-ranked) and the documents written
    from them: sentences as text and as the piece ids they were written from, to test against."""

    def __init__(self, vocab: list[str], rng: np.random.Generator):
        from mlmtrain.tokenizer import NUM_SPECIAL

        self.vocab, self.rng = vocab, rng
        n_cont = sum(t.startswith("##") for t in vocab)
        first_cont = len(vocab) - n_cont
        # pieces per word by frequency rank from a golden-ratio sequence, so every band of ranks (and with it the
        # Zipf-weighted text, whose top words weigh most) has the measured mix, not whatever the top words drew
        spread = (np.arange(LEXICON_WORDS) * 0.6180339887498949 + 0.5) % 1.0
        k = 1 + np.searchsorted(np.cumsum(PIECES_PER_WORD / PIECES_PER_WORD.sum()), spread)
        self.word_offsets = np.concatenate([[0], np.cumsum(k)])  # word w is pieces[offsets[w]:offsets[w + 1]]
        pieces = rng.integers(first_cont, len(vocab), size=int(k.sum()))  # continuations ...
        pieces[self.word_offsets[:-1]] = rng.integers(NUM_SPECIAL, first_cont, size=LEXICON_WORDS)  # ... and starts
        self.pieces = pieces
        self.zipf_cdf = np.cumsum(1.0 / np.arange(1, LEXICON_WORDS + 1))
        self.zipf_cdf /= self.zipf_cdf[-1]

    def document(self, n_sentences: int) -> tuple[list[str], list[np.ndarray]]:
        rng = self.rng
        lengths = np.clip(np.rint(rng.lognormal(LOG_MEAN_TOKENS, LOG_SD_TOKENS, n_sentences)), 1, 126).astype(int)
        n_words = int(lengths.sum()) + n_sentences  # >= the pieces needed: every word has one or more
        topic = rng.integers(0, LEXICON_WORDS, TOPIC_WORDS)
        words = np.where(
            rng.random(n_words) < TOPIC_SHARE,
            topic[rng.integers(0, TOPIC_WORDS, n_words)],
            np.searchsorted(self.zipf_cdf, rng.random(n_words)),
        )
        k = self.word_offsets[words + 1] - self.word_offsets[words]
        ids = self.pieces[np.repeat(self.word_offsets[words], k) + np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)]
        word_starts = np.cumsum(k) - k  # where each word begins in `ids`
        lines, sentences, w = [], [], 0
        for n in lengths.tolist():  # a sentence: whole words from a word start, its last word cut to fit n pieces
            start = int(word_starts[w])
            sentence = ids[start : start + n]
            w = int(np.searchsorted(word_starts, start + n))  # the next sentence starts at the next whole word
            sentences.append(sentence)
            lines.append(
                "".join(
                    (" " + self.vocab[i]) if not self.vocab[i].startswith("##") else self.vocab[i][2:]
                    for i in sentence.tolist()
                ).lstrip()
            )
        return lines, sentences


def write_corpus(path: Path, lexicon: Lexicon, num_tokens: int) -> tuple[list, list]:
    """Documents of `lexicon`'s words until `num_tokens` pieces: the text to `path`; returns (lines, piece ids) of
    every sentence. Held-out text must come from the training text's lexicon: another one is another language
    (other words, other piece frequencies), and its loss would rank models by luck."""
    lines, ids, total = [], [], 0
    with open(path, "w", encoding="utf-8") as f:
        while total < num_tokens:
            doc_lines, doc_ids = lexicon.document(int(lexicon.rng.choice(SENTENCES_PER_DOCUMENT)))
            f.write("\n".join(doc_lines) + "\n\n")
            lines += doc_lines
            ids += doc_ids
            total += sum(map(len, doc_ids))
    return lines, ids


def make_synthetic_data(
    work_dir: str | Path,
    seq_caps=(128,),
    vocab_size: int = 30000,
    train_tokens: int = 4_000_000,
    valid_tokens: int = 40_000,
    seed: int = 0,
    log=print,
) -> BenchData:
    """Tokenizer + shards (one per sequence cap) + the text both trainers read, in `work_dir`. The held-out
    sentences (`valid_lines`) are documents of their own; `prepare` also keeps 1% of the train text as the
    shards' valid split (what the trainer's own evaluation reads)."""
    from mlmtrain.tokenizer import TokenizerSettings, tokenizer_from_vocab, write_tokenizer_dir

    t0 = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = make_vocab(vocab_size, rng)
    tokenizer_dir = work_dir / "tokenizer"
    settings = TokenizerSettings(vocab_size=vocab_size)
    write_tokenizer_dir(tokenizer_from_vocab(vocab, settings), tokenizer_dir, settings)
    train_text = work_dir / "train.txt"
    lexicon = Lexicon(vocab, rng)
    train_lines, _ = write_corpus(train_text, lexicon, train_tokens)
    valid_lines, _ = write_corpus(work_dir / "valid.txt", lexicon, valid_tokens)  # other documents, the same words
    data_dirs = prepare_at_caps(train_text, tokenizer_dir, work_dir, seq_caps, seed, valid_fraction=0.01)
    log(
        f"synthetic corpus: {len(train_lines):,} train sentences ({train_tokens / 1e6:.1f}M+ tokens), vocab "
        f"{vocab_size}, caps {list(seq_caps)}, in {time.perf_counter() - t0:.1f} s"
    )
    return BenchData(tokenizer_dir, train_lines, valid_lines, data_dirs, vocab_size)


def measure_sample(tokenizer_dir) -> dict:
    """The statistics this module's constants come from, measured on the sample's Korean sentences with the
    tokenizer in `tokenizer_dir` (one trained on the sample with vocab_size=30000, for the constants)."""
    from mlmtrain.text import sample_corpus_path
    from mlmtrain.tokenizer_folder import load_tokenizer, read_vocab

    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()[:KOREAN_LINES]
    sentences = [line for line in lines if line.strip()]
    tok = load_tokenizer(tokenizer_dir)
    tok.no_truncation()
    encodings = tok.encode_batch(sentences, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.float64)
    pieces = np.concatenate(
        [np.diff([*(i for i, t in enumerate(e.tokens) if not t.startswith("##")), len(e.tokens)]) for e in encodings]
    )
    documents, n = [], 0
    for line in [*lines, ""]:
        if line.strip():
            n += 1
        elif n:
            documents, n = documents + [n], 0
    vocab = read_vocab(tokenizer_dir)
    return {
        "log_mean_tokens": float(np.log(lengths).mean()),
        "log_sd_tokens": float(np.log(lengths).std()),
        "pieces_per_word": (np.bincount(pieces)[1:] / len(pieces)).tolist(),
        "sentences_per_document": documents,
        "continuation_share": float(np.mean([t.startswith("##") for t in vocab])),
        "vocab_size": len(vocab),
    }


def statistics(ids: list[np.ndarray], vocab: list[str]) -> dict:
    """The same numbers for generated sentences (piece ids), to compare with `measure_sample`."""
    lengths = np.array([len(s) for s in ids], dtype=np.float64)
    flat = np.concatenate(ids)
    is_start = ~np.array([t.startswith("##") for t in vocab])[flat]
    is_start[np.cumsum(lengths).astype(int)[:-1]] = True  # a sentence starts a word even after a cut
    pieces = np.diff(np.append(np.flatnonzero(is_start), len(flat)))
    return {
        "log_mean_tokens": float(np.log(lengths).mean()),
        "log_sd_tokens": float(np.log(lengths).std()),
        "pieces_per_word": (np.bincount(pieces)[1:] / len(pieces)).tolist(),
        "distinct_ids": int(len(np.unique(flat))),
        "mean_tokens": float(lengths.mean()),
        "expected_mean_tokens": math.exp(LOG_MEAN_TOKENS + LOG_SD_TOKENS**2 / 2),
    }
