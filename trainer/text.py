"""Reading corpora: text files (`.gz` decompressed on the fly), JSON lines (`.jsonl`, `.jsonl.gz`), parquet
files and `datasets` datasets (the row formats are read by corpus_rows.py), with every line or row problem counted,
never fatal. Both `mlmtrain tokenizer` and `mlmtrain prepare` read their input through `iter_line_batches`, so
they see the same lines.

- Text: bytes are read in ~1 MiB blocks and a whole block is decoded at once; only a block that fails (invalid
  UTF-8, NUL bytes) is redone line by line, skipping the bad lines. Clean input never pays a per-line Python
  cost to be checked. One sentence per line; a blank line (or the end of a file) ends a document.
- Rows (jsonl, parquet, a dataset): one row's text column is one sentence (a text holding line breaks gives
  one sentence per line); an empty row, a change of `doc_column`'s value, or the end of a file ends a
  document. The same text as rows or as lines gives the same lines, so the same shards.
- A line longer than LONG_LINE_BYTES (a file without line breaks, a row holding a whole book) is cut after a
  space into pieces of about that size, each yielded as a line: memory stays bounded, and the tokens are the
  same, since the tokenizer splits words at spaces anyway (only a piece without any space is cut inside a
  word). A text file is cut as it is read, so such a line is never held whole; where each cut falls depends
  only on the line, so a text file and the same text as rows still give the same lines.
  A blank piece of a cut line is dropped: only a whole blank line ends a document.
- A document break is yielded as "". CR line endings and a byte-order mark are repaired; lines with invalid
  UTF-8 or NUL bytes, rows that are not JSON objects, lack the column, or hold a null or a non-string are
  skipped; the counts go to `stats` (keys of LINE_PROBLEMS and ROW_PROBLEMS) and `line_problem_notes` says them
  in words. An input of which half the non-blank lines or more are invalid UTF-8 is refused: it is in another
  encoding. What is refused before any reading (formats, a file's start in another encoding): corpus_check.py.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from mlmtrain.corpus_rows import (
    FILE_END,
    ROW_PROBLEMS,
    Rows,
    dataset_batches,
    jsonl_batches,
    parquet_batches,
    unreadable,
)
from mlmtrain.errors import UserError

READ_BLOCK_BYTES = 1 << 20  # bytes decoded (and tokenized) per batch
LONG_LINE_BYTES = 1 << 20  # a longer line is cut into pieces of about this size
MAX_ROW_BYTES = 64 << 20  # a JSON line longer than this is not one row per line
LINE_PROBLEMS = {  # stats key -> (skipped or repaired, what)
    "invalid_utf8": ("skipped", "invalid UTF-8"),
    "nul_bytes": ("skipped", "NUL bytes"),
    "crlf": ("repaired", "CR (Windows/old Mac) line endings"),
    "bom": ("repaired", "a UTF-8 byte-order mark"),
}
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # compared in lower case, as every suffix
GZIP_MAGIC = b"\x1f\x8b"  # read as gzip whatever the file's name
NOT_UTF8 = (  # half the lines or more of a file (or of its start) not UTF-8
    "{invalid:,} lines {where} are not valid UTF-8 (and {valid:,} are): it is probably in another encoding (CP949/"
    "EUC-KR, Latin-1); convert it to UTF-8 first, e.g. `iconv -f cp949 -t utf-8 IN > OUT` (`gzip -dc IN | iconv ...` "
    "for a .gz file)."
)
# Hangul written as conjoining jamo (NFD: a syllable as 2-3 letters) is other characters than the syllables
# (NFC) Korean text and tokenizers use; kept as it is (the shards are what the tokenizer gives), but said.
CONJOINING_JAMO = re.compile("[\u1100-\u11ff]")
HANGUL_SYLLABLE = re.compile("[\uac00-\ud7a3]")  # the composed (NFC) syllables
# Line breaks elsewhere that are not one here: a line holding them is one sentence (the tokenizer reads them as spaces)
OTHER_BREAKS = re.compile("[\u2028\u2029\x85\x0b\x0c]")  # line and paragraph separators, NEL, VT, FF


def sample_corpus_path() -> Path:
    """The bundled sample corpus (Korean + English, public domain; see assets/SOURCES.md)."""
    return Path(__file__).resolve().parent / "assets" / "sample_corpus.txt"


@dataclass
class Corpus:
    """Where the sentences come from: files (text, jsonl, parquet, in order), or one `datasets` dataset."""

    files: list[Path] = field(default_factory=list)
    dataset: str | None = None  # a Hub dataset name or a local folder, read with `datasets` (streaming)
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"  # rows: the column holding the sentence
    doc_column: str | None = None  # rows: a change of its value starts a new document

    @property
    def total_bytes(self) -> int | None:
        """Bytes the progress bar counts to; None for a dataset (its size is not known ahead)."""
        return None if self.dataset else sum(map(_size, self.files))

    def describe(self) -> list[dict]:
        """The inputs as meta.json records them."""
        if self.dataset:
            return [{"dataset": self.dataset, "config": self.dataset_config, "split": self.split, **self._columns()}]
        return [
            {"path": str(p.resolve()), "bytes": _size(p), **(self._columns() if _is_rows(p) else {})}
            for p in self.files
        ]

    def _columns(self) -> dict:
        return {"text_column": self.text_column, "doc_column": self.doc_column}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:  # gone since it was checked
        raise unreadable(path, e) from None


def _is_rows(path: Path) -> bool:
    return path.name.lower().endswith(ROW_SUFFIXES)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


# ------------------------------------------------------------------------------------------ reading


def _decode_block(block: bytes, stats: dict) -> list[str]:
    """Bytes ending at a line break -> lines. Fast path: one decode for the whole block."""
    if b"\r" in block:
        stats["crlf"] += block.count(b"\r")
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"\0" not in block:
        try:
            return block.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
    lines = []  # slow path: find the bad lines, skip them, keep the rest
    for raw in block.split(b"\n"):
        if b"\0" in raw:
            stats["nul_bytes"] += 1
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats["invalid_utf8"] += 1
            korean = raw.decode("cp949", "replace")  # the commonest other encoding here, counted for the note
            stats["cp949"] += "\ufffd" not in korean and HANGUL_SYLLABLE.search(korean) is not None
    return lines


def _open_binary(path: Path):
    """(stream of decompressed bytes, raw file for progress). A `.gz` or gzip file is decompressed on the fly."""
    try:
        raw = open(path, "rb")
        gz = path.name.lower().endswith(".gz") or raw.read(2) == GZIP_MAGIC
        raw.seek(0)
    except OSError as e:
        raise unreadable(path, e) from None
    return (gzip.GzipFile(fileobj=raw, mode="rb"), raw) if gz else (raw, raw)


def iter_line_batches(inputs, stats: dict, block_bytes: int = READ_BLOCK_BYTES):
    """Yield (lines, input_bytes_read) per block of `inputs` (a Corpus, or a list of paths). A blank line or
    an empty row is returned as "" (a document break); each file or dataset ends with one. Per-line and
    per-row problems are counted in `stats`."""
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(files=[Path(p) for p in inputs])
    counts = ("input_lines", "long_line_cuts", "decomposed_hangul", "cp949", "other_breaks")
    for key in (*LINE_PROBLEMS, *ROW_PROBLEMS, *counts):
        stats.setdefault(key, 0)
    sources = [(corpus.dataset, dataset_batches(corpus, block_bytes))] if corpus.dataset else []
    for path in corpus.files:
        if _is_parquet(path):
            sources.append((path, parquet_batches(path, corpus, block_bytes)))
        elif _is_rows(path):
            text_batches = _text_batches(path, stats, block_bytes, cut_long_lines=False)
            sources.append((path, jsonl_batches(text_batches, path, corpus, stats)))
        else:
            sources.append((path, _text_batches(path, stats, block_bytes)))
    for source, batches in sources:
        text_lines, invalid_before = 0, stats["invalid_utf8"]
        for lines, nbytes in batches:
            if lines is FILE_END:  # one data file of a dataset: a document boundary, not an input line
                yield [""], nbytes
                continue
            if isinstance(lines, Rows):  # row values: checked and split into lines here
                lines = lines.to_lines(stats)
            # a batch of rows may hold many blocks' worth of text (a row holding a book, cut into 1 MiB lines):
            # it goes on in batches of a block's size, so the tokenizer never holds more than a block at once
            for part in batches_of(_cut_long_lines(lines, stats), block_bytes):
                stats["input_lines"] += len(part)
                joined = "".join(part)
                for key, pattern in (("decomposed_hangul", CONJOINING_JAMO), ("other_breaks", OTHER_BREAKS)):
                    if pattern.search(joined):  # rare: only then a look at each line
                        stats[key] += sum(1 for line in part if pattern.search(line))
                part = ["" if line.isspace() else line for line in part]
                text_lines += sum(1 for line in part if line)
                yield part, nbytes
                nbytes = 0
        invalid = stats["invalid_utf8"] - invalid_before
        if invalid and invalid >= text_lines:
            raise UserError(NOT_UTF8.format(invalid=invalid, where=f"of {source}", valid=text_lines))
        if text_lines == 0:
            raise UserError(_no_text_message(source, corpus, stats))
        yield [""], 0  # a file boundary is a document boundary


def batches_of(lines: list[str], max_chars: int, max_lines: int | None = None) -> list[list[str]]:
    """`lines` as consecutive batches of at most `max_chars` characters (a longer line alone) and `max_lines`
    lines; no lines are one empty batch."""
    if sum(map(len, lines)) <= max_chars:  # the common case, without a Python step per line
        step = max_lines or len(lines) or 1
        return [lines[i : i + step] for i in range(0, len(lines) or 1, step)]
    batches, start, size = [], 0, 0
    for i, line in enumerate(lines):
        if i > start and (size + len(line) > max_chars or i - start == max_lines):
            batches.append(lines[start:i])
            start, size = i, 0
        size += len(line)
    return batches + [lines[start:]]


def _no_text_message(source, corpus: Corpus, stats: dict) -> str:
    if stats["missing_column"]:
        return (
            f"{source} has no text in a column named {corpus.text_column!r} ({stats['missing_column']} rows lack "
            "it); pass --text-column NAME."
        )
    bad = stats["invalid_utf8"] + stats["nul_bytes"] + sum(stats[k] for k in ROW_PROBLEMS)
    why = f" ({bad} unreadable lines or rows so far were skipped)" if bad else ""
    if corpus.dataset or _is_rows(Path(str(source))):
        return f"{source} contains no text rows{why}; expected a column {corpus.text_column!r} of strings."
    return f"input file {source} contains no text lines{why}; expected UTF-8, one sentence per line."


def _long_line_cut(data: bytes | str, limit: int) -> int:
    """Where to cut a line longer than `limit`: after its last space or tab before `limit` (in the second half,
    so pieces stay large), else at `limit`, moved back to a character boundary in UTF-8 bytes."""
    blank, tab = (b" ", b"\t") if isinstance(data, bytes) else (" ", "\t")
    space = max(data.rfind(blank, 0, limit), data.rfind(tab, 0, limit))
    if space >= limit // 2:
        return space + 1
    cut = limit
    while isinstance(data, bytes) and cut > 1 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return cut


def _cut_long_lines(lines: list[str], stats: dict) -> list[str]:
    """`lines` with each line longer than LONG_LINE_BYTES (UTF-8) cut into pieces by the rule a text file is
    cut by as it is read (`_text_batches`): the same line gives the same pieces, however it arrived."""
    if all(len(line) <= LONG_LINE_BYTES // 4 for line in lines):  # no character takes more than 4 bytes
        return lines
    out = []
    for line in lines:
        data = line.encode("utf-8") if len(line) > LONG_LINE_BYTES // 4 else b""
        if len(data) <= LONG_LINE_BYTES:
            out.append(line)
            continue
        pieces = []
        while len(data) > LONG_LINE_BYTES:
            cut = _long_line_cut(data, LONG_LINE_BYTES)
            pieces.append(data[:cut].decode("utf-8"))
            data = data[cut:]
            stats["long_line_cuts"] += 1
        kept = [piece for piece in pieces if not piece.isspace()]  # blank pieces: no text, and no document break
        last = data.decode("utf-8")
        kept += [last] if not last.isspace() or not kept else []
        stats["input_lines"] -= len(kept) - 1  # a line cut into pieces still counts once
        out += kept
    return out


def _last_line_end(block: bytes) -> int:
    """Where the block's last complete line ends: after its last LF, or after a later CR (classic Mac endings)
    unless that CR is the block's last byte, where the next block may start with the LF of a CRLF."""
    return max(block.rfind(b"\n"), block.rfind(b"\r", 0, len(block) - 1)) + 1


def _text_batches(path: Path, stats: dict, block_bytes: int, cut_long_lines: bool = True):
    """(lines, raw bytes read) per block of a text file; the lines come back decoded and repaired. A line
    longer than LONG_LINE_BYTES comes in pieces, cut as it is read (`cut_long_lines`; a JSON row is kept
    whole, up to MAX_ROW_BYTES)."""
    stream, raw = _open_binary(path)
    carry, first, pos = b"", True, 0
    kept = None  # pieces kept of the line being cut, whose rest (its tail) is the next line to come
    with stream, raw:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise unreadable(path, e, gz=stream is not raw) from None
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk, stats["bom"] = chunk[3:], stats["bom"] + 1
            first = False
            block = carry + chunk
            cut = _last_line_end(block) if chunk else len(block)
            block, carry = block[:cut], block[cut:]
            if kept is not None and block:
                block = _drop_blank_tail(block, kept, stats)
                kept = None
            pieces = []  # of a line too long to hold: each yielded as a line (the rest by `_cut_long_lines`)
            while cut_long_lines and len(carry) > LONG_LINE_BYTES:
                piece = _long_line_cut(carry, LONG_LINE_BYTES)
                pieces.append(carry[:piece])
                carry = carry[piece:]
                stats["long_line_cuts"] += 1
            if len(carry) > MAX_ROW_BYTES:
                raise UserError(f"{path} has a line longer than {MAX_ROW_BYTES >> 20} MiB; expected one row per line.")
            lines = _decode_block(block, stats) if block else []
            if lines and lines[-1] == "" and block.endswith((b"\n", b"\r")):
                lines.pop()  # the split after the final "\n" is not a line
            for piece in pieces:
                kept = kept or 0
                for line in _decode_block(piece, stats):
                    if not line.isspace():  # a blank piece: no text, and no document break
                        lines.append(line)
                        kept += 1
                        stats["input_lines"] -= 1  # the line's pieces count once, with its last one
            if lines or pieces:
                now = raw.tell()
                yield lines, now - pos
                pos = now
            if not chunk:
                break


def _drop_blank_tail(block: bytes, kept: int, stats: dict) -> bytes:
    """`block` without its first line, the tail of a line cut into pieces, where that tail is blank and a piece
    was kept: a blank piece is no document break (as `_cut_long_lines` drops it)."""
    end = min((i for i in (block.find(b"\n"), block.find(b"\r")) if i >= 0), default=len(block))
    if not kept or block[:end].decode("utf-8", "replace").strip():
        return block
    stats["input_lines"] += 1  # the tail was to count the line
    stats["crlf"] += block[end : end + 1] == b"\r"  # the line break goes with it
    return block[end + (2 if block[end : end + 2] == b"\r\n" else 1) :]


def line_problem_notes(stats: dict) -> list[str]:
    """One line per kind of line or row problem found, e.g. "3 lines with invalid UTF-8 skipped"."""

    def lines(n: int, noun: str = "line") -> str:
        return f"{n} {noun}{'s' * (n != 1)}"

    notes = [f"{lines(stats[k])} with {what} {verb}" for k, (verb, what) in LINE_PROBLEMS.items() if stats.get(k)]
    if stats.get("cp949"):
        notes.append(
            f"{stats['cp949']:,} of the lines skipped for invalid UTF-8 read as Korean in CP949/EUC-KR: if the file "
            "mixes encodings, convert those lines to UTF-8 first (e.g. `iconv -f cp949 -t utf-8`), or they are lost"
        )
    notes += [f"{lines(stats[k], 'row')} with {what} skipped" for k, what in ROW_PROBLEMS.items() if stats.get(k)]
    if stats.get("decomposed_hangul"):
        n = stats["decomposed_hangul"]
        notes.append(
            f"{lines(n)} {'holds' if n == 1 else 'hold'} decomposed Hangul (conjoining jamo U+1100-U+11FF, as NFD "
            "text has), read as they are: a tokenizer trained on ordinary (NFC) Korean reads them as [UNK], and "
            "one trained on them reads NFC Korean as [UNK]; normalize it to NFC (unicodedata.normalize('NFC', "
            "text)) first"
        )
    if n := stats.get("other_breaks"):
        notes.append(
            f"{lines(n)} {'holds' if n == 1 else 'hold'} line or paragraph separators that are no line break here "
            "(U+2028, U+2029, NEL, VT, FF): each such line is read as one sentence; replace them with newlines to "
            "split it"
        )
    return notes
