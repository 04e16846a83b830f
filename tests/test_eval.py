"""`mlmtrain eval`: a checkpoint and its export give the same loss; `--compare` scores two models on identical
masked positions (the same masks as each scored alone); a corpus is scored as `prepare` would tokenize it; the
unigram baseline and the training loop's validation numbers come from the same code."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from bert_folders import make_bert_folder, swapped_tokenizer
from test_train import tiny_config

from mlmtrain import cli
from mlmtrain.evaluate import never_masked, unigram_cross_entropy, unigram_entropy, unigram_log_probs
from mlmtrain.text import sample_corpus_path
from mlmtrain.train import train

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory, data_dir, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval")
    train(tiny_config(data_dir, tokenizer_dir, root / "run", **{"train.max_steps": 4, "train.eval_every": 4}))
    assert cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "export")]) == 0
    return root / "run", root / "export"


def evaluate_json(capsys, *args) -> dict:
    assert cli.main(["eval", *map(str, args), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == "mlmtrain.eval/1"
    return report


def test_export_and_checkpoint_give_the_same_loss(run_and_export, data_dir, capsys):
    run, export = run_and_export
    from_run = evaluate_json(capsys, "--model", run, "--data", data_dir)
    from_export = evaluate_json(capsys, "--model", export, "--data", data_dir)
    a, b = from_run["models"][0], from_export["models"][0]
    assert a["kind"] == "checkpoint" and a["step"] == 4 and b["kind"] == "export" and b["step"] == 4
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["accuracy"] == b["accuracy"]
    assert from_run["mask_sha256"] == from_export["mask_sha256"] and from_run["targets"] > 100
    assert from_run["unigram_loss"] > 0 and from_run["unigram_fit"] == "train split"
    # the training loop's validation loss is the same computation: its batches (1024 tokens, 2 of them) and masks
    same_batches = evaluate_json(
        capsys, "--model", run, "--data", data_dir, "--tokens-per-batch", 1024, "--max-batches", 2
    )
    summary = json.loads((run / "summary.json").read_text())
    assert same_batches["models"][0]["loss"] == pytest.approx(summary["valid_loss"], rel=1e-5)
    assert same_batches["models"][0]["accuracy"] == summary["valid_accuracy"]


@pytest.mark.parametrize(
    "key, trained, asked", [("layout", "rows", "flat"), ("pack", "document", "sentence")], ids=["rows", "documents"]
)
def test_a_run_is_scored_in_its_own_layout_and_segments(data_dir, tokenizer_dir, tmp_path, capsys, key, trained, asked):
    """A run trained with data.layout = rows validated on row batches, and a document-packed one (the README's
    phase 2) on runs of a document's sentences: eval packs its batches so by default (the same loss as the run's
    validation), and as asked otherwise."""
    run = tmp_path / trained
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 2, f"data.{key}": trained}))
    capsys.readouterr()
    args = ("--model", run, "--data", data_dir, "--tokens-per-batch", 1024, "--max-batches", 2)
    own = evaluate_json(capsys, *args)
    summary = json.loads((run / "summary.json").read_text())
    assert own[key] == trained and own["models"][0]["loss"] == pytest.approx(summary["valid_loss"], rel=1e-5)
    other = evaluate_json(capsys, *args, f"--{key}", asked)
    assert other[key] == asked and other["models"][0]["loss"] != own["models"][0]["loss"]
    if key == "layout":  # rows need --tokens-per-batch a multiple of the rows
        assert cli.main(["eval", *map(str, args[:4]), "--tokens-per-batch", "1000", "--layout", "rows"]) == 2
        assert "--tokens-per-batch = 1000 must be a multiple of it (e.g. 896)" in capsys.readouterr().err
    else:  # a batch below the shards' max_seq_len is raised to it, and said
        assert cli.main(["eval", *map(str, args[:4]), "--tokens-per-batch", "10", "--max-batches", "1"]) == 0
        assert "note: --tokens-per-batch 10 is below the shards' max_seq_len: batches of 128" in capsys.readouterr().err


def test_compare_uses_identical_masks(run_and_export, data_dir, tokenizer_dir, tmp_path, capsys, monkeypatch):
    run, _ = run_and_export
    other = make_bert_folder(tmp_path / "other", tokenizer_dir, "0-4", max_position_embeddings=128)
    common = ("--data", data_dir, "--tokens-per-batch", 2048, "--seed", 3)
    alone_a = evaluate_json(capsys, "--model", run, *common)
    alone_b = evaluate_json(capsys, "--model", other, *common, "--tokenizer", tokenizer_dir)
    both = evaluate_json(capsys, "--model", run, "--compare", other, *common)
    assert alone_a["mask_sha256"] == alone_b["mask_sha256"] == both["mask_sha256"]
    assert alone_a["targets"] == alone_b["targets"] == both["targets"]
    assert [m["loss"] for m in both["models"]] == [alone_a["models"][0]["loss"], alone_b["models"][0]["loss"]]
    assert both["models"][1]["kind"] == "transformers" and both["models"][1]["step"] is None
    other_seed = evaluate_json(capsys, "--model", run, "--data", data_dir, "--tokens-per-batch", 2048)
    assert other_seed["mask_sha256"] != both["mask_sha256"]  # the digest does see the masks

    monkeypatch.chdir(run.parent)  # a short model name: the unigram row overflowed its column
    assert cli.main(["eval", "--model", run.name, "--data", str(data_dir)]) == 0  # the table
    out = capsys.readouterr().out
    assert "loss" in out and "unigram (train split)" in out
    header, *rows = out.splitlines()[1:]
    end = header.index("loss") + len("loss")
    assert len(rows) == 2 and all(re.fullmatch(r"\d+\.\d{4}", row[end - 8 : end].strip()) for row in rows), out


def test_corpus_is_scored_as_prepare_tokenizes_it(run_and_export, sample_corpus, tmp_path, capsys):
    run, _ = run_and_export
    rows = tmp_path / "c.jsonl"
    lines = [line for line in sample_corpus.read_text(encoding="utf-8").split("\n")][:200]
    rows.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines))
    text = tmp_path / "c.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    a = evaluate_json(capsys, "--model", run, "--input", text)
    b = evaluate_json(capsys, "--model", run, "--input", rows)
    assert a["models"][0]["loss"] == b["models"][0]["loss"] and a["mask_sha256"] == b["mask_sha256"]
    assert a["unigram_fit"].startswith("the scored text itself")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--tokens-per-batch", "7", "--tokens-per-batch must be from 8 to 16,777,216, got 7"),
        ("--mask-prob", "1", "--mask-prob must be above 0 and below 1, got 1.0"),
    ],
)
def test_the_edges_of_evals_numbers_are_refused_before_any_model_is_read(tmp_path, capsys, flag, value, message):
    """The closed ends: a batch of 7 tokens, every token masked. Checked before the model or the data is read."""
    assert cli.main(["eval", "--model", str(tmp_path / "none"), "--data", str(tmp_path), flag, value]) == 2
    assert message in capsys.readouterr().err


def test_mistakes_are_sentences(run_and_export, data_dir, tmp_path, capsys):
    run, _ = run_and_export
    cases = [
        (["--model", str(run)], "pass what to score on"),
        (["--model", str(tmp_path / "nothing"), "--data", str(data_dir)], "does not exist"),
        (["--model", str(run), "--data", str(data_dir), "--input", "x.txt"], "or --dataset NAME), not both"),
        (["--model", str(run), "--data", str(data_dir), "--tokenizer", str(tmp_path)], "tokenizer"),
        (["--model", str(run), "--data", str(data_dir), "--seed", "-1"], "--seed must be from 0 to 2**64 - 1, got -1"),
        (["--model", str(run), "--data", str(data_dir), "--tokens-per-batch", "99999999999"], "from 8 to 16,777,216"),
        (
            ["--model", str(run), "--data", str(data_dir), "--mask-prob", "0"],
            "--mask-prob must be above 0 and below 1, got 0.0",
        ),
        (
            ["--model", str(run), "--data", str(data_dir), "--max-batches", "-1"],
            "--max-batches must be 0 (all) or more, got -1",
        ),
        (["--model", str(run), "--data", str(data_dir), "--device", "foo"], "--device must be auto, cpu, cuda or"),
        (
            ["--model", str(run), "--data", str(data_dir), "--device", "cuda:99"],
            "CUDA GPUs are usable here: use --device cpu",
        ),
        (  # eval's own flag is the fix, not `prepare`'s
            ["--model", str(run), "--input", str(sample_corpus_path()), "--max-seq-len", "100000"],
            "--max-seq-len 100000 is longer than the model's 512 learned positions: pass --max-seq-len 512 or less",
        ),
    ]
    for args, message in cases:
        rc = cli.main(["eval", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)


def test_an_export_is_scored_only_on_its_own_tokens(run_and_export, sample_corpus, tmp_path, capsys):
    """--tokenizer beside an export (or a transformers folder) must hold the folder's own tokens id for id, as a
    checkpoint's tokenizer fingerprint already must: the same size with two tokens trading ids used to be scored
    (and compared) on the wrong tokens."""
    _, export = run_and_export
    other = swapped_tokenizer(export, tmp_path / "other")
    rc = cli.main(["eval", "--model", str(export), "--tokenizer", str(other), "--input", str(sample_corpus)])
    err = capsys.readouterr().err
    assert rc == 2 and "has other tokens than" in err and len(err.strip().splitlines()) == 1, err
    rc = cli.main(["eval", "--model", str(export), "--compare", str(export), "--tokenizer", str(other),
                   "--input", str(sample_corpus)])  # fmt: skip
    assert rc == 2 and "has other tokens than" in capsys.readouterr().err


def test_one_unigram_baseline_for_the_card_the_demo_and_eval():
    """Add-one smoothing over the whole vocabulary, the ids the masker never selects blocked (a leading block and a
    later one): the card and the demo (whole validation split) and `mlmtrain eval` (masked targets) score one model.
    They once smoothed over different id ranges: 8.61 against 9.30 nats for the same shards."""
    from mlmtrain.tokenizer import SpecialTokens

    specials = SpecialTokens(0, 1, 2, 3, 4, ((0, 4), (40, 41)))
    vocab_size = 60  # ids 50-59 occur nowhere: they still get their smoothing share, as the model's do
    rng = np.random.default_rng(0)
    train_tokens, valid = rng.integers(0, 50, 2000), rng.integers(0, 50, 500)
    maskable = np.ones(vocab_size, dtype=bool)
    maskable[[0, 1, 2, 3, 4, 40, 41]] = False
    p = (np.bincount(train_tokens, minlength=vocab_size) + 1.0)[maskable]
    p /= p.sum()
    scored = valid[maskable[valid]]
    expected = -np.log(p[np.searchsorted(np.flatnonzero(maskable), scored)]).mean()
    assert unigram_cross_entropy(train_tokens, valid, vocab_size, specials) == pytest.approx(expected, rel=1e-12)
    logp = unigram_log_probs(train_tokens, vocab_size, never_masked(specials, vocab_size))  # what eval scores with
    assert np.isneginf(logp[~maskable]).all() and np.exp(logp[maskable]).sum() == pytest.approx(1.0)
    assert -logp[scored].mean() == pytest.approx(expected, rel=1e-12)
    # the entropy the demo prints beside it counts the same tokens: the blocked ids, a later block included, are
    # left out (it once left out only the leading five)
    counts = np.bincount(train_tokens, minlength=vocab_size)[maskable]
    q = counts[counts > 0] / counts.sum()
    assert unigram_entropy(train_tokens, vocab_size, specials) == pytest.approx(-(q * np.log(q)).sum(), rel=1e-12)


def test_what_is_not_scored_is_said_and_nothing_masked_is_no_score(
    run_and_export, sample_corpus, tmp_path, capsys, monkeypatch
):
    """eval --input skipped invalid UTF-8 and NUL lines without a word; and text too short to mask anything
    scored loss 0.0, perplexity 1.0 (a perfect score) where there was none. Scoring runs without autograd (a
    graph kept across batches grew memory with every one)."""
    import torch

    from mlmtrain.model import BertForMaskedLM

    grad_modes, forward = [], BertForMaskedLM.forward

    def recorded(self, *args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    run, _ = run_and_export
    monkeypatch.setattr(BertForMaskedLM, "forward", recorded)
    text = tmp_path / "c.txt"
    good = "\n".join(sample_corpus.read_text(encoding="utf-8").split("\n")[:100]) + "\n"
    text.write_bytes(good.replace("\n", "\r\n").encode() + b"bad \xff line\nnul\x00line\n")
    assert cli.main(["eval", "--model", str(run), "--input", str(text), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped"] == {"invalid_utf8": 1, "nul_bytes": 1}  # CRLF lines: repaired, scored
    assert err.count("note: ") == 4 and grad_modes and not any(grad_modes)  # prepare's notes, the split one too
    assert "note: 1 sentence longer than 126 tokens was split into consecutive pieces" in err
    short = tmp_path / "short.txt"
    short.write_text("가\n", encoding="utf-8")
    assert cli.main(["eval", "--model", str(run), "--input", str(short)]) == 2
    assert "no token was masked in the 1 batch(es)" in capsys.readouterr().err
    from mlmtrain.metrics import eval_line  # training's validation says so too, and logs null

    assert "masked no token" in eval_line(4, {"valid_loss": None, "valid_accuracy": None})


def test_non_finite_numbers_are_null_in_every_json_file(tmp_path):
    """NaN and Infinity are not JSON: a diverged run's metrics.jsonl and summary.json broke strict readers."""
    from mlmtrain.files import write_json
    from mlmtrain.metrics import MetricsLog

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text!r}"))

    write_json(tmp_path / "summary.json", {"valid_loss": float("nan"), "spread": [float("inf"), 1.5]})
    assert strict((tmp_path / "summary.json").read_text()) == {"valid_loss": None, "spread": [None, 1.5]}
    log = MetricsLog(tmp_path / "metrics.jsonl", False, None)
    log.write({"step": 1, "loss": None, "grad_norm": float("nan")})
    log.close()
    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None}


def test_perplexity_is_exp_of_the_loss_until_a_float_cannot_hold_it():
    from mlmtrain.evaluate import perplexity

    assert perplexity(7.5) == pytest.approx(1808.04, rel=1e-5) and perplexity(10.3) == pytest.approx(29732.6, rel=1e-5)
    assert perplexity(710.0) == float("inf") and perplexity(None) is None and perplexity(float("nan")) != 0


def test_the_baseline_scoring_the_valid_split_is_fitted_on_the_train_split(
    run_and_export, data_dir, capsys, monkeypatch
):
    """Fitted on the split it scores, the unigram baseline would be in-sample (too good) while the report says
    "train split"."""
    from mlmtrain import evaluate

    run, _ = run_and_export
    fitted, fit = [], evaluate.unigram_log_probs
    monkeypatch.setattr(
        evaluate, "unigram_log_probs", lambda tokens, *a: (fitted.append(len(tokens)), fit(tokens, *a))[1]
    )
    report = evaluate_json(capsys, "--model", run, "--data", data_dir, "--max-batches", 1)
    assert report["unigram_fit"] == "train split"
    assert fitted == [json.loads((data_dir / "meta.json").read_text())["train"]["tokens"]]


def test_eval_data_says_nothing_of_the_text_behind_the_shards(run_and_export, data_dir, capsys):
    """The notes of prepare (data_notes) are said for the text eval --input scores; eval --data scores shards whose
    text prepare already spoke of when it made them: nothing said again."""
    from mlmtrain.prepare import data_notes, read_meta

    notes = data_notes(read_meta(data_dir))
    assert notes  # the sample corpus has sentences longer than a row: a note prepare gave
    run, _ = run_and_export
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(run), "--data", str(data_dir), "--max-batches", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["targets"] > 0 and not any(note in err for note in notes), err
