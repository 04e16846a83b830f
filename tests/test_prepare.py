"""Token shards: layout, contents decode back to the input, deterministic split, long sentences split
not dropped, every kind of bad input handled with a clear message or a counted repair, atomic output."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlmtrain import prepare as prepare_module
from mlmtrain.cli import main as cli_main
from mlmtrain.errors import UserError
from mlmtrain.prepare import (
    SPLIT_UNIT_SENTENCES,
    check_tokenizer_match,
    load_split,
    prepare,
    read_meta,
    split_long,
)
from mlmtrain.tokenizer import TokenizerSettings, build_tokenizer, write_tokenizer_dir
from mlmtrain.tokenizer_folder import load_tokenizer


def corpus_documents(path):
    """The sample as a list of documents, each a list of non-blank lines."""
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append(cur)
            cur = []
    return docs + ([cur] if cur else [])


def shard_sentences(shard):
    return [shard.sentence(i).tolist() for i in range(shard.num_sentences)]


def run(inputs, tokenizer_dir, out, **kw):
    kw.setdefault("progress", False)
    return prepare(inputs if isinstance(inputs, list) else [inputs], tokenizer_dir, out, **kw)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_layout_and_meta(data_dir, tokenizer_dir):
    meta = read_meta(data_dir)
    vocab_size = load_tokenizer(tokenizer_dir).get_vocab_size()
    assert meta["vocab_size"] == vocab_size and meta["dtype"] == "uint16" and meta["max_seq_len"] == 128
    assert meta["max_token_id"] < vocab_size
    for split in ("train", "valid"):
        shard = load_split(data_dir, split)
        assert (
            shard.tokens.dtype == np.uint16 and shard.offsets.dtype == np.int64 and shard.doc_offsets.dtype == np.int64
        )
        assert isinstance(shard.tokens, np.memmap)
        lengths = np.diff(shard.offsets)  # (S,)
        assert shard.offsets[0] == 0 and shard.offsets[-1] == len(shard.tokens)
        assert lengths.min() >= 1 and lengths.max() <= 126, "every sentence must fit [CLS] s [SEP] in 128"
        assert shard.doc_offsets[0] == 0 and shard.doc_offsets[-1] == shard.num_sentences
        assert (np.diff(shard.doc_offsets) > 0).all()
        assert meta[split]["sentences"] == shard.num_sentences and meta[split]["tokens"] == len(shard.tokens)
        assert meta[split]["documents"] == shard.num_documents
        assert meta[split]["max_sentence_len"] == lengths.max() and meta[split]["min_sentence_len"] == lengths.min()
    assert meta["valid"]["sentences"] > 0
    assert sum(meta["length_histogram"]) == meta["train"]["sentences"] + meta["valid"]["sentences"]
    assert meta["lines_skipped"] == 0 and meta["lines_repaired"] == 0
    check_tokenizer_match(meta["tokenizer_fingerprint"], tokenizer_dir, "the shards")


def test_shards_decode_back_to_input(tmp_path, sample_corpus, tokenizer_dir):
    """With no valid split, train holds every line in order: token ids equal the tokenizer's, the text
    decodes back, and documents are the blank-line-separated blocks."""
    meta = run(sample_corpus, tokenizer_dir, tmp_path / "d", valid_fraction=0.0, max_seq_len=512)
    tok = load_tokenizer(tokenizer_dir)
    docs = corpus_documents(sample_corpus)
    lines = [line for doc in docs for line in doc]
    shard = load_split(tmp_path / "d", "train")
    assert meta["sentences_split"] == 0 and meta["valid"]["sentences"] == 0
    assert shard.num_sentences == len(lines)
    assert shard_sentences(shard) == [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    for i in range(0, len(lines), 7):
        decoded = tok.decode(shard.sentence(i).tolist())
        assert "".join(decoded.split()) == "".join(lines[i].split()), f"line {i}: {lines[i]!r} -> {decoded!r}"
    assert np.diff(shard.doc_offsets).tolist() == [len(d) for d in docs]


def test_split_covers_everything_and_is_deterministic(tmp_path, sample_corpus, tokenizer_dir, data_dir):
    everything = run(sample_corpus, tokenizer_dir, tmp_path / "all", valid_fraction=0.0)
    meta = read_meta(data_dir)
    for key in ("sentences", "tokens"):
        assert meta["train"][key] + meta["valid"][key] == everything["train"][key]
    all_sentences = sorted(map(tuple, shard_sentences(load_split(tmp_path / "all"))))
    split_sentences = sorted(
        map(tuple, shard_sentences(load_split(data_dir, "train")) + shard_sentences(load_split(data_dir, "valid")))
    )
    assert split_sentences == all_sentences

    # same seed -> byte-identical shards, whatever the read block size; another seed -> another split
    run(sample_corpus, tokenizer_dir, tmp_path / "again", valid_fraction=0.05, seed=0, block_bytes=4096)
    assert files_of(tmp_path / "again") == files_of(data_dir)
    run(sample_corpus, tokenizer_dir, tmp_path / "seed1", valid_fraction=0.05, seed=1)
    assert files_of(tmp_path / "seed1") != files_of(data_dir)


def test_one_document_corpus_still_splits(tmp_path, tokenizer_dir):
    """No blank lines at all (the blog post's corpus format): split units are 64-sentence pieces."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "".join(f"대한민국 헌법 제{i}조 문장이다.\n" for i in range(SPLIT_UNIT_SENTENCES * 20)), encoding="utf-8"
    )
    meta = run(corpus, tokenizer_dir, tmp_path / "d", valid_fraction=0.2, seed=3)
    assert meta["valid"]["sentences"] > 0 and meta["train"]["sentences"] > 0
    assert meta["valid"]["sentences"] % SPLIT_UNIT_SENTENCES == 0
    # a tiny corpus with a valid fraction still gets a non-empty valid split (the last unit moves there)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("첫 문장이다.\n\n둘째 문장이다.\n", encoding="utf-8")
    meta = run(tiny, tokenizer_dir, tmp_path / "t", valid_fraction=0.01)
    assert (meta["train"]["sentences"], meta["valid"]["sentences"]) == (1, 1)


def test_long_sentences_split_not_dropped(tmp_path, sample_corpus, tokenizer_dir):
    meta = run(sample_corpus, tokenizer_dir, tmp_path / "d", valid_fraction=0.0, max_seq_len=10)
    shard = load_split(tmp_path / "d")
    assert np.diff(shard.offsets).max() <= 8 and meta["sentences_split"] > 100
    tok = load_tokenizer(tokenizer_dir)
    lines = [line for doc in corpus_documents(sample_corpus) for line in doc]
    whole = np.concatenate([e.ids for e in tok.encode_batch(lines, add_special_tokens=False)])
    assert np.array_equal(np.asarray(shard.tokens), whole), "pieces must be the consecutive tokens of the sentence"
    assert [len(p) for p in split_long(list(range(130)), 126)] == [65, 65]
    assert [len(p) for p in split_long(list(range(9)), 4)] == [3, 3, 3]


def test_joined_encoding_equals_line_by_line(tokenizer_dir, sample_corpus):
    """encode_lines joins lines with [SEP] for speed: ids must equal encoding each line alone, also when a
    line holds special-token text (then its group falls back to line by line)."""
    tok = load_tokenizer(tokenizer_dir)
    lines = [line for doc in corpus_documents(sample_corpus) for line in doc]
    tricky = ["a [SEP] inside", "[SEP]", "[MASK] 토큰", "\x07", "[CLS][SEP]", "끝 [sep] lower", " "]
    for texts in (lines, lines[:300] + tricky + lines[300:700], tricky):
        got = prepare_module.encode_lines(tok, texts, np.uint16)
        want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        assert [g.tolist() for g in got] == want


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(70000)])
    }
    tok_dir = tmp_path / "big"
    write_tokenizer_dir(build_tokenizer(TokenizerSettings(), vocab), tok_dir, TokenizerSettings())
    corpus = tmp_path / "c.txt"
    corpus.write_text("w69999 w1\nw5\n", encoding="utf-8")
    meta = run(corpus, tok_dir, tmp_path / "d", valid_fraction=0.0)
    shard = load_split(tmp_path / "d")
    assert meta["dtype"] == "uint32" and shard.tokens.dtype == np.uint32
    assert shard.tokens.tolist() == [70004, 6, 10]


def test_messy_lines_are_repaired_or_skipped_and_counted(tmp_path, tokenizer_dir):
    clean = ["첫 문장이다.", "Second sentence here.", "", "다음 문서의 문장이다.", "last one"]
    (tmp_path / "clean.txt").write_text("\n".join(clean) + "\n", encoding="utf-8")
    messy = (
        b"\xef\xbb\xbf"
        + "첫 문장이다.\r\n".encode()
        + b"bad \xff\xfe bytes\r\n"
        + b"Second sentence here.\r\n"
        + b"\r\n   \n\t\n\n"
        + b"nul\x00byte\n"
        + "다음 문서의 문장이다.\n".encode()
        + b"last one"
    )  # no final newline
    (tmp_path / "messy.txt").write_bytes(messy)
    want = run(tmp_path / "clean.txt", tokenizer_dir, tmp_path / "a", valid_fraction=0.0)
    got = run(tmp_path / "messy.txt", tokenizer_dir, tmp_path / "b", valid_fraction=0.0, block_bytes=7)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert got["line_problems"] == {"invalid_utf8": 1, "nul_bytes": 1, "crlf": 4, "bom": 1}
    assert (got["lines_skipped"], got["lines_repaired"]) == (2, 5)
    assert got["train"]["documents"] == want["train"]["documents"] == 2


def test_cr_line_endings_read_as_lines_in_any_block(tmp_path, sample_corpus, tokenizer_dir, monkeypatch):
    """Classic-Mac text (CR only) is cut into blocks at its CRs as LF text is at its LFs: the same lines, not
    one long line cut at spaces. Small blocks and LONG_LINE_BYTES stand in for 1 MiB."""
    from mlmtrain import text

    monkeypatch.setattr(text, "LONG_LINE_BYTES", 4096)
    lf = sample_corpus.read_bytes()
    (tmp_path / "lf.txt").write_bytes(lf)
    (tmp_path / "cr.txt").write_bytes(lf.replace(b"\n", b"\r"))
    want = run(tmp_path / "lf.txt", tokenizer_dir, tmp_path / "a", valid_fraction=0.05, block_bytes=1000)
    got = run(tmp_path / "cr.txt", tokenizer_dir, tmp_path / "b", valid_fraction=0.05, block_bytes=1000)
    assert files_of(tmp_path / "b") == files_of(tmp_path / "a")
    assert (got["input_lines"], got["long_line_cuts"]) == (want["input_lines"], 0)
    assert got["line_problems"]["crlf"] == lf.count(b"\n")


def test_gzip_input_matches_plain(tmp_path, sample_corpus, tokenizer_dir, data_dir):
    gz = tmp_path / "sample.txt.gz"
    gz.write_bytes(gzip.compress(sample_corpus.read_bytes()))
    run(gz, tokenizer_dir, tmp_path / "d", valid_fraction=0.05, seed=0)
    assert files_of(tmp_path / "d") == files_of(data_dir)
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(UserError, match="gzip"):
        run(tmp_path / "fake.gz", tokenizer_dir, tmp_path / "e")
    (tmp_path / "cut.gz").write_bytes(gz.read_bytes()[:-100])  # truncated download
    with pytest.raises(UserError, match="cannot read"):
        run(tmp_path / "cut.gz", tokenizer_dir, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_bad_input_gives_clear_errors(tmp_path, sample_corpus, tokenizer_dir, data_dir, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\r\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x01\n\x80\x81\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    (tmp_path / "afile").write_text("x")
    cases = [
        ([tmp_path / "missing.txt"], tmp_path / "o", "does not exist"),
        ([tmp_path], tmp_path / "o", "is a directory"),
        ([tmp_path / "empty.txt"], tmp_path / "o", "is empty"),
        ([tmp_path / "blank.txt"], tmp_path / "o", "contains no text lines"),
        ([tmp_path / "binary.txt"], tmp_path / "o", r"binary.txt are not valid UTF-8 \(and 0 are\)"),
        ([sample_corpus], data_dir, "already holds token shards"),
        ([sample_corpus], tmp_path / "other", "is not empty"),
        ([sample_corpus], tmp_path / "afile", "is a file"),
        ([], tmp_path / "o", "no input files"),
    ]
    for inputs, out, message in cases:
        with pytest.raises(UserError, match=message):
            run(inputs, tokenizer_dir, out)
        assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="valid-fraction"):
        run([sample_corpus], tokenizer_dir, tmp_path / "o", valid_fraction=1.0)
    with pytest.raises(UserError, match="max-seq-len"):
        run([sample_corpus], tokenizer_dir, tmp_path / "o", max_seq_len=2)
    with pytest.raises(UserError, match=r"--seed must be from 0 to 2\*\*64 - 1, got -1"):
        run([sample_corpus], tokenizer_dir, tmp_path / "o", seed=-1)
    with pytest.raises(UserError, match="no token shards"):
        read_meta(tmp_path)
    assert not list(tmp_path.glob(".tmp_*")), "a failed prepare left its temporary folder"

    assert (
        cli_main(
            [
                "prepare",
                "--input",
                str(tmp_path / "empty.txt"),
                "--tokenizer",
                str(tokenizer_dir),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "prepare: error: input file" in err and "is empty" in err and "Traceback" not in err


def test_other_tokenizer_is_refused(tmp_path, sample_corpus, data_dir):
    from mlmtrain.tokenizer import train_tokenizer

    train_tokenizer([sample_corpus], tmp_path / "tok", TokenizerSettings(vocab_size=1500), progress=False)
    with pytest.raises(UserError, match="another tokenizer"):
        check_tokenizer_match(read_meta(data_dir)["tokenizer_fingerprint"], tmp_path / "tok", "the shards")


def test_interrupted_prepare_leaves_nothing_that_looks_valid(tmp_path, sample_corpus, tokenizer_dir, monkeypatch):
    out = tmp_path / "d"
    run(sample_corpus, tokenizer_dir, out)
    before = files_of(out)
    calls = {"n": 0}
    original = prepare_module._SplitWriter.add_unit

    def add_unit_then_die(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(prepare_module._SplitWriter, "add_unit", add_unit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(sample_corpus, tokenizer_dir, out, overwrite=True, seed=7)
    assert files_of(out) == before, "the old shards must survive an interrupted --overwrite"
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        run(sample_corpus, tokenizer_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    run(sample_corpus, tokenizer_dir, out, overwrite=True, seed=7)
    assert files_of(out) != before


def test_cli_prepare(tmp_path, sample_corpus, tokenizer_dir, capsys):
    out = tmp_path / "d"
    rc = cli_main(
        [
            "prepare",
            "--input",
            str(sample_corpus),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--valid-fraction",
            "0.1",
            "--max-seq-len",
            "64",
            "--seed",
            "5",
        ]
    )
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["valid_fraction"], meta["max_seq_len"], meta["seed"]) == (0.1, 64, 5)
    out_text = capsys.readouterr()
    assert out_text.out.startswith(f"wrote {out}: train ") and "wrote" not in out_text.err  # the result: stdout
    shutil.rmtree(out)


def test_a_line_too_long_to_hold_is_cut_at_spaces_into_the_same_tokens(tmp_path, sample_corpus, monkeypatch):
    """A file without line breaks is read in pieces of about LONG_LINE_BYTES, cut after a space: the tokens are
    those of the whole line (the tokenizer splits words at spaces anyway); without any space, at a character."""
    from mlmtrain import text

    tok_dir = Path(__file__).parent / "assets" / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    monkeypatch.setattr(text, "LONG_LINE_BYTES", 4096)
    words = sample_corpus.read_text(encoding="utf-8").split()
    lines = ["첫 문장이다.", " ".join(words[:3000]), "가" * 5000, "마지막 문장이다."]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = run(tmp_path / "c.txt", tok_dir, tmp_path / "d", valid_fraction=0.0, block_bytes=1000)
    assert meta["long_line_cuts"] >= 6 and (meta["input_lines"], meta["lines_skipped"]) == (4, 0)
    # the same text as rows is cut at the same places (the rule depends on the line only): the same shards
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    rows = run(tmp_path / "c.jsonl", tok_dir, tmp_path / "r", valid_fraction=0.0)
    assert files_of(tmp_path / "r") == files_of(tmp_path / "d") and rows["long_line_cuts"] == meta["long_line_cuts"]
    got = np.asarray(load_split(tmp_path / "d").tokens).tolist()
    want = [t for line in lines[:2] for t in tokenizer.encode(line, add_special_tokens=False).ids]
    assert got[: len(want)] == want  # the long line with spaces: exactly its tokens
    tail = [t for line in lines[3:] for t in tokenizer.encode(line, add_special_tokens=False).ids]
    assert got[-len(tail) :] == tail


def test_a_long_row_reaches_the_tokenizer_a_block_at_a_time(tmp_path, sample_corpus, tokenizer_dir, monkeypatch):
    """A row holding many blocks of text (a book in one JSON line) is cut into LONG_LINE_BYTES lines like a text
    file, and those go to the tokenizer a block at a time, never joined into an input past JOIN_CHARS: memory
    stays what the text file needs (joining 64 such lines made one 64 MiB input). Small sizes stand in for MiB."""
    from mlmtrain import text

    monkeypatch.setattr(text, "LONG_LINE_BYTES", 4096)
    monkeypatch.setattr(prepare_module, "JOIN_CHARS", 4096)
    inputs = []  # the lengths of the tokenizer's inputs, per call

    class Recording:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def encode_batch_fast(self, texts, **kw):
            inputs.extend([[len(t) for t in texts]] if texts else [])
            return self.tok.encode_batch_fast(texts, **kw)

    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda path: Recording(load_tokenizer(path)))
    book = " ".join(sample_corpus.read_text(encoding="utf-8").split()[:20000])  # ~110 KB, ~30 lines of 4 KB
    (tmp_path / "book.txt").write_text(book + "\n", encoding="utf-8")
    (tmp_path / "book.jsonl").write_text(json.dumps({"text": book}, ensure_ascii=False) + "\n", encoding="utf-8")
    want = run(tmp_path / "book.txt", tokenizer_dir, tmp_path / "a", valid_fraction=0.0, block_bytes=16384)
    inputs.clear()
    got = run(tmp_path / "book.jsonl", tokenizer_dir, tmp_path / "b", valid_fraction=0.0, block_bytes=16384)
    assert files_of(tmp_path / "b") == files_of(tmp_path / "a") and got["long_line_cuts"] == want["long_line_cuts"]
    assert len(inputs) > 5 and max(map(sum, inputs)) < 2 * 16384 and max(map(max, inputs)) < 2 * 4096, inputs


def test_memory_stays_bounded_on_a_20_mb_single_line(tmp_path, tokenizer_dir):
    """Peak RSS of `mlmtrain prepare` on one 20 MB line above its peak on one short line (holding the line whole
    took ~2 GB; 50 MB took 4.8 GB). Above, not in all: the libraries' own share differs between builds."""
    import subprocess
    import sys

    line = "대한민국의 주권은 국민에게 있고"
    (tmp_path / "short.txt").write_text(line + "\n", encoding="utf-8")
    (tmp_path / "long.txt").write_text(" ".join([line] * 480_000) + "\n", encoding="utf-8")
    measure = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # fmt: skip
    peak_mb = {}
    for name in ("short", "long"):
        prepare_cmd = [sys.executable, "-m", "mlmtrain.cli", "prepare", "--input", str(tmp_path / f"{name}.txt"),
                       "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / name), "--no-progress"]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", measure, *prepare_cmd], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        peak_mb[name] = int(done.stdout.split()[-1]) / 1024
    print(f"peak RSS {peak_mb}")
    assert peak_mb["long"] - peak_mb["short"] < 300, peak_mb  # 130 MB on the CPU box; holding it whole: ~2 GB


def replaced_tokenizer(tokenizer_dir, tmp_path):
    """(a copy of `tokenizer_dir`, and `replace()`, which puts another tokenizer of the same vocabulary in its
    place, as `mlmtrain tokenizer --out COPY --overwrite --lowercase` would)."""
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"]["lowercase"] = not spec["normalizer"]["lowercase"]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")

    def replace():
        shutil.rmtree(tok)
        shutil.copytree(other, tok)

    return tok, replace


def test_a_tokenizer_replaced_while_prepare_reads_it_leaves_no_shards(
    tokenizer_dir, sample_corpus, tmp_path, monkeypatch
):
    """Shards whose ids came from one tokenizer and whose meta.json names another would train without a word:
    the fingerprint is taken before the tokenizer is read and again before the shards are kept."""
    tok, replace = replaced_tokenizer(tokenizer_dir, tmp_path)
    write_splits = prepare_module._write_splits

    def replaced_meanwhile(*args, **kwargs):
        replace()
        return write_splits(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_write_splits", replaced_meanwhile)
    with pytest.raises(UserError, match=r"changed while `mlmtrain prepare` read it .* nothing was written"):
        prepare([sample_corpus], tok, tmp_path / "data", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "tok"]


def test_a_long_sentence_is_cut_into_the_fewest_near_equal_pieces():
    from mlmtrain.prepare import split_long

    for n, max_len, pieces in ((10, 10, 1), (20, 10, 2), (21, 10, 3), (126, 126, 1), (252, 126, 2), (253, 126, 3)):
        parts = split_long(list(range(n)), max_len)
        assert len(parts) == pieces and sum(parts, []) == list(range(n)), (n, max_len)
        assert max(map(len, parts)) <= max_len and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_line_that_tokenizes_to_nothing_is_counted(tmp_path, tokenizer_dir):
    (tmp_path / "c.txt").write_text("첫 문장이다.\n\x07\x07\nSecond sentence here.\n", encoding="utf-8")
    meta = run(tmp_path / "c.txt", tokenizer_dir, tmp_path / "d", valid_fraction=0.0)
    assert meta["lines_empty_after_tokenizing"] == 1 and meta["train"]["sentences"] == 2


def test_a_document_split_across_the_splits_is_never_joined_over_its_gap(tmp_path):
    """A document's 64-sentence units go to train or valid one by one: two units of one document that are not
    neighbours in a split are two documents there (document packing must not join text across the gap)."""
    import numpy as np

    from mlmtrain.prepare import _SplitWriter

    writer = _SplitWriter(tmp_path / "train", np.uint16, unk_id=1)
    piece = [np.array([7, 8, 9], dtype=np.uint16)]
    for doc, index in ((0, 0), (0, 1), (0, 3), (1, 0)):  # unit 2 of document 0 went to the other split
        writer.add_unit(doc, index, piece)
    counts = writer.close()
    assert counts["documents"] == 3 and counts["sentences"] == 4
    assert np.load(tmp_path / "train" / "doc_offsets.npy").tolist() == [0, 2, 3, 4]
