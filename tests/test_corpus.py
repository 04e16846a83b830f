"""Corpus formats: the sample corpus as .jsonl, .jsonl.gz, .parquet and a local `datasets` dataset (as rows with
empty rows between documents, or with a document column) gives shards byte-identical to the same text as .txt;
bad rows (invalid JSON, missing column, non-string, null) are counted and skipped; whole-file mistakes are one
sentence."""

from __future__ import annotations

import gzip
import json
import unicodedata

import numpy as np
import pytest

from mlmtrain.cli import main as cli_main
from mlmtrain.errors import UserError
from mlmtrain.prepare import prepare
from mlmtrain.text import Corpus
from mlmtrain.tokenizer_folder import load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def npy_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def sample_rows(sample_corpus, with_doc: bool):
    """The sample's lines as rows: every line a row ("" for a blank line), or with `with_doc` only the text lines,
    each with the number of the document (blank-line block) it is in."""
    lines = sample_corpus.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the text after the final newline is not a line
    if not with_doc:
        return [{"text": line} for line in lines]
    rows, doc = [], 0
    for line in lines:
        if line.strip():
            rows.append({"text": line, "doc": doc})
        else:
            doc += 1
    return rows


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("ref") / "data"
    prepare([sample_corpus], tokenizer_dir, out, valid_fraction=0.05, seed=0, progress=False)
    return npy_files(out)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "parquet_dict", "datasets_saved", "datasets_folder"])
@pytest.mark.parametrize("with_doc", [False, True], ids=["empty_rows", "doc_column"])
def test_rows_give_byte_identical_shards(tmp_path, sample_corpus, tokenizer_dir, reference, fmt, with_doc):
    rows = sample_rows(sample_corpus, with_doc)
    corpus = Corpus(doc_column="doc" if with_doc else None)
    if fmt.startswith("jsonl"):
        corpus.files = [write_jsonl(tmp_path / f"c.{fmt}", rows, gz=fmt.endswith(".gz"))]
    elif fmt.startswith("parquet"):
        table = pa.Table.from_pylist(rows)
        if fmt == "parquet_dict":  # a dictionary-encoded string column, as a pandas Categorical is written
            table = table.set_column(0, "text", table.column("text").dictionary_encode())
        pq.write_table(table, tmp_path / "c.parquet", row_group_size=300)  # several groups
        corpus.files = [tmp_path / "c.parquet"]
    else:
        datasets = pytest.importorskip("datasets")
        if fmt == "datasets_saved":  # `save_to_disk`, read with load_from_disk
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        else:  # a folder of data files, read with load_dataset(..., streaming=True)
            (tmp_path / "ds").mkdir()
            write_jsonl(tmp_path / "ds" / "train.jsonl", rows)
        corpus.dataset = str(tmp_path / "ds")
    meta = prepare(corpus, tokenizer_dir, tmp_path / "data", valid_fraction=0.05, seed=0, progress=False)
    assert npy_files(tmp_path / "data") == reference
    assert meta["lines_skipped"] == 0 and not any(meta["row_problems"].values())
    assert meta["inputs"][0]["text_column"] == "text"


def test_each_data_file_of_a_dataset_folder_ends_a_document(tmp_path, sample_corpus, tokenizer_dir):
    """A folder of data files read with --dataset gives the shards of the same files passed to --input as text:
    each file ends a document (the folder's files are read in name order, as `datasets` lists them)."""
    datasets = pytest.importorskip("datasets")
    rows = sample_rows(sample_corpus, with_doc=False)
    parts = [rows[:100], rows[100:250], rows[250:]]  # cut inside documents: only the file ends them
    (tmp_path / "ds").mkdir()
    for i, part in enumerate(parts):
        write_jsonl(tmp_path / "ds" / f"part{i}.jsonl", part)
        (tmp_path / f"part{i}.txt").write_text("".join(r["text"] + "\n" for r in part), encoding="utf-8")
    assert datasets.load_dataset(str(tmp_path / "ds"), split="train", streaming=True).n_shards == 3
    texts = [tmp_path / f"part{i}.txt" for i in range(3)]
    want = prepare(texts, tokenizer_dir, tmp_path / "a", valid_fraction=0.05, progress=False)
    got = prepare(Corpus(dataset=str(tmp_path / "ds")), tokenizer_dir, tmp_path / "b", valid_fraction=0.05)
    assert npy_files(tmp_path / "b") == npy_files(tmp_path / "a")
    assert got["input_lines"] == want["input_lines"] == len(rows)
    documents = sum(got[split]["documents"] for split in ("train", "valid"))
    assert documents == sum(want[split]["documents"] for split in ("train", "valid"))


def test_unknown_tokens_and_decomposed_hangul_are_counted_and_said(tmp_path, sample_corpus, tokenizer_dir, capsys):
    """NFD Korean (conjoining jamo) is tokenized as it is, mostly to [UNK] by a tokenizer trained on NFC text:
    prepare counts the [UNK] tokens per split and says so, and prepare and tokenizer name the cause and the fix."""
    lines = [line for line in sample_corpus.read_text(encoding="utf-8").split("\n") if line.strip()][:200]
    nfd = [unicodedata.normalize("NFD", line) for line in lines]
    (tmp_path / "nfd.txt").write_text("\n".join(nfd) + "\n", encoding="utf-8")
    decomposed = sum(1 for a, b in zip(lines, nfd) if a != b)
    assert cli_main(["prepare", "--input", str(tmp_path / "nfd.txt"), "--tokenizer", str(tokenizer_dir), "--out",
                     str(tmp_path / "d"), "--valid-fraction", "0", "--no-progress"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    tokens = np.load(tmp_path / "d" / "train" / "tokens.npy")
    tok = load_tokenizer(tokenizer_dir)
    assert tokens.tolist() == [i for e in tok.encode_batch(nfd, add_special_tokens=False) for i in e.ids]
    assert meta["train"]["unk_tokens"] == int((tokens == tok.token_to_id("[UNK]")).sum()) > 0.1 * len(tokens)
    assert meta["valid"]["unk_tokens"] == 0 and meta["decomposed_hangul_lines"] == decomposed > 0
    err = capsys.readouterr().err
    assert "of the tokens" in err and "are [UNK]" in err and f"{decomposed} lines hold decomposed Hangul" in err
    assert "normalize it to NFC" in err
    rc = cli_main(
        ["tokenizer", "--input", str(tmp_path / "nfd.txt"), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]
    )
    assert rc == 0 and "normalize it to NFC" in capsys.readouterr().err
    clean = prepare([sample_corpus], tokenizer_dir, tmp_path / "c", valid_fraction=0.05, progress=True)
    assert clean["train"]["unk_tokens"] == clean["valid"]["unk_tokens"] == clean["decomposed_hangul_lines"] == 0
    assert "[UNK]" not in capsys.readouterr().err


def test_bad_rows_are_counted_and_skipped(tmp_path, tokenizer_dir, capsys):
    good = ["대한민국은 민주공화국이다.", "The capital of France is Paris."]
    lines = [
        json.dumps({"text": good[0]}, ensure_ascii=False),
        "{not json",
        json.dumps(["a list, not an object"]),
        json.dumps({"body": "no text column"}),
        json.dumps({"text": 123}),
        json.dumps({"text": ["a", "b"]}),
        json.dumps({"text": None}),
        '{"text": "lone surrogate \\ud800 here"}',
        json.dumps({"text": "nul\u0000byte"}),
        json.dumps({"text": good[1] + "\r"}),
        "",  # a blank line is not a row
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare([path], tokenizer_dir, tmp_path / "d", valid_fraction=0.0, progress=True)
    assert meta["row_problems"] == {"invalid_json": 2, "missing_column": 1, "not_a_string": 2, "null_text": 1}
    assert meta["line_problems"]["invalid_utf8"] == 1 and meta["line_problems"]["nul_bytes"] == 1
    assert meta["line_problems"]["crlf"] == 1 and meta["lines_skipped"] == 8
    assert meta["train"]["sentences"] == 2
    err = capsys.readouterr().err
    assert "2 rows with not a JSON object skipped" in err and "1 row with a null text value skipped" in err

    pq.write_table(pa.table({"text": [good[0], None, good[1]]}), tmp_path / "nulls.parquet")
    meta = prepare([tmp_path / "nulls.parquet"], tokenizer_dir, tmp_path / "p", valid_fraction=0.0, progress=False)
    assert meta["row_problems"]["null_text"] == 1 and meta["train"]["sentences"] == 2


def test_whole_file_mistakes_are_one_sentence(tmp_path, tokenizer_dir, capsys):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    write_jsonl(tmp_path / "other.jsonl", [{"body": "x"}, {"body": "y"}])
    (tmp_path / "fake.parquet").write_text("not parquet")
    cases = [
        (["--input", str(tmp_path / "other.parquet")], "has no column 'text' (its columns: body); pass --text-column"),
        (["--input", str(tmp_path / "ints.parquet")], "column 'text' holds int64, not strings"),
        (["--input", str(tmp_path / "other.jsonl")], "has no text in a column named 'text' (2 rows lack it)"),
        (["--input", str(tmp_path / "fake.parquet")], "cannot read"),
        (["--input", str(tmp_path / "other.parquet"), "--dataset", "x"], "not both"),
        (["--dataset", str(tmp_path / "missing")], "cannot open dataset"),
        ([], "pass the corpus"),
        (
            ["--input", str(tmp_path / "other.jsonl"), str(tmp_path / ".." / tmp_path.name / "other.jsonl")],
            "given twice",
        ),
    ]
    for i, (args, message) in enumerate(cases):
        rc = cli_main(["prepare", *args, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / f"o{i}")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / f"o{i}").exists()
    ok = ["--input", str(tmp_path / "other.parquet"), "--text-column", "body", "--valid-fraction", "0"]
    assert cli_main(["prepare", *ok, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "ok")]) == 0


def test_tokenizer_trains_on_rows(tmp_path, sample_corpus):
    path = write_jsonl(tmp_path / "c.jsonl", sample_rows(sample_corpus, with_doc=False))
    rc = cli_main(["tokenizer", "--input", str(path), "--out", str(tmp_path / "tok"), "--vocab-size", "500"])
    assert rc == 0 and (tmp_path / "tok" / "vocab.txt").is_file()
    with pytest.raises(UserError, match="pass either"):
        prepare(Corpus(files=[path], dataset="x"), tmp_path / "tok", tmp_path / "d")


def _doc_rows(n=30, per_doc=3):
    return [{"text": f"sentence number {i} of document {i // per_doc}", "doc": i // per_doc} for i in range(n)]


def _lines(corpus, block_bytes):
    from mlmtrain.text import iter_line_batches

    return [line for part, _ in iter_line_batches(corpus, {}, block_bytes=block_bytes) for line in part]


def test_a_jsonl_file_with_a_doc_column_gives_the_lines_of_the_same_text_file(tmp_path):
    """A jsonl file with a document column gives the lines of the same text as a file (a blank line between
    documents, none before the first), and meta.json's input_lines counts the same."""
    import json

    from mlmtrain.text import Corpus, iter_line_batches

    rows = _doc_rows()
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    breaks = [i > 0 and r["doc"] != rows[i - 1]["doc"] for i, r in enumerate(rows)]
    text = "".join(("\n" if brk else "") + r["text"] + "\n" for brk, r in zip(breaks, rows))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    stats_rows, stats_text = {}, {}
    got = [x for part, _ in iter_line_batches(Corpus(files=[tmp_path / "c.jsonl"], doc_column="doc"), stats_rows)
           for x in part]  # fmt: skip
    want = [x for part, _ in iter_line_batches([tmp_path / "c.txt"], stats_text) for x in part]
    assert got == want and stats_rows["input_lines"] == stats_text["input_lines"]


def test_a_dataset_doc_change_at_a_batch_boundary_is_a_document_break(tmp_path):
    """A `datasets` dataset's document change that falls between two read batches is a break all the same."""
    import json

    pytest.importorskip("datasets")
    from mlmtrain.text import Corpus

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _doc_rows()), encoding="utf-8")
    corpus = Corpus(dataset=str(tmp_path / "ds"), doc_column="doc")
    whole = _lines(corpus, 1 << 20)
    assert whole.count("") == 10
    assert _lines(corpus, 30) == whole  # every row a batch of its own


def test_each_of_two_data_files_of_a_dataset_ends_a_document(tmp_path):
    """A dataset folder of two data files ends a document between them, as the same files given to --input do."""
    import json

    pytest.importorskip("datasets")
    from mlmtrain.text import Corpus

    rows = [{"text": f"sentence number {i}"} for i in range(10)]
    (tmp_path / "ds").mkdir()
    for k, part in enumerate((rows[:4], rows[4:])):
        (tmp_path / "ds" / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    lines = _lines(Corpus(dataset=str(tmp_path / "ds")), 1 << 20)
    assert [x for x in lines if x] == [r["text"] for r in rows]
    assert lines[4] == "" and lines[:4] == [r["text"] for r in rows[:4]]
