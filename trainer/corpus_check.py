"""What a corpus must be before anything reads it: every input an existing, readable, non-empty regular file,
named once, in a format that is read (`.gz` text, `.jsonl`, `.parquet`; bzip2, xz, zstd, zip, tar and parquet under
another name are refused by their first bytes, ISO-2022-KR text by its designator), whose start is UTF-8 (half the
lines of its first 64 KiB or more not UTF-8: refused, as reading refuses a whole file); and the corpus flags
`tokenizer`, `prepare` and `eval` share. A mistake is one sentence before any work (text.py reads what passes)."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

from mlmtrain.corpus_rows import import_pyarrow, unreadable
from mlmtrain.errors import UserError
from mlmtrain.text import GZIP_MAGIC, LINE_PROBLEMS, NOT_UTF8, Corpus, _decode_block, _is_parquet, _is_rows

SNIFF_BYTES = 1 << 16  # the (decompressed) start of each input checked before any work: format and encoding
NOT_TEXT = (  # (first bytes, what the file is, what to do): formats that read as text would give garbage
    (rb"BZh[1-9](1AY&SY|\x17rE8P\x90)", "bzip2-compressed", "decompress it (bunzip2 -k) or recompress it with gzip"),
    (rb"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz -k) or recompress it with gzip"),
    (rb"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d) or recompress it with gzip"),
    (rb"PK\x03\x04", "a zip archive", "unzip it and pass the files inside"),
    (rb"PAR1.*PAR1\Z", "a parquet file", "name it .parquet"),  # its first 16 bytes and last 4 are matched
    (rb"\x1b\$\)C", "ISO-2022-KR text (a 7-bit Korean encoding)", "convert it to UTF-8 first, e.g. `iconv -f "
     "iso-2022-kr -t utf-8 IN > OUT`"),  # the designator every ISO-2022-KR text starts with
)  # fmt: skip
TAR_MAGIC = (257, b"ustar")  # offset and bytes of a tar header's magic (POSIX and GNU)


def check_inputs(inputs) -> list[Path]:
    """Every input must be an existing, non-empty regular file: say which one is not, and why."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files given (--input FILE [FILE ...]).")
    firsts = {}
    for i, (given, path) in enumerate(zip(inputs, paths)):
        if not path.exists():
            raise UserError(f"input file {path} does not exist.")
        if path.is_dir():
            raise UserError(f"input {path} is a directory; pass the text files inside it (e.g. {path}/*.txt).")
        if not path.is_file():
            raise UserError(f"input {path} is not a regular file.")
        stat = path.stat()
        if stat.st_size == 0:
            raise UserError(f"input file {path} is empty.")
        if path.name.lower().endswith((".json", ".json.gz", ".ndjson", ".ndjson.gz")):
            raise UserError(
                f"input file {path}: .json files are not read; name a JSON-lines file (one object per line) .jsonl "
                "(a JSON array file is not supported)."
            )
        if not os.access(path, os.R_OK):
            raise unreadable(path, PermissionError("no read permission"))
        if _is_parquet(path):
            import_pyarrow(path)
        else:
            _sniff(path, stat.st_size)
        # the same text twice would be counted twice, and could land in train and valid both (a hard link too)
        first = firsts.setdefault((stat.st_dev, stat.st_ino), i)
        if first != i:
            raise UserError(f"input file {given} is given twice (also as {inputs[first]}); pass each file once.")
    return paths


def _sniff(path: Path, size: int) -> None:
    """Refuse a compressed or binary format that is not read, found by its first bytes (a gzip file's by its
    decompressed ones too), and a file whose start is in another encoding, before any work reads the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            f.seek(max(0, size - 4))
            tail = f.read(4)
    except OSError as e:
        raise unreadable(path, e) from None
    gz = head[:2] == GZIP_MAGIC
    if gz:
        try:
            with gzip.GzipFile(path, "rb") as z:
                head = z.read(SNIFF_BYTES)
        except (OSError, EOFError, zlib.error):
            return  # reading it says what is wrong, with the line it got to
    for magic, what, fix in NOT_TEXT:
        if re.match(magic, head[:16] + tail, re.DOTALL):
            raise UserError(f"input file {path} is {what}, which is not read as text: {fix}.")
    offset, magic = TAR_MAGIC
    if head[offset : offset + len(magic)] == magic:
        what = "a gzip-compressed tar archive" if gz else "a tar archive"
        raise UserError(f"input file {path} is {what}, which is not read as text: extract it (tar xf FILE) and pass "
                        "the files inside.")  # fmt: skip
    whole = len(head) < SNIFF_BYTES  # (decompressed) the whole file was read
    if not whole:  # the last line may be cut: its last character too
        head = head[: head.rfind(b"\n") + 1]
    where = f"of {path}" if whole else f"of the first {len(head):,} bytes of {path}"
    stats = dict.fromkeys([*LINE_PROBLEMS, "cp949"], 0)
    valid = sum(1 for line in _decode_block(head, stats) if line.strip())
    if stats["invalid_utf8"] and stats["invalid_utf8"] >= valid:  # the rule reading applies to a whole file
        raise UserError(NOT_UTF8.format(invalid=stats["invalid_utf8"], where=where, valid=valid))


def check_corpus(inputs, out=None) -> Corpus:
    """A Corpus whose files all exist (a list of paths is taken as text/jsonl/parquet files), and that an output
    folder `out` would not join: a local dataset folder reads every data file under it, the next run's too."""
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(files=inputs)
    local = Path(corpus.dataset) if corpus.dataset and Path(corpus.dataset).is_dir() else None
    if out is not None and local is not None and Path(os.path.abspath(out)).is_relative_to(os.path.abspath(local)):
        raise UserError(f"--out {out} is inside the --dataset folder {local}: its files would be read as the "
                        "dataset's next time; choose an --out outside it.")  # fmt: skip
    if corpus.dataset and corpus.files:
        raise UserError("pass either --input FILE ... or --dataset NAME_OR_PATH, not both.")
    if not corpus.dataset:
        corpus.files = check_inputs(corpus.files)
    if not corpus.text_column:
        raise UserError("--text-column must name a column, got an empty string.")
    given = [
        f for f, on in (("--text-column", corpus.text_column != "text"), ("--doc-column", corpus.doc_column)) if on
    ]
    if given and not corpus.dataset and not any(map(_is_rows, corpus.files)):  # nothing would read it
        raise UserError(
            f"{' and '.join(given)} name columns of rows (.jsonl, .jsonl.gz, .parquet, --dataset), and every input "
            "here is a text file (one sentence per line, a blank line between documents): drop it."
        )
    return corpus


def add_corpus_args(p, *, required: bool = True) -> None:
    """The input flags `tokenizer`, `prepare` and `eval` share."""
    p.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="corpus files: UTF-8 text, one sentence per line, a blank line between documents (.gz read "
        "transparently); .jsonl / .jsonl.gz / .parquet: one sentence per row in --text-column",
    )
    p.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="a `datasets` dataset instead of files: a Hub name (downloaded) or a local folder, streamed",
    )
    p.add_argument("--dataset-config", metavar="NAME", help="the dataset's configuration (subset), if it has several")
    p.add_argument("--split", default="train", help="the dataset split to read (default train)")
    p.add_argument("--text-column", default="text", help="rows: the column holding the sentence (default text)")
    p.add_argument(
        "--doc-column", metavar="NAME", help="rows: a column whose change of value starts a new document (optional)"
    )
    p.set_defaults(_corpus_required=required)


def corpus_from_args(args) -> Corpus | None:
    """The Corpus the flags name; None when neither --input nor --dataset was given and none is required."""
    if not args.input and not args.dataset:
        if args._corpus_required:
            raise UserError("pass the corpus: --input FILE [FILE ...] or --dataset NAME_OR_PATH.")
        return None
    corpus = Corpus(
        files=list(args.input or []),  # as given, for the messages: check_inputs makes them paths
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_column=args.text_column,
        doc_column=args.doc_column,
    )
    return check_corpus(corpus)
