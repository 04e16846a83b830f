"""Reading row corpora: JSON lines, parquet files and `datasets` datasets, as batches of `Rows` (the text and
document values of consecutive rows). `text.py` turns them into lines and reads text files; this module knows
only the row formats (`corpus` below is a `text.Corpus`: which columns, which dataset). A bad row is kept as
what it held and counted when the batch becomes lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlmtrain.errors import UserError, missing_extra

ROWS_PER_BATCH = 8192  # rows per batch from parquet files and datasets, fewer where they hold more than a block
ROW_PROBLEMS = {  # stats key -> what was wrong with a skipped row
    "invalid_json": "not a JSON object",
    "missing_column": "no text column",
    "not_a_string": "a text value that is not a string",
    "null_text": "a null text value",
}
MISSING = object()  # a row without the text column
FIRST_ROW = object()  # the doc key before a file's first row
FILE_END = object()  # in place of a batch: a data file of a dataset ended, and with it a document
UNFIT = re.compile("[\0\ud800-\udfff]")  # a NUL, or a lone surrogate (only a JSON escape makes one)


class Rows:
    """One batch of row values: texts (anything a row held) and document keys (None without a doc column)."""

    def __init__(self, texts: list, docs: list | None, previous_doc, surrogates: bool = False):
        self.texts, self.docs, self.previous_doc = texts, docs, previous_doc
        self.surrogates = surrogates  # a text may hold a lone surrogate: look for them (a slower scan)

    def to_lines(self, stats: dict) -> list[str]:
        lines, last = [], self.previous_doc
        for i, text in enumerate(self.texts):
            if self.docs is not None:
                if self.docs[i] != last and last is not FIRST_ROW:
                    lines.append("")  # a new document
                last = self.docs[i]
            if text is MISSING:
                stats["missing_column"] += 1
            elif text is None:
                stats["null_text"] += 1
            elif not isinstance(text, str):
                stats["not_a_string"] += 1
            else:
                if "\r" in text:
                    stats["crlf"] += text.count("\r")
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                pieces = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")  # as in a text file
                # a bad line is skipped and counted alone, as in a text file (NUL first, as `_decode_block` does)
                unfit = "\0" in text or (self.surrogates and UNFIT.search(text))
                lines += [x for x in pieces if _fit(x, stats)] if unfit else pieces
        return lines


def _fit(line: str, stats: dict) -> bool:
    if not UNFIT.search(line):
        return True
    stats["nul_bytes" if "\0" in line else "invalid_utf8"] += 1
    return False


def jsonl_batches(text_batches, path: Path, corpus, stats: dict):
    """(Rows, raw bytes read) per batch of a JSON-lines file, from its `text_batches` (lines, raw bytes read):
    one JSON object per line."""
    previous, has_doc = FIRST_ROW, False
    for lines, nbytes in text_batches:
        texts, docs, surrogates = [], [] if corpus.doc_column else None, False
        for line in lines:
            if not line or line.isspace():
                continue  # not a row
            surrogates = surrogates or "\\ud" in line or "\\uD" in line
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                row = None
            if not isinstance(row, dict):
                stats["invalid_json"] += 1
                continue
            texts.append(row.get(corpus.text_column, MISSING))
            if docs is not None:
                docs.append(_hashable(row.get(corpus.doc_column)))
                has_doc = has_doc or corpus.doc_column in row
        yield Rows(texts, docs, previous, surrogates), nbytes
        if docs:
            previous = docs[-1]
    if previous is not FIRST_ROW and not has_doc:  # as a parquet file without the column is refused
        raise UserError(f"no row of {path} has a column {corpus.doc_column!r}; pass --doc-column NAME, or none.")


def one_line(e: Exception) -> str:
    """A library's error message on one line (some span several), not too long."""
    text = " ".join(str(e).split()).rstrip(". ") or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def unreadable(path, e: Exception, gz: bool = False) -> UserError:
    """An input that cannot be opened or read: one sentence (not a failed write, as `files.atomic_dir` says of
    an OSError)."""
    why = getattr(e, "strerror", None) or one_line(e)
    fix = "is it a complete, valid gzip file?" if gz else "check that it is there and that you may read it."
    return UserError(f"cannot read {path}: {why}; {fix}")


def _guarded(items, what: str, fix: str):
    """`items` with any library error while reading them as one sentence: `cannot read WHAT: ...; FIX.`"""
    items = iter(items)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except UserError:
            raise
        except UnicodeDecodeError as e:  # a text or JSON data file in another encoding (a dataset's: whole)
            raise UserError(f"cannot read {what}: a data file is not UTF-8 ({one_line(e)}): it is probably in another "
                            "encoding (CP949/EUC-KR, Latin-1); convert it first, e.g. `iconv -f cp949 -t utf-8 IN > "
                            "OUT`.") from None  # fmt: skip
        except Exception as e:  # pyarrow and datasets raise many kinds
            raise UserError(f"cannot read {what}: {one_line(e)}; {fix}.") from None
        yield item


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def import_pyarrow(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise missing_extra(f"reading {path}", "pyarrow", "parquet") from None
    return pyarrow


def parquet_batches(path: Path, corpus, block_bytes: int):
    """(Rows, approximate bytes read) per batch of rows of a parquet file: ROWS_PER_BATCH rows, or as many as
    hold about `block_bytes` by the file's own count of its uncompressed bytes."""
    pyarrow = import_pyarrow(path)
    try:
        file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    schema = file.schema_arrow
    columns = list(dict.fromkeys([corpus.text_column] + ([corpus.doc_column] if corpus.doc_column else [])))
    for name in columns:
        if schema.names.count(name) > 1:
            raise UserError(f"{path} has {schema.names.count(name)} columns named {name!r}; give each its own name.")
        if name not in schema.names:
            raise UserError(
                f"{path} has no column {name!r} (its columns: {', '.join(schema.names)}); pass "
                f"--{'text' if name == corpus.text_column else 'doc'}-column NAME."
            )
    kind = schema.field(corpus.text_column).type
    if not _is_strings(pyarrow, kind):
        raise UserError(f"{path} column {corpus.text_column!r} holds {kind}, not strings; pass --text-column NAME.")
    rows, size, done, previous = max(1, file.metadata.num_rows), path.stat().st_size, 0, FIRST_ROW
    groups = [file.metadata.row_group(i) for i in range(file.metadata.num_row_groups)]
    data_bytes = sum(  # the text column's bytes alone: other columns (embeddings, say) are not read
        c.total_uncompressed_size for g in groups for c in map(g.column, range(g.num_columns))
        if c.path_in_schema == corpus.text_column
    )  # fmt: skip
    batch_rows = max(1, min(ROWS_PER_BATCH, block_bytes * rows // max(1, data_bytes)))
    batches = file.iter_batches(batch_size=batch_rows, columns=columns)
    for batch in _guarded(batches, f"{path} as parquet", "the file is damaged: write it again"):
        texts = batch.column(corpus.text_column).to_pylist()
        docs = [_hashable(d) for d in batch.column(corpus.doc_column).to_pylist()] if corpus.doc_column else None
        before, done = done, done + len(texts)
        yield Rows(texts, docs, previous), size * done // rows - size * before // rows
        if docs:
            previous = docs[-1]


def _is_strings(pyarrow, kind) -> bool:
    """A column of strings: plain, large, view, or dictionary-encoded strings (a pandas Categorical, a column
    written with `dictionary_encode`), which read back as the same Python strings."""
    if pyarrow.types.is_dictionary(kind):
        kind = kind.value_type
    is_view = getattr(pyarrow.types, "is_string_view", lambda t: False)
    return pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind) or is_view(kind)


def dataset_batches(corpus, block_bytes: int):
    """(Rows, characters read) per ROWS_PER_BATCH rows or `block_bytes` characters of a `datasets` dataset,
    streamed; (FILE_END, 0) between two of its data files."""
    for i, part in enumerate(_data_files(open_dataset(corpus))):
        if i:
            yield FILE_END, 0
        texts, docs, previous, chars = [], [] if corpus.doc_column else None, FIRST_ROW, 0
        fix = "check that its data files are valid and have the same columns"
        for row in _guarded(part, f"dataset {corpus.dataset}", fix):
            text = row.get(corpus.text_column, MISSING)
            texts.append(text)
            chars += len(text) if isinstance(text, str) else 0
            if docs is not None:
                docs.append(_hashable(row.get(corpus.doc_column)))
            if len(texts) == ROWS_PER_BATCH or chars >= block_bytes:
                yield Rows(texts, docs, previous), chars
                previous = docs[-1] if docs else previous
                texts, docs, chars = [], [] if corpus.doc_column else None, 0
        if texts:
            yield Rows(texts, docs, previous), chars


def _data_files(dataset) -> list:
    """The dataset's data files in order, each a dataset of its own, so that each ends a document as a file of
    --input does. A streamed dataset's shards are its data files (the json, csv, parquet and text builders make
    one per file) and `shard(n, i)` takes them in order. A `save_to_disk` dataset is read whole: its arrow
    files are where `datasets` cut it for size, not files of the corpus."""
    import datasets

    if not isinstance(dataset, datasets.IterableDataset):
        return [dataset]
    count = getattr(dataset, "num_shards", None) or dataset.n_shards  # n_shards before datasets 4
    return [dataset.shard(num_shards=count, index=i) for i in range(count)] if count > 1 else [dataset]


def open_dataset(corpus):
    """The split as an iterable of row dicts: a folder written by `save_to_disk`, else `load_dataset` (a local
    folder of data files, or a Hub name: then it is downloaded) in streaming mode."""
    try:
        import datasets
    except ImportError:
        raise missing_extra("--dataset", "the datasets library", "datasets") from None
    path = Path(corpus.dataset)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if corpus.split not in dataset:
                    raise UserError(f"{path} has no split {corpus.split!r} (its splits: {', '.join(dataset)}).")
                dataset = dataset[corpus.split]
            elif corpus.split != "train":  # one Dataset saved whole: it has no splits to choose from
                raise UserError(f"{path} holds one split saved whole (a Dataset, not a DatasetDict): drop --split.")
        else:
            dataset = datasets.load_dataset(corpus.dataset, corpus.dataset_config, split=corpus.split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, its own) for a bad name
        raise UserError(f"cannot open dataset {corpus.dataset!r} split {corpus.split!r}: {e}") from None
    names = getattr(dataset, "column_names", None)
    for name, flag in ((corpus.text_column, "text"), (corpus.doc_column, "doc")):
        if names and name and name not in names:
            raise UserError(
                f"dataset {corpus.dataset!r} has no column {name!r} (its columns: {', '.join(names)}); pass "
                f"--{flag}-column NAME."
            )
    return dataset
