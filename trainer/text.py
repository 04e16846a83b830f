"""Reading corpora: text files (`.gz` decompressed on the fly), decoded in blocks, with every line problem
counted, never fatal. Both `mlmtrain tokenizer` and `mlmtrain prepare` read their input through
`iter_line_batches`, so they see the same lines.

- Bytes are read in ~1 MiB blocks and a whole block is decoded at once; only a block that fails (invalid
  UTF-8, NUL bytes) is redone line by line, skipping the bad lines. Clean input never pays a per-line
  Python cost to be checked.
- One sentence per line; a blank line (or the end of a file) ends a document: it is yielded as "".
- A line longer than LONG_LINE_BYTES (a file without line breaks, say) is cut after a space into pieces of
  about that size, each yielded as a line: memory stays bounded, and the tokens are the same, since the
  tokenizer splits words at spaces anyway (only a piece without any space is cut inside a word).
- CR line endings and a byte-order mark are repaired; invalid UTF-8 and NUL lines are skipped; the counts go
  to `stats` (keys of LINE_PROBLEMS) and `line_problem_notes` says them in words.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from mlmtrain.errors import UserError

READ_BLOCK_BYTES = 1 << 20  # bytes decoded (and tokenized) per batch
LONG_LINE_BYTES = 1 << 20  # a longer line is cut into pieces of about this size
LINE_PROBLEMS = {  # stats key -> (skipped or repaired, what)
    "invalid_utf8": ("skipped", "invalid UTF-8"),
    "nul_bytes": ("skipped", "NUL bytes"),
    "crlf": ("repaired", "CR (Windows/old Mac) line endings"),
    "bom": ("repaired", "a UTF-8 byte-order mark"),
}


def sample_corpus_path() -> Path:
    """The bundled sample corpus (Korean + English, public domain; see assets/SOURCES.md)."""
    return Path(__file__).resolve().parent / "assets" / "sample_corpus.txt"


# ------------------------------------------------------------------------------------------ reading


def check_inputs(inputs) -> list[Path]:
    """Every input must be an existing, non-empty regular file: say which one is not, and why."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files given (--input FILE [FILE ...]).")
    for path in paths:
        if not path.exists():
            raise UserError(f"input file {path} does not exist.")
        if path.is_dir():
            raise UserError(f"input {path} is a directory; pass the text files inside it (e.g. {path}/*.txt).")
        if not path.is_file():
            raise UserError(f"input {path} is not a regular file.")
        if path.stat().st_size == 0:
            raise UserError(f"input file {path} is empty.")
    return paths


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
    return lines


def _open_binary(path: Path):
    """(stream of decompressed bytes, raw file for progress). `.gz` is decompressed on the fly."""
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _long_line_cut(data: bytes) -> int:
    """Where to cut a line longer than LONG_LINE_BYTES: after its last space or tab in the first LONG_LINE_BYTES
    (in its second half, so pieces stay large), else at the last character boundary there."""
    limit = LONG_LINE_BYTES
    space = max(data.rfind(b" ", 0, limit), data.rfind(b"\t", 0, limit))
    if space >= limit // 2:
        return space + 1
    cut = limit
    while cut > 1 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: inside a character
        cut -= 1
    return cut


def _line_blocks(stream, path: Path, block_bytes: int, stats: dict):
    """(bytes, ends_line) pieces of a stream: blocks of whole lines, or pieces of a line too long to hold."""
    carry, first, cutting = b"", True, False
    while True:
        try:
            chunk = stream.read(block_bytes)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise UserError(f"cannot read {path}: {e} (is it really a gzip file?)") from None
        if first and chunk.startswith(b"\xef\xbb\xbf"):
            chunk, stats["bom"] = chunk[3:], stats["bom"] + 1
        first = False
        if not chunk:
            if carry:
                yield carry, True
            return
        block = carry + chunk
        cut = block.rfind(b"\n") + 1
        if cut:
            yield block[:cut], True
            cutting = False
        carry = block[cut:]
        while len(carry) > LONG_LINE_BYTES:
            stats["long_lines_cut"] += not cutting
            cutting = True
            piece = _long_line_cut(carry)
            yield carry[:piece], False
            carry = carry[piece:]


def iter_line_batches(paths: list[Path], stats: dict, block_bytes: int = READ_BLOCK_BYTES):
    """Yield (lines, raw_bytes_read) per block. A blank or whitespace-only line is returned as "" (a
    document break); each file ends with one. Per-line problems are counted in `stats`."""
    for key in (*LINE_PROBLEMS, "input_lines", "long_lines_cut"):
        stats.setdefault(key, 0)
    for path in paths:
        stream, raw = _open_binary(path)
        text_lines, pos = 0, 0
        with stream, raw:
            for block, ends_line in _line_blocks(stream, path, block_bytes, stats):
                lines = _decode_block(block, stats)
                if lines and lines[-1] == "" and block.endswith(b"\n"):
                    lines.pop()  # the split after the final "\n" is not a line
                stats["input_lines"] += len(lines) - (not ends_line)  # a long line's pieces count once
                lines = ["" if line.isspace() else line for line in lines]
                text_lines += sum(1 for line in lines if line)
                now = raw.tell()
                yield lines, now - pos
                pos = now
        if text_lines == 0:
            bad = stats["invalid_utf8"] + stats["nul_bytes"]
            why = f" ({bad} unreadable lines so far were skipped)" if bad else ""
            raise UserError(f"input file {path} contains no text lines{why}; expected UTF-8, one sentence per line.")
        yield [""], 0  # a file boundary is a document boundary


def line_problem_notes(stats: dict) -> list[str]:
    """One line per kind of problem found, e.g. "3 lines with invalid UTF-8 skipped"."""
    return [f"{stats[key]} lines with {what} {verb}" for key, (verb, what) in LINE_PROBLEMS.items() if stats.get(key)]
