"""Corpus inputs that used to escape as a traceback, be misread or be mislabelled: each is now read as the same
text elsewhere is, or refused with one sentence naming the file and the fix (exit 2, nothing written)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from cli_run import assert_refused, in_process, run_cli

from mlmtrain import corpus_check, text
from mlmtrain import prepare as prepare_module
from mlmtrain import tokenizer as tokenizer_module
from mlmtrain.errors import UserError
from mlmtrain.prepare import data_notes, prepare
from mlmtrain.text import Corpus, iter_line_batches

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def npy_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*.npy"))}


def shards(inputs, tokenizer_dir, out, **kw):
    """(meta.json, the .npy files) of `prepare` on `inputs` with no valid split unless asked."""
    kw.setdefault("valid_fraction", 0.0)
    meta = prepare(inputs, tokenizer_dir, out, progress=False, **kw)
    return meta, npy_files(out)


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def refused(capsys, tmp_path, tokenizer_dir, *args, command="prepare"):
    """The one error line of `mlmtrain prepare ARGS` (or `tokenizer`); checks that nothing was written."""
    out = tmp_path / "refused_out"
    tail = ["--tokenizer", tokenizer_dir, "--out", out] if command == "prepare" else ["--out", out]
    line = assert_refused(in_process(capsys, command, *args, *tail))
    assert not out.exists()
    return line


def test_deeply_nested_json_line_is_an_invalid_row(tmp_path, tokenizer_dir):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "the cat sat"}\n{"a": ' + "[" * 5000 + "]" * 5000 + "}\n", encoding="utf-8")
    meta, _ = shards(Corpus(files=[path]), tokenizer_dir, tmp_path / "d")
    assert meta["row_problems"]["invalid_json"] == 1 and meta["train"]["sentences"] == 1


def test_bad_data_file_in_a_dataset_folder_is_one_sentence(tmp_path, tokenizer_dir):
    """Run as a script runs it: `datasets` logs the failing file's name on stderr first (a handler it set up in
    an earlier test would write to a closed capsys stream in process)."""
    pytest.importorskip("datasets")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text('{"text": "hello world"}\nnot json\n{"text": "the cat"}\n')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "b" / "y.jsonl").write_text('{"body": "x"}\n')
    for name, phrase in (("a", "JSON parse error"), ("b", "column names don't match")):
        args = ("prepare", "--dataset", tmp_path / name, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out")
        line = assert_refused(run_cli(*args, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}), phrase)
        assert f"cannot read dataset {tmp_path / name}: " in line and "check that its data files are valid" in line
        assert not (tmp_path / "out").exists()


def test_an_out_inside_the_dataset_folder_is_refused_before_any_work(tmp_path, tokenizer_dir):
    """`--dataset ds --out ds/shards`: the shards (or a tokenizer's JSON) would be read as the dataset's data files
    next time, and that run failed with "No (supported) data files found"."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x.jsonl").write_text('{"text": "hello world"}\n')
    corpus = Corpus(dataset=str(tmp_path / "ds"))
    for out in (tmp_path / "ds" / "shards", tmp_path / "ds" / ".." / "ds" / "tok"):
        with pytest.raises(UserError, match=r"is inside the --dataset folder .*; choose an --out outside it"):
            prepare(corpus, tokenizer_dir, out, progress=False)
        with pytest.raises(UserError, match=r"is inside the --dataset folder .*; choose an --out outside it"):
            tokenizer_module.train_tokenizer(corpus, out)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["x.jsonl"]


def test_damaged_parquet_is_a_read_error_not_a_write_error(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"sentence {i} the cat sat" for i in range(4000)]}), path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data[start : start + 32] = b"\xff" * 32  # the third row group's page header
    path.write_bytes(bytes(data))
    for command in ("prepare", "tokenizer"):
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", path, command=command)
        assert f"cannot read {path} as parquet: Couldn't deserialize thrift" in line and "write it again" in line
        assert "could not write" not in line


def test_parquet_columns_by_name(tmp_path, tokenizer_dir, capsys):
    pq.write_table(pa.table({"text": ["hello world", "the cat"]}), tmp_path / "a.parquet")
    meta, _ = shards(Corpus(files=[tmp_path / "a.parquet"], doc_column="text"), tokenizer_dir, tmp_path / "d")
    assert meta["train"]["sentences"] == 2 and meta["train"]["documents"] == 2  # each value its own document
    table = pa.table([pa.array(["hello world"]), pa.array(["the cat"])], names=["text", "text"])
    pq.write_table(table, tmp_path / "dup.parquet")
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "dup.parquet")
    assert "dup.parquet has 2 columns named 'text'; give each its own name" in line


def test_compressed_and_binary_formats_are_refused_by_their_first_bytes(tmp_path, tokenizer_dir, capsys):
    body = b"the cat sat on the mat\nhello world\n" * 50
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(body))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(body))
    (tmp_path / "c.zst").write_bytes(b"\x28\xb5\x2f\xfd" + body)
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("c.txt", body)
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "rows.dat")
    cases = {
        "c.txt.bz2": "is bzip2-compressed, which is not read as text: decompress it (bunzip2 -k)",
        "c.txt.xz": "is xz-compressed",
        "c.zst": "is zstd-compressed",
        "c.zip": "is a zip archive, which is not read as text: unzip it and pass the files inside",
        "rows.dat": "is a parquet file, which is not read as text: name it .parquet",
    }
    # a tar archive read as text lost each file's first line (glued to its header) and merged the files
    for name, mode in (("c.tar", "w"), ("c.tar.gz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as t:
            t.add(tmp_path / "c.zip", arcname="a.txt")
    iso = "대한민국은 민주공화국이다.\nthe cat sat\n".encode("iso2022_kr")  # 7-bit: valid UTF-8, garbage as text
    (tmp_path / "iso.txt").write_bytes(iso)
    cases |= {
        "c.tar": "is a tar archive, which is not read as text: extract it (tar xf FILE) and pass the files inside",
        "c.tar.gz": "is a gzip-compressed tar archive, which is not read as text: extract it",
        "iso.txt": "is ISO-2022-KR text (a 7-bit Korean encoding), which is not read as text: convert it to UTF-8",
    }
    for name, phrase in cases.items():
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / name)
        assert f"input file {tmp_path / name} {phrase}" in line
    # gzip is read whatever the file's name
    (tmp_path / "plain.txt").write_bytes(body)
    (tmp_path / "packed.txt").write_bytes(gzip.compress(body))
    want = shards([tmp_path / "plain.txt"], tokenizer_dir, tmp_path / "a")[1]
    assert shards([tmp_path / "packed.txt"], tokenizer_dir, tmp_path / "b")[1] == want


def test_a_file_in_another_encoding_is_refused_a_few_bad_lines_are_skipped(tmp_path, tokenizer_dir, capsys):
    korean = (
        "대한민국은 민주공화국이다.\nhello world the cat\n대한민국의 주권은 국민에게 있고\nthe cat sat on the mat\n"
    )
    (tmp_path / "cp949.txt").write_bytes(korean.encode("cp949"))
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "cp949.txt")
    assert f"2 lines of {tmp_path / 'cp949.txt'} are not valid UTF-8 (and 2 are)" in line
    # found from the start of each file, before any work: a large UTF-8 file first is not tokenized first
    (tmp_path / "big.txt").write_text("the cat sat on the mat\n" * 20_000, encoding="utf-8")
    (tmp_path / "big_cp949.txt").write_bytes(korean.encode("cp949") * 5_000)
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "big.txt", tmp_path / "big_cp949.txt")
    assert "lines of the first 65,5" in line and f"bytes of {tmp_path / 'big_cp949.txt'} are not valid UTF-8" in line
    assert "another encoding (CP949/EUC-KR, Latin-1); convert it to UTF-8 first, e.g. `iconv -f cp949" in line
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "cp949.txt", command="tokenizer")
    assert "are not valid UTF-8" in line
    (tmp_path / "few.txt").write_bytes(korean.encode() + "한국어 문장\n".encode("cp949"))
    meta, _ = shards([tmp_path / "few.txt"], tokenizer_dir, tmp_path / "d")
    assert meta["line_problems"]["invalid_utf8"] == 1 and meta["train"]["sentences"] == 4
    assert meta["cp949_lines"] == 1  # a mixed file: said, with what to do
    assert "1 of the lines skipped for invalid UTF-8 read as Korean in CP949/EUC-KR" in " ".join(data_notes(meta))


def test_suffixes_in_any_case_and_json_refused(tmp_path, tokenizer_dir, capsys):
    lines = ["the cat sat on the mat", "hello world again"]
    want = shards([jsonl(tmp_path / "a.jsonl", lines)], tokenizer_dir, tmp_path / "a")[1]
    assert shards([jsonl(tmp_path / "A.JSONL", lines)], tokenizer_dir, tmp_path / "b")[1] == want
    pq.write_table(pa.table({"text": lines}), tmp_path / "A.PARQUET")
    assert shards([tmp_path / "A.PARQUET"], tokenizer_dir, tmp_path / "c")[1] == want
    (tmp_path / "A.TXT.GZ").write_bytes(gzip.compress("\n".join(lines).encode()))
    assert shards([tmp_path / "A.TXT.GZ"], tokenizer_dir, tmp_path / "e")[1] == want
    for name in ("a.json", "a.json.gz", "a.ndjson"):
        jsonl(tmp_path / name, lines)
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / name)
        assert (
            f"{tmp_path / name}: .json files are not read; name a JSON-lines file (one object per line) .jsonl" in line
        )


def test_a_row_gives_the_lines_of_the_same_text_file(tmp_path, tokenizer_dir):
    """A bad line (NUL, lone surrogate) inside a row is skipped and counted alone, and a row's final line break
    ends its last line, not a document: rows and the same text as lines give the same shards and counts."""
    texts = ["first good line\nsecond has nul \0 here\nthird good line", "next row ok\n", "the cat sat\n"]
    (tmp_path / "a.txt").write_text("".join(t if t.endswith("\n") else t + "\n" for t in texts), encoding="utf-8")
    want_meta, want = shards([tmp_path / "a.txt"], tokenizer_dir, tmp_path / "a")
    got_meta, got = shards([jsonl(tmp_path / "a.jsonl", texts)], tokenizer_dir, tmp_path / "b")
    assert got == want and got_meta["train"]["sentences"] == 4 and got_meta["train"]["documents"] == 1
    for key in ("line_problems", "input_lines", "lines_skipped"):
        assert got_meta[key] == want_meta[key], key
    (tmp_path / "s.jsonl").write_text('{"text": "the cat\\nlone \\ud800 here\\nhello world"}\n')
    meta, _ = shards([tmp_path / "s.jsonl"], tokenizer_dir, tmp_path / "s")
    assert meta["line_problems"]["invalid_utf8"] == 1 and meta["train"]["sentences"] == 2


def test_train_left_empty_by_the_split_says_so(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_text("a b\n\nc d\n\ne f\n")
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "a.txt", "--valid-fraction", "0.9")
    assert "every split unit of the corpus (3) was drawn into valid, leaving train empty: lower --valid" in line


def test_max_seq_len_is_capped_and_the_histogram_sized_by_the_longest_sentence(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_text("hello world the cat sat\nthe cat\n")
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "a.txt", "--max-seq-len", 1 << 40)
    assert "--max-seq-len must be from 3 ([CLS] token [SEP]) to 65,536, got 1099511627776" in line
    meta, _ = shards([tmp_path / "a.txt"], tokenizer_dir, tmp_path / "d", max_seq_len=65536)
    histogram = meta["length_histogram"]
    assert len(histogram) == meta["train"]["max_sentence_len"] + 1 and sum(histogram) == 2 and histogram[-1] == 1


def test_an_input_that_cannot_be_read_is_a_read_error(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Unreadable at the check, or gone once checked: `cannot read PATH`, never `could not write` the output."""
    with pytest.raises(UserError, match=f"cannot read {tmp_path / 'gone.txt'}: No such file"):
        list(iter_line_batches([tmp_path / "gone.txt"], {}))
    victim = tmp_path / "victim.txt"
    for module, command in ((prepare_module, "prepare"), (tokenizer_module, "tokenizer")):
        victim.write_text("hello world\n")
        checked = module.check_corpus
        monkeypatch.setattr(module, "check_corpus", lambda *args, checked=checked: (checked(*args), victim.unlink())[0])
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", victim, command=command)
        assert f"cannot read {victim}: No such file or directory; check that it is there" in line


def test_an_input_without_read_permission_is_refused_before_work(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Checked before any work, for root too (which reads any file): `os.access` is what the check asks."""
    (tmp_path / "a.txt").write_text("hello world\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "a.txt" and real_access(path, mode))
    for command in ("prepare", "tokenizer"):
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "a.txt", command=command)
        assert f"cannot read {tmp_path / 'a.txt'}: no read permission" in line


def test_column_flags_are_taken_when_any_input_has_rows(tmp_path):
    """--text-column/--doc-column are refused only when no input has rows: text files beside a .jsonl are fine."""
    (tmp_path / "a.txt").write_text("hello world\n")
    jsonl(tmp_path / "r.jsonl", ["hello world"])
    corpus = Corpus(files=[tmp_path / "a.txt", tmp_path / "r.jsonl"], text_column="body", doc_column="doc")
    assert corpus_check.check_corpus(corpus).text_column == "body"


def test_the_same_file_twice_and_a_doc_column_that_is_not_there(tmp_path, tokenizer_dir, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("hello world\n")
    os.link(tmp_path / "a.txt", tmp_path / "b.txt")
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", tmp_path / "a.txt", tmp_path / "b.txt")
    assert f"input file {tmp_path / 'b.txt'} is given twice (also as {tmp_path / 'a.txt'})" in line
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", "./a.txt", "a.txt")
    assert "input file a.txt is given twice (also as ./a.txt)" in line
    for command in ("prepare", "tokenizer"):  # a column flag nothing would read was ignored without a word
        line = refused(capsys, tmp_path, tokenizer_dir, "--input", "a.txt", "--text-column", "body", "--doc-column",
                       "doc", command=command)  # fmt: skip
        assert "--text-column and --doc-column name columns of rows" in line and "every input here is a text" in line
    jsonl(tmp_path / "r.jsonl", ["hello world"])
    line = refused(capsys, tmp_path, tokenizer_dir, "--input", "r.jsonl", "--doc-column", "nope")
    assert "no row of r.jsonl has a column 'nope'; pass --doc-column NAME, or none" in line
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hello world"]}).save_to_disk(str(tmp_path / "ds"))
    line = refused(capsys, tmp_path, tokenizer_dir, "--dataset", "ds", "--doc-column", "nope")
    assert "dataset 'ds' has no column 'nope' (its columns: text); pass --doc-column NAME" in line
    line = refused(capsys, tmp_path, tokenizer_dir, "--dataset", "ds", "--split", "test")
    assert "ds holds one split saved whole (a Dataset, not a DatasetDict): drop --split" in line


def test_blank_pieces_of_a_long_line_are_no_document_break(tmp_path, tokenizer_dir, monkeypatch):
    """A line past LONG_LINE_BYTES (4096 here) that is mostly spaces: its blank pieces are dropped, as a text
    file and as rows; only a whole blank line, however long, ends a document."""
    monkeypatch.setattr(text, "LONG_LINE_BYTES", 4096)
    lines = ["first line here", "the cat sat " + " " * 12000 + " hello world", "a b" + " " * 9000, "last line"]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    meta, want = shards([tmp_path / "a.txt"], tokenizer_dir, tmp_path / "a", block_bytes=1000)
    assert meta["train"]["documents"] == 1 and meta["train"]["sentences"] == 5 and meta["input_lines"] == 4
    got_meta, got = shards([jsonl(tmp_path / "a.jsonl", lines)], tokenizer_dir, tmp_path / "b", block_bytes=1000)
    assert got == want and (got_meta["input_lines"], got_meta["long_line_cuts"]) == (4, meta["long_line_cuts"])
    blank = [*lines[:2], " " * 9000, *lines[2:]]  # a whole blank line: a document break
    (tmp_path / "c.txt").write_text("\n".join(blank) + "\n")
    meta, want = shards([tmp_path / "c.txt"], tokenizer_dir, tmp_path / "c", block_bytes=1000)
    assert meta["train"]["documents"] == 2 and meta["input_lines"] == 5
    assert shards([jsonl(tmp_path / "c.jsonl", blank)], tokenizer_dir, tmp_path / "e", block_bytes=1000)[1] == want


def test_a_row_under_a_million_characters_but_over_1_mib_is_cut_like_a_text_line():
    """Rows (jsonl, parquet, datasets) are cut by the text file's rule, in UTF-8 bytes: 400,000 Hangul
    syllables are 1.2 MB, so cut, though under LONG_LINE_BYTES characters."""
    from mlmtrain.text import LONG_LINE_BYTES, _cut_long_lines

    row = "가" * 400_000
    stats = {"long_line_cuts": 0, "input_lines": 0}
    pieces = _cut_long_lines([row], stats)
    assert len(pieces) == 2 and "".join(pieces) == row and stats["long_line_cuts"] == 1
    assert all(len(p.encode()) <= LONG_LINE_BYTES for p in pieces)


def test_line_separators_that_are_no_line_break_here_are_counted_and_said(tmp_path, tokenizer_dir):
    """U+2028 between sentences made one long "line" (cut into pieces across sentences, no valid split) without a
    word; the lines holding such separators (U+2028, U+2029, NEL, VT, FF) are counted now, with what to do."""
    seps = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c"]
    text = "".join(f"the cat sat{sep}hello world\n" for sep in seps) + "a plain line\n"
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    meta, _ = shards([tmp_path / "u.txt"], tokenizer_dir, tmp_path / "d")
    assert meta["other_break_lines"] == 5 and meta["train"]["sentences"] == 6  # read as one sentence each
    assert "5 lines hold line or paragraph separators that are no line break here (U+2028, U+2029, NEL, VT, FF)" in (
        " ".join(data_notes(meta))
    )


def test_a_dataset_data_file_in_another_encoding_says_so():
    """A dataset folder's cp949 text file was "cannot read dataset DS: 'utf-8' codec can't decode byte 0xb4 ...;
    check that its data files are valid and have the same columns": now what it is, and the fix."""
    from mlmtrain.corpus_rows import _guarded

    def rows():
        yield {"text": "hello"}
        "대한민국".encode("cp949").decode("utf-8")

    with pytest.raises(UserError) as refused_:
        list(_guarded(rows(), "dataset ds", "check that its data files are valid"))
    said = str(refused_.value)
    assert said.startswith("cannot read dataset ds: a data file is not UTF-8 ('utf-8' codec can't decode byte 0xb4")
    assert "probably in another encoding (CP949/EUC-KR, Latin-1); convert it first, e.g. `iconv -f cp949" in said


def test_the_start_check_reads_whole_lines_and_every_gzip_by_its_bytes(tmp_path):
    """The encoding check of a file's first 64 KiB drops its last, cut line: a UTF-8 line longer than that (here
    3-byte Hangul, cut mid-character at 65,536 bytes) is no invalid line. A gzip is sniffed decompressed whatever
    its name (a .tgz is a tar too); a damaged one is left to the reading, which says what is wrong with it."""
    long_line = tmp_path / "long.txt"
    long_line.write_text("가" * 30_000 + "\n" + "the cat\n", encoding="utf-8")
    corpus_check._sniff(long_line, long_line.stat().st_size)  # not refused
    (tmp_path / "a.txt").write_bytes(b"the cat sat on the mat\n" * 10)
    with tarfile.open(tmp_path / "c.tgz", "w:gz") as t:
        t.add(tmp_path / "a.txt", arcname="a.txt")
    with pytest.raises(UserError, match="c.tgz is a gzip-compressed tar archive"):
        corpus_check._sniff(tmp_path / "c.tgz", (tmp_path / "c.tgz").stat().st_size)
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes(text.GZIP_MAGIC + b"\xc7\xd1\xb1\xb9\n")  # not gzip past its magic, not UTF-8 either
    corpus_check._sniff(damaged, damaged.stat().st_size)  # no "not valid UTF-8": the read error says "gzip"


def test_only_lines_that_read_whole_as_korean_in_cp949_are_counted(tmp_path):
    """cp949_lines counts the invalid UTF-8 lines that decode as CP949 without a replacement character and hold a
    Hangul syllable: not a Latin-1 line with a pair that reads as Hangul and a byte that reads as nothing, nor one
    that reads whole as Hanja."""
    lines = [
        "한국어 문장".encode("cp949"),  # Korean in CP949: counted
        b"\xc0\xe9 caf\xe9",  # Latin-1 'Àé café': a Hangul syllable, then a lone byte
        b"\xe9\xe9 \xe9\xe9",  # Latin-1 'éé éé': Hanja in CP949, no Hangul
        *[b"the cat sat on the mat"] * 4,
    ]
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = {}
    for _ in iter_line_batches([path], stats):
        pass
    assert (stats["invalid_utf8"], stats["cp949"]) == (3, 1)


def test_a_file_mostly_in_another_encoding_past_its_start_is_refused_by_the_reading(tmp_path):
    """The start check sees 64 KiB: a file whose start is UTF-8 and whose rest is CP949 passes it, and the reading
    applies the same rule to the whole file (half its lines or more not UTF-8), with the whole file's counts."""
    path = tmp_path / "late.txt"
    path.write_bytes(b"the cat sat on the mat\n" * 6_000 + "대한민국은 민주공화국이다.\n".encode("cp949") * 10_000)
    corpus_check.check_inputs([path])  # its first 64 KiB are UTF-8
    with pytest.raises(UserError) as refused:
        for _ in iter_line_batches([path], {}):
            pass
    assert f"10,000 lines of {path} are not valid UTF-8 (and 6,000 are): it is probably" in str(refused.value)


def test_a_small_gzip_read_whole_is_named_whole_in_the_encoding_refusal(tmp_path):
    """The start check compared a gzip's decompressed length with its compressed size: a small .gz read whole was
    "lines of the first 105 bytes of k.txt.gz"."""
    path = tmp_path / "k.txt.gz"
    path.write_bytes(gzip.compress("대한민국은 민주공화국이다.\nthe cat\n".encode("cp949") * 3))
    with pytest.raises(UserError, match=rf"^3 lines of {path} are not valid UTF-8 \(and 3 are\)"):
        corpus_check._sniff(path, path.stat().st_size)


def test_the_unk_note_counts_both_splits_tokens_and_names_the_unk_count():
    """unk_share, shared with the export's fit warnings: the share of [UNK] over train and valid together, and the
    note gives the [UNK] count (not the token count) beside it."""
    from mlmtrain.prepare import unk_share

    meta = {"train": {"tokens": 1000, "unk_tokens": 300, "sentences": 10}, "valid": {"tokens": 200, "unk_tokens": 60,
            "sentences": 2}, "line_problems": {}, "row_problems": {}, "decomposed_hangul_lines": 0,
            "long_line_cuts": 0, "sentences_split": 0, "max_seq_len": 128, "valid_fraction": 0.1}  # fmt: skip
    assert unk_share(meta) == (0.3, 360) and unk_share({}) == (0.0, 0)
    assert data_notes(meta)[0].startswith("30.0% of the tokens (360) are [UNK]: the tokenizer does not know")
