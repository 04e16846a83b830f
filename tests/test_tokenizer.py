"""WordPiece training: settings honoured, files transformers loads (fast and slow) with identical ids,
Korean kept as Hangul syllables, clear errors for bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mlmtrain.cli import main as cli_main
from mlmtrain.errors import UserError
from mlmtrain.tokenizer import NUM_SPECIAL, SPECIAL_TOKENS, UNK_ID, TokenizerSettings, train_tokenizer
from mlmtrain.tokenizer_folder import load_tokenizer, read_vocab, tokenizer_fingerprint

EXTRA_TEXT = [
    "대한민국은 민주공화국이다.",
    "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다.",
    "Café ÉCOLE naïve Ångström",
    "漢字 한자 混用 test",
    "control\x07char\ttab  double  space",
    "  leading and trailing  ",
    "emoji 😀 and ｆｕｌｌｗｉｄｔｈ",
    "a" * 150,  # longer than max_input_chars_per_word: one [UNK] in both implementations
]
HANGUL = re.compile("[\uac00-\ud7a3]")
JAMO = re.compile("[\u1100-\u11ff]")  # conjoining jamo: what NFD makes of a syllable


def corpus_lines(path):
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def slow_tokenizer(path):
    """The pure-Python BertTokenizer: `BertTokenizerLegacy` in transformers 5 (where use_fast=False is
    ignored), `use_fast=False` before."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, use_fast=False)
    return BertTokenizerLegacy.from_pretrained(path)


def assert_parity(path, texts):
    from transformers import AutoTokenizer

    tok = load_tokenizer(path)
    fast = AutoTokenizer.from_pretrained(path)
    slow = slow_tokenizer(path)
    assert type(fast).__name__ in ("BertTokenizer", "BertTokenizerFast")
    for text in texts:
        want = tok.encode(text).ids
        got_fast, got_slow = fast(text)["input_ids"], slow(text)["input_ids"]
        assert got_fast == want, f"fast AutoTokenizer differs on {text!r}:\n{got_fast}\n{want}"
        assert got_slow == want, f"slow BertTokenizer differs on {text!r}:\n{got_slow}\n{want}"
        assert fast.convert_ids_to_tokens(want) == slow.convert_ids_to_tokens(want)


def test_files_and_special_ids(tokenizer_dir):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    vocab = read_vocab(tokenizer_dir)
    assert vocab[:NUM_SPECIAL] == SPECIAL_TOKENS
    assert len(vocab) == load_tokenizer(tokenizer_dir).get_vocab_size() == len(set(vocab))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config == {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": False,
        "strip_accents": False,
        "tokenize_chinese_chars": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }


def test_autotokenizer_parity_korean_and_english(tokenizer_dir, sample_corpus):
    lines = corpus_lines(sample_corpus)
    korean = [line for line in lines if HANGUL.search(line)]
    english = [line for line in lines if not HANGUL.search(line)]
    assert len(korean) > 300 and len(english) > 300
    assert_parity(tokenizer_dir, korean[::3] + english[::3] + EXTRA_TEXT)


def test_hangul_round_trip_without_unk(tokenizer_dir, sample_corpus):
    tok = load_tokenizer(tokenizer_dir)
    assert not any(JAMO.search(token) for token in read_vocab(tokenizer_dir)), "vocabulary holds decomposed jamo"
    korean = [line for line in corpus_lines(sample_corpus) if HANGUL.search(line)]
    for line, enc in zip(korean, tok.encode_batch(korean, add_special_tokens=False)):
        assert UNK_ID not in enc.ids, f"[UNK] in {line!r}: {enc.tokens}"
        decoded = tok.decode(enc.ids)
        assert "".join(decoded.split()) == "".join(line.split()), f"{line!r} came back as {decoded!r}"


SETTINGS_TEXT = "Café ÉCOLE naïve Ångström 한국어 문장이다\n" * 3 + "The CAFÉ was CLOSED.\n한국어 자전거\n"


@pytest.mark.parametrize("lowercase, strip_accents", [(False, False), (True, False), (False, True), (True, True)])
def test_lowercase_and_strip_accents_honoured(tmp_path, lowercase, strip_accents, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SETTINGS_TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    settings = TokenizerSettings(vocab_size=200, min_frequency=1, lowercase=lowercase, strip_accents=strip_accents)
    train_tokenizer([corpus], out, settings)
    said = "the corpus's 27 Hangul syllables became conjoining jamo" in capsys.readouterr().err  # a Korean trap
    assert said == strip_accents
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["do_lower_case"], config["strip_accents"]) == (lowercase, strip_accents)

    tok = load_tokenizer(out)
    text = "".join(tok.decode(tok.encode("Café ÉCOLE 한국어").ids).split())
    expected = {
        (False, False): "CaféÉCOLE한국어",
        (True, False): "caféécole한국어",
        (False, True): "CafeECOLE",
        (True, True): "cafeecole",
    }[(lowercase, strip_accents)]
    assert text.startswith(expected), f"lowercase={lowercase} strip_accents={strip_accents}: {text!r}"
    if strip_accents:  # NFD splits every Hangul syllable into jamo: the trap the default avoids
        assert JAMO.search(text) and not HANGUL.search(text)
    assert_parity(out, EXTRA_TEXT[:4] + SETTINGS_TEXT.splitlines())


@pytest.mark.parametrize("edit", ["repeat a row", "drop the last rows"])
def test_vocab_txt_that_disagrees_with_tokenizer_json_is_refused_on_first_read(edit, tmp_path, tokenizer_dir):
    """transformers reads ids from vocab.txt, the shards from tokenizer.json: a repeated or missing row would
    train one mapping and export another (found only at export, after the training, until this check)."""
    copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    rows = (copy / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    rows = rows[:10] + [rows[9]] + rows[11:] if edit == "repeat a row" else rows[:-5]
    (copy / "vocab.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="vocab.txt and tokenizer.json disagree on the id of [1-9]"):
        load_tokenizer(copy)


def test_a_vocab_txt_saved_with_a_byte_order_mark_is_named(tmp_path, tokenizer_dir):
    """An editor's UTF-8-with-BOM save: "disagree on the id of 1 tokens" named no cause."""
    copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    (copy / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + (copy / "vocab.txt").read_bytes())
    with pytest.raises(UserError, match=r"vocab.txt starts with a byte-order mark") as refused:
        load_tokenizer(copy)
    assert "token 0 would be '\\ufeff[PAD]'; save it as plain UTF-8." in str(refused.value)


def _edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


FILES_NAMING_MASK = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _leave_a_gap_in_the_ids(tokenizer_json: dict) -> None:
    vocab = tokenizer_json["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] += 10  # ids 0..N-2, then N+9


FOLDER_REFUSALS = {  # name -> (how to spoil a copy of a tokenizer folder, what the sentence says)
    "absent": (lambda t: shutil.rmtree(t), "does not exist; make one with `mlmtrain tokenizer`"),
    "tokenizer_json_not_json": (lambda t: (t / "tokenizer.json").write_text('{"model": '), "cannot read"),
    "no_vocab_txt_nor_wordpiece_ids": (
        lambda t: ((t / "vocab.txt").unlink(), _edit_json(t / "tokenizer.json", _leave_a_gap_in_the_ids)),
        "has no vocab.txt, and tokenizer.json holds no WordPiece vocabulary with ids 0..N-1",
    ),
    "vocab_without_mask": (
        lambda t: [(t / f).write_text((t / f).read_text().replace("[MASK]", "[MASQUE]")) for f in FILES_NAMING_MASK],
        "has no [MASK]: a BERT vocabulary needs [PAD] [UNK] [CLS] [SEP] [MASK]",
    ),
}


@pytest.mark.parametrize("name", list(FOLDER_REFUSALS))
def test_a_tokenizer_folder_that_cannot_serve_is_one_sentence(name, tmp_path, tokenizer_dir):
    """A folder that is gone, a tokenizer.json that is not JSON, no vocabulary to read ids from, a vocabulary
    without one of BERT's five special tokens: each refused where the folder is first read, by name."""
    copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    spoil, words = FOLDER_REFUSALS[name]
    spoil(copy)
    with pytest.raises(UserError) as refused:
        load_tokenizer(copy)
    assert words in str(refused.value) and str(copy) in str(refused.value), refused.value


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"limit_alphabet": 0}, "--limit-alphabet must be at least 1, got 0"),
        ({"min_frequency": 0}, "--min-frequency must be at least 1, got 0"),
        ({"model_max_length": 2}, "--model-max-length must be at least 3 ([CLS] token [SEP]), got 2"),
    ],
)
def test_tokenizer_settings_out_of_range_are_refused_before_reading(settings, words, tmp_path):
    with pytest.raises(UserError) as refused:
        train_tokenizer([tmp_path / "never_read.txt"], tmp_path / "tok", TokenizerSettings(vocab_size=100, **settings))
    assert words in str(refused.value) and not (tmp_path / "tok").exists()


def test_tokens_added_past_the_wordpiece_vocabulary_are_refused(tmp_path, tokenizer_dir):
    """A tokenizer with tokens added past its WordPiece table (transformers' add_tokens, then
    resize_token_embeddings) would give shards ids that vocab.txt and the model's rows disagree on: one sentence,
    before prepare tokenizes anything."""
    from tokenizers import AddedToken, Tokenizer

    folder = shutil.copytree(tokenizer_dir, tmp_path / "added")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken("새토큰")])  # one is enough
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match="has 1 tokens added past its WordPiece vocabulary .'새토큰', ...."):
        load_tokenizer(folder)
    tok.add_tokens([AddedToken("<ent>")])
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match="has 2 tokens added past its WordPiece vocabulary"):
        load_tokenizer(folder)


def test_a_vocab_txt_without_its_last_newline_reads_every_row(tmp_path, tokenizer_dir):
    copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    text = (copy / "vocab.txt").read_text(encoding="utf-8")
    (copy / "vocab.txt").write_text(text.removesuffix("\n"), encoding="utf-8")
    assert read_vocab(copy) == read_vocab(tokenizer_dir)
    load_tokenizer(copy)  # and vocab.txt agrees with tokenizer.json row for row


def test_real_vocab_size_returned_and_fingerprint(tmp_path, tokenizer_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SETTINGS_TEXT, encoding="utf-8")
    size = train_tokenizer([corpus], tmp_path / "tok", TokenizerSettings(vocab_size=30000), progress=False)
    assert NUM_SPECIAL < size < 30000 and size == len(read_vocab(tmp_path / "tok"))

    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tokenizer_dir)
    assert tokenizer_fingerprint(tmp_path / "tok") != tokenizer_fingerprint(tokenizer_dir)
    config = json.loads((copy / "tokenizer.json").read_text())
    config["normalizer"]["lowercase"] = True  # same vocab, other normalization: other ids for the same text
    (copy / "tokenizer.json").write_text(json.dumps(config))
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tokenizer_dir)


def test_limit_alphabet_reports_dropped_characters(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("가나다라마바사아자차카타파하 " * 5 + "\n희귀\n", encoding="utf-8")
    train_tokenizer([corpus], tmp_path / "tok", TokenizerSettings(vocab_size=100, limit_alphabet=10))
    assert "outside limit_alphabet=10: each word holding one reads as [UNK] whole" in capsys.readouterr().err
    # --quiet drops the bar and the settings line only: the result on stdout, the notes on stderr
    argv = ["tokenizer", "--input", str(corpus), "--out", str(tmp_path / "q"), "--vocab-size", "100",
            "--limit-alphabet", "10", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    said = capsys.readouterr()
    assert said.out.startswith("trained a WordPiece vocabulary of ") and "settings:" not in said.err
    assert "outside limit_alphabet=10" in said.err and "trained" not in said.err


def test_strip_accents_on_a_corpus_without_hangul_says_nothing_of_korean(tmp_path, capsys):
    """--strip-accents is the usual setting for English: the Hangul note is for a corpus that has Hangul only."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Café naïve Ångström\nthe cat sat on the mat\n" * 3, encoding="utf-8")
    train_tokenizer([corpus], tmp_path / "tok", TokenizerSettings(vocab_size=200, min_frequency=1, strip_accents=True))
    assert "Hangul" not in capsys.readouterr().err


def test_bad_input_gives_clear_errors(tmp_path, tokenizer_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    cases = {
        "does not exist": [tmp_path / "missing.txt"],
        "is a directory": [tmp_path],
        "is empty": [empty],
        "contains no text lines": [blank],
    }
    for message, inputs in cases.items():
        with pytest.raises(UserError, match=message):
            train_tokenizer(inputs, tmp_path / "out", TokenizerSettings(vocab_size=100), progress=False)
    with pytest.raises(UserError, match="already holds a tokenizer"):
        train_tokenizer([blank], tokenizer_dir, TokenizerSettings(vocab_size=100), progress=False)
    invisible = tmp_path / "invisible.txt"  # lines of zero-width spaces and BEL: a vocabulary of the 5 specials
    invisible.write_text("\u200b\u200b\n\x07\n\u200b\x07\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no token but the special ones came out of .*invisible.txt: its text is only"):
        train_tokenizer([invisible], tmp_path / "none", TokenizerSettings(vocab_size=100), progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer([blank], tmp_path / "out", TokenizerSettings(vocab_size=3), progress=False)
    with pytest.raises(UserError, match="--vocab-size must be .* at most 16,777,216, got 2147483648"):
        train_tokenizer([blank], tmp_path / "out", TokenizerSettings(vocab_size=1 << 31), progress=False)
    with pytest.raises(UserError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match=r"tokenizer\.json is a file, not a tokenizer folder: pass the folder that"):
        load_tokenizer(tokenizer_dir / "tokenizer.json")  # it said the folder did not exist

    # through the CLI: one line on stderr, exit 2, no traceback
    assert cli_main(["tokenizer", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: input file" in err and "Traceback" not in err


def test_a_corpus_of_one_character_gives_a_vocabulary_of_the_specials_and_that_one(tmp_path):
    """The refusal of a specials-only vocabulary is for nothing learned: one token past the specials is a
    vocabulary (a corpus of one letter, beside zero-width spaces the normalizer drops), written."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a\na a\n\u200ba\n", encoding="utf-8")
    assert train_tokenizer([corpus], tmp_path / "tok", TokenizerSettings(vocab_size=100, min_frequency=1),
                           progress=False) == len(SPECIAL_TOKENS) + 1  # fmt: skip
    assert read_vocab(tmp_path / "tok") == [*SPECIAL_TOKENS, "a"]


def test_overwrite_and_no_partial_folder(tmp_path, sample_corpus, monkeypatch):
    out = tmp_path / "nested" / "tok"
    train_tokenizer([sample_corpus], out, TokenizerSettings(vocab_size=1200), progress=False)
    (out / "notes.txt").write_text("kept")  # a user's own file next to the tokenizer: --overwrite is refused
    with pytest.raises(UserError, match=r"also files `mlmtrain tokenizer` did not write \(notes.txt\)"):
        train_tokenizer([sample_corpus], out, TokenizerSettings(vocab_size=1300), overwrite=True, progress=False)
    assert len(read_vocab(out)) == 1200 and (out / "notes.txt").read_text() == "kept"
    (out / "notes.txt").unlink()
    train_tokenizer([sample_corpus], out, TokenizerSettings(vocab_size=1300), overwrite=True, progress=False)
    assert len(read_vocab(out)) == 1300 and (out / ".mlmtrain.json").is_file()

    import mlmtrain.tokenizer as tokenizer_module

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_module, "write_json", die)  # dies after tokenizer.json, before the rest
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer([sample_corpus], tmp_path / "new", TokenizerSettings(vocab_size=600), progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".tmp_*"))


def test_cli_trains_with_flags(tmp_path, sample_corpus):
    out = tmp_path / "tok"
    rc = cli_main(
        [
            "tokenizer",
            "--input",
            str(sample_corpus),
            "--out",
            str(out),
            "--vocab-size",
            "1500",
            "--lowercase",
            "--limit-alphabet",
            "2000",
        ]
    )
    assert rc == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["strip_accents"] is False
    assert len(read_vocab(out)) == 1500
    # every character of the alphabet is kept even when that overshoots the request: the real size wins
    size = train_tokenizer([sample_corpus], tmp_path / "small", TokenizerSettings(vocab_size=300), progress=False)
    assert size > 300 and size == len(read_vocab(tmp_path / "small"))


def test_a_wordpieces_prefix_transformers_cannot_read_is_refused(tmp_path, sample_corpus, tokenizer_dir, capsys):
    """transformers' BertTokenizer rebuilds WordPiece from vocab.txt with "##" whatever tokenizer.json says, so a
    tokenizer trained with "@@" reads every word it splits as [UNK] once exported: refused when training, and
    an existing one (made some other way) is refused by prepare, train and export (`load_tokenizer`)."""
    from cli_run import assert_refused, in_process, run_cli

    from mlmtrain.tokenizer import build_tokenizer, write_tokenizer_dir

    done = run_cli("tokenizer", "--input", sample_corpus, "--out", tmp_path / "tok", "--wordpieces-prefix", "@@")
    assert_refused(done, "--wordpieces-prefix '@@' is not supported")
    assert not (tmp_path / "tok").exists()

    settings = TokenizerSettings(wordpieces_prefix="@@")
    vocab = {("@@" + t[2:] if t.startswith("##") else t): i for i, t in enumerate(read_vocab(tokenizer_dir))}
    write_tokenizer_dir(build_tokenizer(settings, vocab), tmp_path / "at", settings)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "at"))
    assert UNK_ID in hf("국민으로부터 나온다")["input_ids"]  # why it is refused
    args = ["prepare", "--input", sample_corpus, "--tokenizer", tmp_path / "at", "--out", tmp_path / "d"]
    assert_refused(in_process(capsys, *args), "continues words with '@@'")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "text, phrase",
    [
        ('{"do_lower_case": false,', "cannot read"),
        ("[]", "cannot read"),
        ('{"do_lower_case": "yes"}', "has do_lower_case='yes'"),  # transformers' reload at export: a TypeError
        ('{"tokenize_chinese_chars": 0}', "has tokenize_chinese_chars=0"),
        ('{"model_max_length": "big"}', "has model_max_length='big'"),
        ('{"model_max_length": -5}', "has model_max_length=-5"),
    ],
)
def test_a_broken_tokenizer_config_is_refused_where_the_folder_is_first_read(
    text, phrase, tmp_path, sample_corpus, tokenizer_dir, capsys
):
    """Only export reads tokenizer_config.json, but the folder check finds it broken before prepare or train."""
    from cli_run import assert_refused, in_process

    from mlmtrain.tokenizer_folder import read_tokenizer_config

    tok = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    (tok / "tokenizer_config.json").write_text(text)
    args = ["prepare", "--input", sample_corpus, "--tokenizer", tok, "--out", tmp_path / "d"]
    assert_refused(in_process(capsys, *args), f"{tok / 'tokenizer_config.json'}", phrase)
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="tokenizer_config.json"):
        read_tokenizer_config(tok)


def test_a_folder_transformers_would_split_otherwise_is_refused_where_it_matters(tmp_path, tokenizer_dir):
    """transformers' BertTokenizer builds its normalizer and pre-tokenizer itself, from tokenizer_config.json's
    flags (do_lower_case missing: true), not from tokenizer.json. Flags that disagree: the export writes
    tokenizer.json's, so a model trained here reads alike; a transformers model's own folder (--init-from,
    eval --model) is refused, since it learned transformers' split. A normalizer BertTokenizer would replace
    (an NFKC sequence, no clean_text) is refused at every read: no export could be read like training."""
    from mlmtrain.tokenizer_folder import read_tokenizer_config, transformers_casing_problem

    folder = shutil.copytree(tokenizer_dir, tmp_path / "cased")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    del settings["do_lower_case"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert read_vocab(folder) == read_vocab(tokenizer_dir)  # it worked before the check: it still does
    assert read_tokenizer_config(folder)["do_lower_case"] is False  # what the export writes: tokenizer.json's
    problem = transformers_casing_problem(folder)
    assert "with do_lower_case=true (" in problem and "tokenizer_config.json; a missing" in problem
    assert "has lowercase=false" in problem
    # another tokenizer passed for that model (--tokenizer): consistent in itself, but cased where the model is not
    assert transformers_casing_problem(tokenizer_dir) is None
    assert "with do_lower_case=true (" in transformers_casing_problem(tokenizer_dir, model_dir=folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = True  # now both lowercase
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert transformers_casing_problem(folder) is None and read_tokenizer_config(folder)["do_lower_case"] is True

    nfkc = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, tokenizer["normalizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps({**tokenizer, "normalizer": nfkc}))
    with pytest.raises(UserError, match=r"normalizer and pre-tokenizer \(Sequence, BertPreTokenizer\) are not"):
        read_vocab(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    assert read_vocab(folder)  # a class that reads tokenizer.json as it is
    with pytest.raises(UserError, match="--no-clean-text is not supported"):
        TokenizerSettings(clean_text=False).validate()


def test_a_folder_saved_by_transformers_5_has_no_vocab_txt_and_reads_the_same(tmp_path, tokenizer_dir):
    """transformers 5's save_pretrained writes tokenizer.json and tokenizer_config.json only: the vocabulary is
    tokenizer.json's WordPiece table, the same ids and fingerprint as with vocab.txt (which export writes)."""
    from mlmtrain.tokenizer_folder import read_special_tokens, vocab_bytes

    folder = shutil.copytree(tokenizer_dir, tmp_path / "v5")
    (folder / "vocab.txt").unlink()
    assert read_vocab(folder) == read_vocab(tokenizer_dir)
    assert read_special_tokens(folder) == read_special_tokens(tokenizer_dir)
    assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(tokenizer_dir)
    assert vocab_bytes(folder) == (tokenizer_dir / "vocab.txt").read_bytes()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json is missing .make one with `mlmtrain tokenizer`"):
        read_vocab(folder)


def test_strip_accents_null_follows_the_lowercasing_as_bert_normalizer_does():
    """bert-base-uncased's tokenizer_config says strip_accents null: it strips, because it lowercases; a cased
    one with null keeps accents. The casing check compares these effective flags."""
    from mlmtrain.tokenizer_folder import _casing

    assert _casing(True, None, True) == (True, True, True)
    assert _casing(False, None, True) == (False, False, True)
    assert _casing(True, False, False) == (True, False, False)


def _many_words_corpus(path, lines: int, words: int, syllables: int) -> None:
    """Random words of Hangul syllables, 12 to a line: many lines make tokenizers' reading long, many distinct
    words its merges."""
    import random

    rng = random.Random(0)
    alphabet = [chr(0xAC00 + i) for i in rng.sample(range(11172), syllables)]
    vocab = ["".join(rng.choices(alphabet, k=rng.choice((1, 2, 3, 3, 4, 5)))) for _ in range(words)]
    path.write_text("".join(" ".join(rng.choices(vocab, k=12)) + "\n" for _ in range(lines)), encoding="utf-8")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_tokenizer_training_at_once(name, tmp_path):
    """tokenizers reads the corpus on its own threads: a signal used to wait for the whole training (minutes on a
    large corpus). It now ends the command at once, 128 + the signal, nothing written; tokenizers' threads are then
    still reaching into Python, where an ordinary exit could abort (134, seen on this box)."""
    import signal
    import subprocess
    import sys
    import time

    sig = signal.Signals[name]
    corpus = tmp_path / "words.txt"
    _many_words_corpus(corpus, lines=400_000, words=300_000, syllables=600)  # 7 s of training, 5 of them reading
    args = ["tokenizer", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "mlmtrain.cli", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().startswith("settings: ")  # the training starts after this line
    time.sleep(0.5)
    assert proc.poll() is None, "the training ended before the signal: make the corpus larger"
    sent = time.monotonic()
    proc.send_signal(sig)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    waited = time.monotonic() - sent
    said = "interrupted" if sig == signal.SIGINT else f"stopped by {name}"
    assert proc.returncode == 128 + sig and said in err and "Traceback" not in err, (proc.returncode, err)
    assert waited < 1.5, f"the stop took {waited:.1f} s"  # the rest of the training: about 6 s on this box
    assert sorted(p.name for p in tmp_path.iterdir()) == ["words.txt"]  # no tokenizer, no temporary folder


MERGING = """
import atexit, sys, time
import mlmtrain.tokenizer as T

atexit.register(lambda: print("interpreter shutdown", file=sys.stderr, flush=True))  # os._exit runs none of it
print("written before the stop")  # stdout is a pipe: held in its buffer until a flush

build = T.build_tokenizer


class Merging:  # tokenizers' merges: no Python, no GIL, no signal, for longer than the test waits
    def __init__(self, settings):
        self.tok = build(settings)

    def train_from_iterator(self, batches, trainer):
        for _ in batches:
            pass
        print("merging", file=sys.stderr, flush=True)
        time.sleep(120)


T.build_tokenizer = Merging
from mlmtrain.cli import main

sys.argv = ["mlmtrain", "tokenizer", "--input", sys.argv[1], "--out", sys.argv[2], "--no-progress"]
sys.exit(main())
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_merges_ends_the_program_without_waiting_for_them(name, tmp_path, sample_corpus):
    """The merges cannot be stopped: the command's cleanups run, and the program exits at once with 128 + the
    signal (`stop.exit_now`) instead of waiting at the interpreter's exit for the thread that computes them.
    (Python 3.11 marks a thread whose join a signal interrupted as finished, so there the exit would not wait
    either; it would meet tokenizers' threads during the shutdown instead: 1 abort, exit 134, in 12 stops
    without `exit_now` on this box, none in 12 with it. So the test asserts the exit itself: no interpreter
    shutdown ran (atexit), and what the program had written to stdout was flushed first.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    sig = signal.Signals[name]
    cmd = [sys.executable, "-c", MERGING, str(sample_corpus), str(tmp_path / "tok")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as for a user
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    lines = [proc.stderr.readline() for _ in range(2)]
    assert lines[0].startswith("settings: ") and lines[1] == "merging\n", lines
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the program waited for the merges") from None
    said = "interrupted" if sig == signal.SIGINT else f"stopped by {name}"
    assert proc.returncode == 128 + sig and said in err and "Traceback" not in err, (proc.returncode, err)
    assert "interpreter shutdown" not in err and out == "written before the stop\n", (out, err)  # os._exit, flushed
    assert time.monotonic() - sent < 1.5
    assert not (tmp_path / "tok").exists() and not list(tmp_path.glob(".tmp*"))


def test_a_stop_ends_the_tokenizer_reading_at_its_next_batch_and_leaves_the_worker_to_the_exit(monkeypatch):
    """The stop reaches the main thread while tokenizers trains on the worker: it is raised there at once, the
    worker's reading of the corpus ends at its next batch (not at the corpus' end), and the worker is handed to
    `stop.leave_running`, so the program's exit does not wait for it (`stop.exit_now`)."""
    import signal
    import threading
    import time

    from mlmtrain import stop
    from mlmtrain.tokenizer import _train_stoppably

    monkeypatch.setattr(stop, "_left_running", [])  # an in-process exit_now would otherwise end pytest
    read, reading_ended = [], threading.Event()

    def batches():
        for i in range(500):  # 5 s of reading
            read.append(i)
            time.sleep(0.01)
            yield [f"w{i}"]

    class Tokenizer:  # reads as tokenizers does, on the worker thread
        def train_from_iterator(self, iterator, trainer):
            try:
                for _ in iterator:
                    pass
            finally:
                reading_ended.set()

    ctrl_c = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    ctrl_c.start()  # 0.3 s into the reading
    try:
        with pytest.raises(KeyboardInterrupt):
            _train_stoppably(Tokenizer(), batches(), trainer=None)
    finally:
        ctrl_c.cancel()  # a training that returned early must not have pytest take the Ctrl-C
    assert len(read) < 100 and [t.name for t in stop._left_running] == ["mlmtrain-tokenizer"], len(read)
    # (not worker.is_alive(): Python 3.11 marks a thread whose join a KeyboardInterrupt cut short as finished)
    assert reading_ended.wait(timeout=2) and len(read) < 100, len(read)
