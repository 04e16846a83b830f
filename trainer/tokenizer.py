"""`mlmtrain tokenizer`: train a BERT WordPiece tokenizer with the `tokenizers` library and write a folder
that `transformers.AutoTokenizer.from_pretrained(DIR)` loads (fast, and the slow/legacy BertTokenizer)
and that tokenizes exactly like the trained `tokenizers.Tokenizer`.

Defaults are the blog post's `BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True,
strip_accents=False, lowercase=False, wordpieces_prefix="##")`, `vocab_size=30000`, `limit_alphabet=1000`.
Two Korean traps this file avoids:
- `strip_accents` runs NFD and drops combining marks; NFD turns every Hangul syllable into conjoining
  jamo (한 -> ᄒ ᅡ ᆫ), so the vocabulary and every id would be jamo. It is off unless asked for, and the
  config writes it as an explicit bool (`null` would make BertTokenizer follow `do_lower_case`).
- `limit_alphabet` keeps only the N most frequent characters; rarer ones become [UNK]. Korean easily has
  more than 1000 distinct syllables, so training reports how many seen characters did not make it.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mlmtrain.corpus_check import check_corpus, corpus_from_args
from mlmtrain.errors import UserError
from mlmtrain.files import Layout, atomic_dir, check_out_folder, write_json
from mlmtrain.progress import bars_enabled, quiet
from mlmtrain.stop import leave_running
from mlmtrain.text import HANGUL_SYLLABLE, iter_line_batches, line_problem_notes

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)  # where `mlmtrain tokenizer` puts them
NUM_SPECIAL = 5
# Real BERT vocabularies hold 30k-250k tokens. The tokenizers trainer aborts the whole process (a Rust allocation
# failure, no Python exception) when asked for ~2**30; 2**24 trains, still fits the uint32 ids of prepare's
# shards, and is 60x the largest real vocabulary, so a larger request is a typo.
MAX_VOCAB_SIZE = 1 << 24
UNUSED_TOKEN = re.compile(r"\[unused\d+\]")  # placeholder rows of Google's vocabularies
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# How `mlmtrain tokenizer` trained the folder (settings, inputs, real size), for the model card's commands.
# Not a tokenizer file: nothing reads it to tokenize, and the export does not copy it.
TOKENIZER_RECORD = "mlmtrain_tokenizer.json"
SPECIAL_TOKENS_MAP = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# What BertTokenizer (slow and fast, transformers 4.45-5.x) reads from tokenizer_config.json; nothing else is
# written (no added-token tables or auto_map, which a Hub widget can trip over).
TOKENIZER_CONFIG_KEYS = (
    "tokenizer_class",
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
    "clean_up_tokenization_spaces",
    "model_max_length",
    *SPECIAL_TOKENS_MAP,
)
TOKENIZER_LAYOUT = Layout(
    "tokenizer",
    "a tokenizer",
    "mlmtrain tokenizer",
    (*TOKENIZER_FILES, TOKENIZER_RECORD),
    (*TOKENIZER_FILES, TOKENIZER_RECORD),
)
# transformers' BertTokenizer rebuilds the WordPiece model from vocab.txt with "##" (transformers 5.x) or splits
# words with a hard-coded "##" (the pure-Python tokenizer), whatever tokenizer.json says.
WORDPIECES_PREFIX = "##"


@dataclass(frozen=True)
class SpecialTokens:
    """Where the five BERT specials sit in one vocabulary, and the ids masking must never select: the five,
    any other special token of tokenizer.json and every `[unused*]` placeholder. `mlmtrain tokenizer` writes
    ids 0-4; Google's vocabularies (bert-base-*, mBERT) have [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103 among [unused*] rows. Read from a tokenizer folder by `read_special_tokens`; stored in meta.json
    so packing, masking and the model use the ids the shards were made with."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    never_mask: tuple[tuple[int, int], ...]  # ascending, disjoint (first, last) id ranges, both inclusive

    @property
    def num_leading(self) -> int:
        """How many ids from 0 up are never masked: the masking kernel's `num_special`."""
        first = self.never_mask[0] if self.never_mask else (1, 0)
        return first[1] + 1 if first[0] == 0 else 0

    def never_mask_ids(self) -> list[int]:
        """The never-masked ids past the leading block (the kernel needs a table only for these)."""
        return [i for first, last in self.never_mask for i in range(max(first, self.num_leading), last + 1)]

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ("pad", "unk", "cls", "sep", "mask")}, "never_mask": self.never_mask}

    @classmethod
    def from_dict(cls, d: dict) -> SpecialTokens:
        return cls(**{**d, "never_mask": tuple(tuple(r) for r in d["never_mask"])})


DEFAULT_SPECIALS = SpecialTokens(PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, ((0, NUM_SPECIAL - 1),))


@dataclass
class TokenizerSettings:
    vocab_size: int = 30000
    limit_alphabet: int = 1000  # keep the N most frequent characters; rarer ones become [UNK]
    min_frequency: int = 2  # a merge must be seen this often to enter the vocabulary
    lowercase: bool = False
    strip_accents: bool = False  # NFD + drop marks: decomposes Hangul into jamo, keep off for Korean
    clean_text: bool = True  # drop control characters, map whitespace to spaces
    handle_chinese_chars: bool = True  # put spaces around CJK ideographs (hanja) so each is a word
    wordpieces_prefix: str = "##"
    model_max_length: int = 512  # written to tokenizer_config.json; the longest input the model takes

    def validate(self) -> None:
        if not NUM_SPECIAL < self.vocab_size <= MAX_VOCAB_SIZE:
            raise UserError(
                f"--vocab-size must be larger than {NUM_SPECIAL} (the special tokens) and at most "
                f"{MAX_VOCAB_SIZE:,}, got {self.vocab_size}."
            )
        if self.limit_alphabet < 1:
            raise UserError(f"--limit-alphabet must be at least 1, got {self.limit_alphabet}.")
        if self.min_frequency < 1:
            raise UserError(f"--min-frequency must be at least 1, got {self.min_frequency}.")
        if self.wordpieces_prefix != WORDPIECES_PREFIX:
            raise UserError(
                f"--wordpieces-prefix {self.wordpieces_prefix!r} is not supported: transformers' BertTokenizer "
                f"continues words with {WORDPIECES_PREFIX!r} whatever the tokenizer says, so every word of an "
                f"exported model split into pieces would read as [UNK]; keep {WORDPIECES_PREFIX!r}."
            )
        if not self.clean_text:
            raise UserError(
                "--no-clean-text is not supported: transformers' BertTokenizer rebuilds its normalizer with clean_text "
                "on whatever the tokenizer says (5.x), so an exported model would read text unlike in training."
            )
        if self.model_max_length < 3:
            raise UserError(f"--model-max-length must be at least 3 ([CLS] token [SEP]), got {self.model_max_length}.")


def build_tokenizer(settings: TokenizerSettings, vocab: dict[str, int] | None = None) -> Tokenizer:
    """The untrained pipeline, identical to what transformers' BertTokenizer builds from the config."""
    tok = Tokenizer(
        models.WordPiece(
            vocab or {},
            unk_token="[UNK]",
            continuing_subword_prefix=settings.wordpieces_prefix,
            max_input_chars_per_word=100,
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=settings.clean_text,
        handle_chinese_chars=settings.handle_chinese_chars,
        strip_accents=settings.strip_accents,  # explicit bool: None would mean "same as lowercase"
        lowercase=settings.lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=settings.wordpieces_prefix)
    return tok


def tokenizer_from_vocab(vocab: list[str], settings: TokenizerSettings | None = None) -> Tokenizer:
    """The tokenizer of a vocabulary made by a program (specials at ids 0-4), complete as training saves one."""
    tok = build_tokenizer(settings or TokenizerSettings(), {token: i for i, token in enumerate(vocab)})
    _add_post_processor(tok)
    return tok


def _add_post_processor(tok: Tokenizer) -> None:
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )


class _Stopped(Exception):
    """Ends tokenizers' reading of the corpus after a stop."""


def _train_stoppably(tok: Tokenizer, batches, trainer) -> None:
    """`tok.train_from_iterator` on a worker thread, waited for in the main thread, where Ctrl-C and SIGTERM act:
    tokenizers reads the corpus on its own threads and computes the merges without the GIL, so in the main thread
    a signal would wait for the whole training (minutes on a large corpus). After a stop the reading ends at its
    next batch; merges under way cannot be stopped: both are left to the program's exit (`stop.leave_running`).
    Nothing is written while it trains, so nothing is left half-done."""
    stopped, failed = threading.Event(), []

    def read():
        for batch in batches:
            if stopped.is_set():
                raise _Stopped
            yield batch

    def work():
        try:
            tok.train_from_iterator(read(), trainer=trainer)
        except BaseException as e:  # the reader's error (an unreadable input: a UserError), given back below
            failed.append(e)

    worker = threading.Thread(target=work, name="mlmtrain-tokenizer", daemon=False)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:  # a stop: the command's cleanups run now, not after the training
        stopped.set()  # the reading ends at its next batch
        leave_running(worker)
        raise
    if failed:
        raise failed[0]


def train_tokenizer(
    inputs, out_dir, settings: TokenizerSettings | None = None, *, overwrite: bool = False, progress: bool = True
) -> int:
    """Train on `inputs` (a Corpus, or text/jsonl/parquet files; read with the same robust reader as `prepare`)
    and write the tokenizer folder. Returns the real vocabulary size, which every later step must use: smaller than
    requested when the corpus has fewer pieces, larger when the kept alphabet alone exceeds the request."""
    settings = settings or TokenizerSettings()
    settings.validate()
    corpus = check_corpus(inputs, out_dir)
    out_dir = Path(out_dir)
    check_out_folder(out_dir, TOKENIZER_LAYOUT, replace=overwrite)
    if progress and not quiet():  # after the checks: a refusal is its one sentence alone
        print("settings: " + " ".join(f"{k}={v}" for k, v in asdict(settings).items()), file=sys.stderr)

    tok = build_tokenizer(settings)
    trainer = trainers.WordPieceTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        limit_alphabet=settings.limit_alphabet,
        special_tokens=SPECIAL_TOKENS,  # in this order: ids 0..4
        continuing_subword_prefix=settings.wordpieces_prefix,
        show_progress=progress and bars_enabled(),  # its own (Rust) bar ignores TQDM_DISABLE
    )
    char_counts: collections.Counter = collections.Counter()
    stats = {}

    def batches():
        for lines, _ in iter_line_batches(corpus, stats):
            text = [line for line in lines if line]  # "" marks a document break, not text
            char_counts.update("".join(text))  # Counter.update on a str counts in C
            yield text

    t0 = time.perf_counter()
    _train_stoppably(tok, batches(), trainer)
    seconds = time.perf_counter() - t0
    if not char_counts:
        source = corpus.dataset or ", ".join(map(str, corpus.files))
        raise UserError(f"no text found in {source}: every line was blank or unreadable.")

    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):  # every character dropped by the normalizer: nothing to learn
        source = corpus.dataset or ", ".join(map(str, corpus.files))
        raise UserError(
            f"no token but the special ones came out of {source}: its text is only characters the normalizer drops "
            "(control, zero-width or private-use characters); nothing was written."
        )
    vocab = tok.get_vocab()
    for i, token in enumerate(SPECIAL_TOKENS):
        assert vocab.get(token) == i, f"special token {token} is at id {vocab.get(token)}, expected {i}"
    _add_post_processor(tok)
    record = {
        "settings": asdict(settings),
        "inputs": corpus.describe(),
        "vocab_size": tok.get_vocab_size(),
    }
    with atomic_dir(out_dir, replace=overwrite, layout=TOKENIZER_LAYOUT) as tmp:
        write_tokenizer_dir(tok, tmp, settings)
        write_json(tmp / TOKENIZER_RECORD, record)

    vocab_size = tok.get_vocab_size()
    missing = unknown_characters(tok, char_counts, settings.wordpieces_prefix)
    if progress:
        print(f"trained a WordPiece vocabulary of {vocab_size} tokens in {seconds:.1f} s -> {out_dir}")  # the result
        if vocab_size != settings.vocab_size:
            why = (
                "the corpus supports no more" if vocab_size < settings.vocab_size else "every kept character is a token"
            )
            print(
                f"note: the vocabulary has {vocab_size} tokens, not the {settings.vocab_size} asked for ({why}); "
                f"{vocab_size} is the size every later step uses",
                file=sys.stderr,
            )
        if missing:
            n = sum(missing.values())
            print(
                f"note: {len(missing)} distinct characters ({n} occurrences) are outside limit_alphabet="
                f"{settings.limit_alphabet}: each word holding one reads as [UNK] whole (WordPiece cannot spell it); "
                "raise --limit-alphabet to keep them "
                f"(rarest: {''.join(sorted(missing, key=missing.get)[:20])})",
                file=sys.stderr,
            )
        hangul = sum(n for c, n in char_counts.items() if HANGUL_SYLLABLE.match(c))
        if settings.strip_accents and hangul:
            print(
                f"note: --strip-accents decomposes Hangul (NFD) before it drops marks: the corpus's {hangul:,} Hangul "
                "syllables became conjoining jamo, so this vocabulary spells Korean letter by letter; leave it off "
                "for Korean",
                file=sys.stderr,
            )
        for note in line_problem_notes(stats):
            print(f"note: {note}", file=sys.stderr)
    return vocab_size


def unknown_characters(tok: Tokenizer, char_counts: collections.Counter, prefix: str = "##") -> dict[str, int]:
    """Characters seen in training that the vocabulary cannot spell (neither `c` nor `##c`), with counts.
    Checked after normalization, since that is what the model sees."""
    vocab = tok.get_vocab()
    missing = {}
    for ch, n in char_counts.items():
        for c in tok.normalizer.normalize_str(ch):
            if not c.isspace() and c not in vocab and prefix + c not in vocab:
                missing[c] = missing.get(c, 0) + n
    return missing


def tokenizer_config(settings: TokenizerSettings) -> dict:
    """tokenizer_config.json: exactly what BertTokenizer reads. `strip_accents` is always a bool (`null` would
    make BertTokenizer follow `do_lower_case`)."""
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": settings.lowercase,
        "strip_accents": settings.strip_accents,
        "tokenize_chinese_chars": settings.handle_chinese_chars,
        "clean_up_tokenization_spaces": False,
        "model_max_length": settings.model_max_length,
        **SPECIAL_TOKENS_MAP,
    }


def write_tokenizer_dir(tok: Tokenizer, out_dir: Path, settings: TokenizerSettings) -> None:
    """Write the four files into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # what tok.save writes, but through Python's file API: a full disk is an OSError, not a bare Exception
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    vocab = tok.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in by_id] == list(range(len(by_id))), "vocabulary ids are not contiguous"
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in by_id), encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(settings))
    write_json(out_dir / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


# ---------------------------------------------------------------------------------------------- CLI


def main(args) -> int:
    settings = TokenizerSettings(
        vocab_size=args.vocab_size,
        limit_alphabet=args.limit_alphabet,
        min_frequency=args.min_frequency,
        lowercase=args.lowercase,
        strip_accents=args.strip_accents,
        clean_text=args.clean_text,
        handle_chinese_chars=args.handle_chinese_chars,
        wordpieces_prefix=args.wordpieces_prefix,
        model_max_length=args.model_max_length,
    )
    settings.validate()
    train_tokenizer(corpus_from_args(args), args.out, settings, overwrite=args.overwrite)  # --quiet: no bar, notes kept
    return 0
