"""`mlmtrain prepare`: a corpus (text, jsonl or parquet files, or a `datasets` dataset; see text.py) -> memory-mapped
token shards (the layout is in docs/ARCHITECTURE.md).

The pipeline, and why it looks like this:
- Read bytes in ~1 MiB blocks and decode a whole block at once; only a block that fails (invalid UTF-8,
  NUL bytes) is redone line by line. Clean input never pays a per-line Python cost to be checked.
- A background thread reads and decodes the next block while `encode_batch_fast` (Rust, all cores, GIL
  released) tokenizes this one, so the tokenizer is the bottleneck, not our code. Lines go to the
  tokenizer 64 at a time joined by " [SEP] " (`encode_lines`): one Encoding object per group instead of
  per line needs half the CPU time on sentence-length lines (2.0x less: docs/BENCHMARKS.md, bench_prepare).
  Threads, not processes: `tokenizers` disables its own parallelism in a process forked after it was
  used, so we never fork.
- Tokens go straight to disk (an .npy whose header is rewritten with the real length at the end); memory
  holds a few blocks (the reader runs up to 4 ahead, each batch about a block even when one row holds a
  book) and two split units, whatever the corpus size.
- Everything is written into a hidden temporary folder that is renamed into place at the end: a folder
  with meta.json is always complete.

The train/valid split is by *unit*: a document, cut into pieces of at most SPLIT_UNIT_SENTENCES sentences
(so a corpus without blank lines, i.e. one huge document, still splits). One uniform draw per unit from
`np.random.default_rng(seed)`, in corpus order: the same input and seed give the same split, whatever the
block size. Units of one document that land in the same split next to each other stay one document.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlmtrain.config import check_seed
from mlmtrain.corpus_check import check_corpus, corpus_from_args
from mlmtrain.errors import UserError
from mlmtrain.files import Layout, atomic_dir, check_out_folder, write_json
from mlmtrain.prefetch import Prefetcher
from mlmtrain.progress import bars_enabled
from mlmtrain.shard_check import check_meta, check_shard, damaged, open_npy
from mlmtrain.text import (
    LINE_PROBLEMS,
    LONG_LINE_BYTES,
    READ_BLOCK_BYTES,
    ROW_PROBLEMS,
    batches_of,
    iter_line_batches,
    line_problem_notes,
)
from mlmtrain.tokenizer import DEFAULT_SPECIALS, SEP_ID, SpecialTokens
from mlmtrain.tokenizer_folder import check_unchanged, load_tokenizer, read_special_tokens, tokenizer_fingerprint

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
SPLIT_UNIT_SENTENCES = 64  # a split unit is at most this many consecutive sentences of one document
MAX_SEQ_LEN = 1 << 16  # a longer --max-seq-len is a typo: BERT models take 512, long-context ones a few thousand
UNK_NOTE_SHARE = 0.01  # a larger share of [UNK] tokens is said: the tokenizer does not fit the text
SHARD_FILES = ("tokens", "offsets", "doc_offsets")
SHARDS_FILES = ("meta.json", *(f"{split}/{name}.npy" for split in SPLITS for name in SHARD_FILES))
SHARDS_LAYOUT = Layout("shards", "token shards", "mlmtrain prepare", SHARDS_FILES, SHARDS_FILES)


# ------------------------------------------------------------------------------------------ writing


class _NpyWriter:
    """A 1-D .npy written incrementally: fixed-size header first, rewritten with the real length on close."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER_BYTES)

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self.file.write(array.tobytes())
        self.count += array.size

    def close(self) -> None:
        header = f"{{'descr': '{self.dtype.str}', 'fortran_order': False, 'shape': ({self.count},), }}"
        header = header.ljust(self.HEADER_BYTES - 10 - 1) + "\n"  # magic(6) + version(2) + length(2)
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1"))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class _SplitWriter:
    """tokens / offsets / doc_offsets of one split, plus its counts."""

    def __init__(self, folder: Path, dtype, unk_id: int):
        folder.mkdir(parents=True)
        self.tokens = _NpyWriter(folder / "tokens.npy", dtype)
        self.offsets = _NpyWriter(folder / "offsets.npy", np.int64)
        self.doc_offsets = _NpyWriter(folder / "doc_offsets.npy", np.int64)
        self.offsets.write(np.zeros(1))
        self.doc_offsets.write(np.zeros(1))
        self.sentences = self.num_tokens = self.documents = self.unk_tokens = 0
        self.unk_id = unk_id
        self.min_len, self.max_len, self.max_token_id = None, 0, -1
        self.last_unit = (-1, -1)  # (document, unit index) of the last unit written

    def add_unit(self, doc: int, index: int, pieces: list[np.ndarray]) -> None:
        if self.last_unit != (doc, index - 1) and self.sentences > 0:  # a new document starts here
            self.doc_offsets.write(np.array([self.sentences]))
        self.documents += self.last_unit != (doc, index - 1)
        self.last_unit = (doc, index)
        lengths = np.fromiter(map(len, pieces), np.int64, count=len(pieces))
        tokens = np.concatenate(pieces)  # (sum(lengths),)
        self.tokens.write(tokens)
        self.offsets.write(self.num_tokens + np.cumsum(lengths))
        self.sentences += len(pieces)
        self.num_tokens += tokens.size
        self.unk_tokens += int(np.count_nonzero(tokens == self.unk_id))
        self.min_len = int(lengths.min()) if self.min_len is None else min(self.min_len, int(lengths.min()))
        self.max_len = max(self.max_len, int(lengths.max()))
        self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def close(self) -> dict:
        if self.sentences > 0:
            self.doc_offsets.write(np.array([self.sentences]))
        for w in (self.tokens, self.offsets, self.doc_offsets):
            w.close()
        return {
            "sentences": self.sentences,
            "tokens": self.num_tokens,
            "documents": self.documents,
            "max_sentence_len": self.max_len,
            "min_sentence_len": self.min_len or 0,
            "unk_tokens": self.unk_tokens,
        }


JOIN_LINES = 64  # lines per tokenizer input; a 1 MiB block (~8k lines) makes ~128 inputs for the cores
JOIN_CHARS = LONG_LINE_BYTES  # and at most about this many characters: an input's working memory grows with it


def encode_lines(tok, lines: list[str], dtype, sep_id: int = SEP_ID) -> list[np.ndarray]:
    """Token ids of each line (no [CLS]/[SEP]), as numpy arrays.

    Instead of one `Encoding` object per line (token strings, offsets, masks: half the CPU time on short
    sentences, docs/BENCHMARKS.md), lines are joined JOIN_LINES at a time (fewer where that would pass JOIN_CHARS) with
    " [SEP] " and encoded as one input per group, in one parallel `encode_batch_fast` call; the ids are then
    cut at the [SEP] ids. [SEP] is a
    special (added) token, so the text on each side is normalized and pre-tokenized on its own, exactly
    as if encoded alone (tests compare both ways). A group whose count of [SEP] ids is off (a line that
    contains the literal text "[SEP]") is encoded line by line instead."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster (tokenizers >= 0.20)
    groups = batches_of(lines, JOIN_CHARS, JOIN_LINES) if lines else []
    out = []
    for group, enc in zip(groups, encode([" [SEP] ".join(g) for g in groups], add_special_tokens=False)):
        ids = np.array(enc.ids, dtype=dtype)  # (tokens of the group + separators,)
        cuts = np.flatnonzero(ids == sep_id)  # (len(group) - 1,) if no line holds "[SEP]"
        if len(cuts) == len(group) - 1:
            starts = np.concatenate(([0], cuts + 1))
            ends = np.concatenate((cuts, [len(ids)]))
            out.extend(ids[a:b] for a, b in zip(starts.tolist(), ends.tolist()))
        else:
            out.extend(np.array(e.ids, dtype=dtype) for e in encode(group, add_special_tokens=False))
    return out


def split_long(ids, max_len: int) -> list:
    """Cut a sentence longer than max_len into the fewest consecutive pieces, of near-equal length (no
    3-token stub after a full piece)."""
    n = len(ids)
    if n <= max_len:
        return [ids]
    pieces = -(-n // max_len)
    bounds = [n * k // pieces for k in range(pieces + 1)]
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------------------------------ prepare


def prepare(
    inputs,
    tokenizer_dir,
    out_dir,
    valid_fraction: float = 0.01,
    max_seq_len: int = 128,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    block_bytes: int = READ_BLOCK_BYTES,
) -> dict:
    """Tokenize `inputs` (a Corpus, or text/jsonl/parquet files) into train/valid token shards in `out_dir`;
    returns meta.json's content."""
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in [0, 1), got {valid_fraction}.")
    if not 3 <= max_seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--max-seq-len must be from 3 ([CLS] token [SEP]) to {MAX_SEQ_LEN:,}, got {max_seq_len}.")
    check_seed("--seed", seed)
    corpus = check_corpus(inputs, out_dir)
    made_with = tokenizer_fingerprint(tokenizer_dir)  # before reading it: taken again before the shards are kept
    tok = load_tokenizer(tokenizer_dir)
    specials = read_special_tokens(tokenizer_dir)
    tok.no_truncation()
    tok.no_padding()
    out_dir = Path(out_dir)
    check_out_folder(out_dir, SHARDS_LAYOUT, replace=overwrite)
    total_bytes = corpus.total_bytes
    t0 = time.perf_counter()
    with atomic_dir(out_dir, replace=overwrite, layout=SHARDS_LAYOUT) as tmp:
        stats = _write_splits(
            tmp, corpus, tok, specials, valid_fraction, max_seq_len, seed, block_bytes, total_bytes, progress
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": tok.get_vocab_size(),
            "tokenizer_fingerprint": made_with,
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "special_tokens": specials.to_dict(),
            "max_seq_len": max_seq_len,
            "seed": seed,
            "valid_fraction": valid_fraction,
            **stats,
            "inputs": corpus.describe(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / "meta.json", meta)
        check_unchanged(tokenizer_dir, made_with, "prepare")
    if progress:
        _report(meta, out_dir, total_bytes)
    return meta


def _write_splits(tmp, corpus, tok, specials, valid_fraction, max_seq_len, seed, block_bytes, total_bytes, progress):
    """Stream the inputs through the tokenizer into tmp/train and tmp/valid; returns meta.json's statistics."""
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    max_piece = max_seq_len - 2
    stats: dict = {"sentences_split": 0, "lines_empty_after_tokenizing": 0}
    histogram = np.zeros(1, np.int64)  # histogram[n] = sentences of n tokens, up to the longest
    rng = np.random.default_rng(seed)  # one draw per split unit, in corpus order
    writers = {name: _SplitWriter(tmp / name, dtype, specials.unk) for name in SPLITS}
    doc, unit_index, unit, lines_done = 0, 0, [], 0  # current document, index of the current unit, its pieces
    held = None  # the last train unit, held back so that valid is never left empty when it should not be

    def close_unit():
        nonlocal unit, unit_index, held, histogram
        if not unit:
            return
        item = (doc, unit_index, unit)
        counts = np.bincount([len(p) for p in unit], minlength=len(histogram))
        histogram = np.pad(histogram, (0, len(counts) - len(histogram))) + counts
        if rng.random() < valid_fraction:
            writers["valid"].add_unit(*item)
        else:
            if held is not None:
                writers["train"].add_unit(*held)
            held = item
        unit, unit_index = [], unit_index + 1

    bar = _progress_bar(total_bytes, progress)
    t0 = time.perf_counter()
    # the bar closes on an error too, so the error's sentence gets a line of its own
    with Prefetcher(iter_line_batches(corpus, stats, block_bytes), name="reader") as reader, bar or nullcontext():
        for lines, nbytes in reader:
            encodings = iter(encode_lines(tok, [line for line in lines if line], dtype, specials.sep))
            for line in lines:
                if not line:  # document break
                    close_unit()
                    doc += 1
                    continue
                ids = next(encodings)
                if not len(ids):  # e.g. only control characters
                    stats["lines_empty_after_tokenizing"] += 1
                    continue
                if len(ids) > max_piece:
                    stats["sentences_split"] += 1
                for piece in split_long(ids, max_piece):
                    unit.append(piece)
                    if len(unit) == SPLIT_UNIT_SENTENCES:
                        close_unit()
            lines_done += len(lines)
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix_str(f"{lines_done / (time.perf_counter() - t0):,.0f} lines/s", refresh=False)
    close_unit()
    if held is not None:
        valid_starved = valid_fraction > 0 and writers["valid"].sentences == 0 and writers["train"].sentences > 0
        writers["valid" if valid_starved else "train"].add_unit(*held)
    split_meta = {name: w.close() for name, w in writers.items()}
    if split_meta["train"]["sentences"] == 0 and split_meta["valid"]["sentences"] > 0:
        raise UserError(
            f"every split unit of the corpus ({unit_index:,}) was drawn into valid, leaving train empty: lower "
            f"--valid-fraction (now {valid_fraction}) or pass more text."
        )
    if split_meta["train"]["sentences"] == 0:
        raise UserError(
            "no sentences left after tokenizing; check that the inputs are text in the tokenizer's language."
        )
    return {
        "dtype": np.dtype(dtype).name,
        "max_token_id": max(w.max_token_id for w in writers.values()),
        **split_meta,
        "length_histogram": histogram.tolist(),
        "lines_skipped": stats["invalid_utf8"] + stats["nul_bytes"] + sum(stats[k] for k in ROW_PROBLEMS),
        "lines_repaired": stats["crlf"] + stats["bom"],
        "line_problems": {k: stats[k] for k in LINE_PROBLEMS},
        "row_problems": {k: stats[k] for k in ROW_PROBLEMS},
        "input_lines": stats["input_lines"],
        "sentences_split": stats["sentences_split"],
        "lines_empty_after_tokenizing": stats["lines_empty_after_tokenizing"],
        "long_line_cuts": stats["long_line_cuts"],
        "decomposed_hangul_lines": stats["decomposed_hangul"],
        "other_break_lines": stats["other_breaks"],  # lines holding U+2028, U+2029, NEL, VT or FF: one sentence each
        "cp949_lines": stats["cp949"],  # of the lines skipped for invalid UTF-8, those that read as CP949 Korean
    }


def _progress_bar(total_bytes: int, enabled: bool):
    if not (enabled and bars_enabled()):
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, mininterval=0.5)


def _report(meta: dict, out_dir: Path, total_bytes: int | None) -> None:
    """The result line on stdout, the notes on stderr."""
    tr, va, s = meta["train"], meta["valid"], meta["seconds"]
    speed = f"{total_bytes / 1e6 / s:.1f} MB/s, " if total_bytes is not None else ""
    print(
        f"wrote {out_dir}: train {tr['sentences']:,} sentences / {tr['tokens']:,} tokens, valid "
        f"{va['sentences']:,} / {va['tokens']:,} ({meta['dtype']}, {speed}{meta['input_lines'] / s:,.0f} lines/s)"
    )
    for note in data_notes(meta):
        print(f"note: {note}", file=sys.stderr)


def unk_share(meta: dict) -> tuple[float, int]:
    """(share of [UNK] in a shard folder's tokens, their count), from its meta.json."""
    splits = [meta.get(k) or {} for k in ("train", "valid")]
    unk, tokens = (sum(s.get(k) or 0 for s in splits) for k in ("unk_tokens", "tokens"))
    return (unk / tokens if tokens else 0.0), unk


def data_notes(meta: dict) -> list[str]:
    """What a user should know of the text behind a shard folder's meta.json: the [UNK] share, the lines skipped,
    repaired or cut, sentences split (`eval --input` says the same of the text it scores)."""
    va, notes = meta["valid"], []
    share, unk = unk_share(meta)
    if share > UNK_NOTE_SHARE:
        notes.append(
            f"{share:.1%} of the tokens ({unk:,}) are [UNK]: the tokenizer does not know much of this text "
            "(another script or language, or another Unicode normalization than it was trained on)"
        )
    problems = {**meta["line_problems"], **meta["row_problems"], "decomposed_hangul": meta["decomposed_hangul_lines"]}
    notes += line_problem_notes(
        {**problems, "cp949": meta.get("cp949_lines", 0), "other_breaks": meta.get("other_break_lines", 0)}
    )
    if cuts := meta["long_line_cuts"]:
        notes.append(
            f"lines longer than {LONG_LINE_BYTES >> 20} MiB were cut {cuts} time{'s' * (cuts != 1)}, at spaces where "
            "there were any; each piece is read as a sentence"
        )
    if meta["sentences_split"]:
        notes.append(
            f"{meta['sentences_split']} {'sentence' if meta['sentences_split'] == 1 else 'sentences'} longer than "
            f"{meta['max_seq_len'] - 2} tokens {'was' if meta['sentences_split'] == 1 else 'were'} split into "
            "consecutive pieces"
        )
    if meta["valid_fraction"] > 0 and va["sentences"] == 0:
        notes.append("the valid split is empty (the corpus has a single split unit)")
    return notes


# ------------------------------------------------------------------------------------------ loading


@dataclass
class TokenShard:
    """One split, memory-mapped. Sentence i is tokens[offsets[i]:offsets[i+1]]; document j is sentences
    doc_offsets[j]:doc_offsets[j+1]."""

    tokens: np.ndarray  # (num_tokens,) uint16 | uint32
    offsets: np.ndarray  # (num_sentences + 1,) int64
    doc_offsets: np.ndarray  # (num_documents + 1,) int64

    @property
    def num_sentences(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def sentence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def shard_specials(meta: dict) -> SpecialTokens:
    """The special-token layout the shards were made with (shards that do not record it were made with ids 0-4,
    the only layout read then)."""
    return SpecialTokens.from_dict(meta["special_tokens"]) if "special_tokens" in meta else DEFAULT_SPECIALS


def read_meta(data_dir) -> dict:
    """meta.json of a shard folder, checked for the keys and types every reader relies on."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir} {'is a file, not' if Path(data_dir).exists() else 'does not exist: pass'} a "
                        "folder of token shards (`mlmtrain prepare` makes one).")  # fmt: skip
    if not path.is_file():
        raise UserError(f"{data_dir} holds no token shards (no meta.json); make them with `mlmtrain prepare`.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{data_dir} has shard format {meta.get('format_version')}, this mlmtrain reads "
            f"{FORMAT_VERSION}; run `mlmtrain prepare` again."
        )
    check_meta(meta, path, SPLITS)
    return meta


def load_split(data_dir, split: str = "train", check: bool = True) -> TokenShard:
    """One split, memory-mapped. With `check` (once per run is enough), the files are checked cheaply against
    their headers, meta.json and each other (`shard_check`); one sentence names a damaged file."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}.")
    meta = read_meta(data_dir)
    folder = Path(data_dir) / split
    dtypes = {"tokens": np.dtype(meta["dtype"]), "offsets": np.dtype(np.int64), "doc_offsets": np.dtype(np.int64)}
    shard = TokenShard(**{name: open_npy(folder / f"{name}.npy", dtypes[name]) for name in SHARD_FILES})
    if check:
        check_shard(
            shard.tokens, shard.offsets, shard.doc_offsets, meta[split], meta["vocab_size"], meta["max_seq_len"], folder
        )
    return shard


def check_tokenizer_match(made_with: str | None, tokenizer_dir, what: str, shards: bool = True) -> None:
    """Refuse a tokenizer other than the one `what` was made with (`made_with`: its fingerprint): the same ids
    would mean other tokens, and the model would decode garbage without any error. `shards`: `what` is token
    shards, which `prepare` can make again with this tokenizer (a trained model cannot be)."""
    if made_with and made_with != tokenizer_fingerprint(tokenizer_dir):
        redo = ", or run `mlmtrain prepare` again with this one" if shards else ""
        raise UserError(
            f"{what} was made with another tokenizer than {tokenizer_dir} (fingerprint {made_with[:12]}): pass "
            f"the tokenizer folder it was made with{redo}."
        )


# ---------------------------------------------------------------------------------------------- CLI


def main(args) -> int:
    from mlmtrain.pretrained import locate

    prepare(
        corpus_from_args(args),
        locate(args.tokenizer, "tokenizer", tokenizer_only=True),
        args.out,
        valid_fraction=args.valid_fraction,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        overwrite=args.overwrite,
    )  # the result and the notes under --quiet too: it drops the bar (bars_enabled)
    return 0
