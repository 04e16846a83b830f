"""Reading corpora: text files (`.gz` decompressed on the fly), JSON lines (`.jsonl`, `.jsonl.gz`), parquet
files and `datasets` datasets, with every line or row problem counted, never fatal. Both `mlmtrain tokenizer`
and `mlmtrain prepare` read their input through `iter_line_batches`, so they see the same lines.

- Text: bytes are read in ~1 MiB blocks and a whole block is decoded at once; only a block that fails (invalid
  UTF-8, NUL bytes) is redone line by line, skipping the bad lines. Clean input never pays a per-line Python
  cost to be checked. One sentence per line; a blank line (or the end of a file) ends a document.
- Rows (jsonl, parquet, a dataset): one row's text column is one sentence (a text holding line breaks gives
  one sentence per line); an empty row, a change of `doc_column`'s value, or the end of a file ends a
  document. The same text as rows or as lines gives the same lines, so the same shards.
- A document break is yielded as "". CR line endings and a byte-order mark are repaired; invalid UTF-8, NUL
  bytes, rows that are not JSON objects, lack the column, or hold a null or a non-string are skipped; the
  counts go to `stats` (keys of LINE_PROBLEMS and ROW_PROBLEMS) and `line_problem_notes` says them in words.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from mlmtrain.errors import UserError

READ_BLOCK_BYTES = 1 << 20  # bytes decoded (and tokenized) per batch
ROWS_PER_BATCH = 8192  # rows per batch from parquet files and datasets
MAX_LINE_BYTES = 64 << 20  # a "line" longer than this is not one-sentence-per-line text
LINE_PROBLEMS = {  # stats key -> (skipped or repaired, what)
    "invalid_utf8": ("skipped", "invalid UTF-8"),
    "nul_bytes": ("skipped", "NUL bytes"),
    "crlf": ("repaired", "CR (Windows/old Mac) line endings"),
    "bom": ("repaired", "a UTF-8 byte-order mark"),
}
ROW_PROBLEMS = {  # stats key -> what was wrong with a skipped row
    "invalid_json": "not a JSON object",
    "missing_column": "no text column",
    "not_a_string": "a text value that is not a string",
    "null_text": "a null text value",
}
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


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
        return None if self.dataset else sum(p.stat().st_size for p in self.files)

    def describe(self) -> list[dict]:
        """The inputs as meta.json records them."""
        if self.dataset:
            return [{"dataset": self.dataset, "config": self.dataset_config, "split": self.split, **self._columns()}]
        return [
            {"path": str(p.resolve()), "bytes": p.stat().st_size, **(self._columns() if _is_rows(p) else {})}
            for p in self.files
        ]

    def _columns(self) -> dict:
        return {"text_column": self.text_column, "doc_column": self.doc_column}


def _is_rows(path: Path) -> bool:
    return path.name.endswith(ROW_SUFFIXES)


# ------------------------------------------------------------------------------------------ checking


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
        if path.suffix == ".parquet":
            _import_pyarrow(path)
    return paths


def check_corpus(inputs) -> Corpus:
    """A Corpus whose files all exist (a list of paths is taken as text/jsonl/parquet files)."""
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(files=inputs)
    if corpus.dataset and corpus.files:
        raise UserError("pass either --input FILE ... or --dataset NAME_OR_PATH, not both.")
    if not corpus.dataset:
        corpus.files = check_inputs(corpus.files)
    if not corpus.text_column:
        raise UserError("--text-column must name a column, got an empty string.")
    return corpus


def _import_pyarrow(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'mlmtrain[parquet]'.") from None
    return pyarrow


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
    return lines


def _open_binary(path: Path):
    """(stream of decompressed bytes, raw file for progress). `.gz` is decompressed on the fly."""
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def iter_line_batches(inputs, stats: dict, block_bytes: int = READ_BLOCK_BYTES):
    """Yield (lines, input_bytes_read) per block of `inputs` (a Corpus, or a list of paths). A blank line or
    an empty row is returned as "" (a document break); each file or dataset ends with one. Per-line and
    per-row problems are counted in `stats`."""
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(files=[Path(p) for p in inputs])
    for key in (*LINE_PROBLEMS, *ROW_PROBLEMS):
        stats.setdefault(key, 0)
    stats.setdefault("input_lines", 0)
    sources = [(corpus.dataset, _dataset_batches(corpus))] if corpus.dataset else []
    for path in corpus.files:
        if path.suffix == ".parquet":
            sources.append((path, _parquet_batches(path, corpus)))
        elif _is_rows(path):
            sources.append((path, _jsonl_batches(path, corpus, stats, block_bytes)))
        else:
            sources.append((path, _text_batches(path, stats, block_bytes)))
    for source, batches in sources:
        text_lines = 0
        for lines, nbytes in batches:
            if isinstance(lines, _Rows):  # row values: checked and split into lines here
                lines = lines.to_lines(stats)
            stats["input_lines"] += len(lines)
            lines = ["" if line.isspace() else line for line in lines]
            text_lines += sum(1 for line in lines if line)
            yield lines, nbytes
        if text_lines == 0:
            raise UserError(_no_text_message(source, corpus, stats))
        yield [""], 0  # a file boundary is a document boundary


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


def _text_batches(path: Path, stats: dict, block_bytes: int):
    """(lines, raw bytes read) per block of a text file; the lines come back decoded and repaired."""
    stream, raw = _open_binary(path)
    carry, first, pos = b"", True, 0
    with stream, raw:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise UserError(f"cannot read {path}: {e} (is it really a gzip file?)") from None
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk, stats["bom"] = chunk[3:], stats["bom"] + 1
            first = False
            block = carry + chunk
            cut = block.rfind(b"\n") + 1 if chunk else len(block)
            block, carry = block[:cut], block[cut:]
            if len(carry) > MAX_LINE_BYTES:
                raise UserError(
                    f"{path} has a line longer than {MAX_LINE_BYTES >> 20} MiB; expected one sentence per line."
                )
            if block:
                lines = _decode_block(block, stats)
                if lines and lines[-1] == "" and block.endswith(b"\n"):
                    lines.pop()  # the split after the final "\n" is not a line
                now = raw.tell()
                yield lines, now - pos
                pos = now
            if not chunk:
                break


class _Rows:
    """One batch of row values: texts (anything a row held) and document keys (None without a doc column)."""

    def __init__(self, texts: list, docs: list | None, previous_doc):
        self.texts, self.docs, self.previous_doc = texts, docs, previous_doc

    def to_lines(self, stats: dict) -> list[str]:
        lines, last = [], self.previous_doc
        for i, text in enumerate(self.texts):
            if self.docs is not None:
                if self.docs[i] != last and last is not _FIRST_ROW:
                    lines.append("")  # a new document
                last = self.docs[i]
            if text is _MISSING:
                stats["missing_column"] += 1
            elif text is None:
                stats["null_text"] += 1
            elif not isinstance(text, str):
                stats["not_a_string"] += 1
            elif "\0" in text:
                stats["nul_bytes"] += 1
            else:
                if "\r" in text:
                    stats["crlf"] += text.count("\r")
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                lines.extend(text.split("\n"))
        return lines


_MISSING = object()  # a row without the text column
_FIRST_ROW = object()  # the doc key before a file's first row


def _jsonl_batches(path: Path, corpus: Corpus, stats: dict, block_bytes: int):
    """(_Rows, raw bytes read) per block of a JSON-lines file: one JSON object per line."""
    previous = _FIRST_ROW
    for lines, nbytes in _text_batches(path, stats, block_bytes):
        texts, docs = [], [] if corpus.doc_column else None
        for line in lines:
            if not line or line.isspace():
                continue  # not a row
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                stats["invalid_json"] += 1
                continue
            text = row.get(corpus.text_column, _MISSING)
            if isinstance(text, str) and "\\ud" in line.lower() and not _encodable(text):
                stats["invalid_utf8"] += 1  # a lone surrogate escape: not text the tokenizer can take
                continue
            texts.append(text)
            if docs is not None:
                docs.append(_hashable(row.get(corpus.doc_column)))
        yield _Rows(texts, docs, previous), nbytes
        if docs:
            previous = docs[-1]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _parquet_batches(path: Path, corpus: Corpus):
    """(_Rows, approximate bytes read) per batch of rows of a parquet file."""
    pyarrow = _import_pyarrow(path)
    try:
        file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    schema = file.schema_arrow
    columns = [corpus.text_column] + ([corpus.doc_column] if corpus.doc_column else [])
    for name in columns:
        if name not in schema.names:
            raise UserError(
                f"{path} has no column {name!r} (its columns: {', '.join(schema.names)}); pass "
                f"--{'text' if name == corpus.text_column else 'doc'}-column NAME."
            )
    kind = schema.field(corpus.text_column).type
    is_view = getattr(pyarrow.types, "is_string_view", lambda t: False)
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind) or is_view(kind)):
        raise UserError(f"{path} column {corpus.text_column!r} holds {kind}, not strings; pass --text-column NAME.")
    rows, size, done, previous = max(1, file.metadata.num_rows), path.stat().st_size, 0, _FIRST_ROW
    for batch in file.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
        texts = batch.column(0).to_pylist()
        docs = [_hashable(d) for d in batch.column(1).to_pylist()] if corpus.doc_column else None
        before, done = done, done + len(texts)
        yield _Rows(texts, docs, previous), size * done // rows - size * before // rows
        if docs:
            previous = docs[-1]


def _dataset_batches(corpus: Corpus):
    """(_Rows, characters read) per ROWS_PER_BATCH rows of a `datasets` dataset, streamed."""
    dataset = open_dataset(corpus)
    texts, docs, previous, chars = [], [] if corpus.doc_column else None, _FIRST_ROW, 0
    for row in dataset:
        text = row.get(corpus.text_column, _MISSING)
        texts.append(text)
        chars += len(text) if isinstance(text, str) else 0
        if docs is not None:
            docs.append(_hashable(row.get(corpus.doc_column)))
        if len(texts) == ROWS_PER_BATCH:
            yield _Rows(texts, docs, previous), chars
            previous = docs[-1] if docs else previous
            texts, docs, chars = [], [] if corpus.doc_column else None, 0
    if texts:
        yield _Rows(texts, docs, previous), chars


def open_dataset(corpus: Corpus):
    """The split as an iterable of row dicts: a folder written by `save_to_disk`, else `load_dataset` (a local
    folder of data files, or a Hub name: then it is downloaded) in streaming mode."""
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset needs the datasets library: pip install 'mlmtrain[datasets]'.") from None
    path = Path(corpus.dataset)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if corpus.split not in dataset:
                    raise UserError(f"{path} has no split {corpus.split!r} (its splits: {', '.join(dataset)}).")
                dataset = dataset[corpus.split]
        else:
            dataset = datasets.load_dataset(corpus.dataset, corpus.dataset_config, split=corpus.split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, its own) for a bad name
        raise UserError(f"cannot open dataset {corpus.dataset!r} split {corpus.split!r}: {e}") from None
    names = getattr(dataset, "column_names", None)
    if names and corpus.text_column not in names:
        raise UserError(
            f"dataset {corpus.dataset!r} has no column {corpus.text_column!r} (its columns: {', '.join(names)}); "
            "pass --text-column NAME."
        )
    return dataset


def line_problem_notes(stats: dict) -> list[str]:
    """One line per kind of line or row problem found, e.g. "3 lines with invalid UTF-8 skipped"."""
    notes = [f"{stats[key]} lines with {what} {verb}" for key, (verb, what) in LINE_PROBLEMS.items() if stats.get(key)]
    return notes + [f"{stats[key]} rows with {what} skipped" for key, what in ROW_PROBLEMS.items() if stats.get(key)]


# ---------------------------------------------------------------------------------------------- CLI


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
        files=[Path(p) for p in args.input or []],
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_column=args.text_column,
        doc_column=args.doc_column,
    )
    return check_corpus(corpus)
