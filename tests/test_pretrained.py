"""Continued pretraining from transformers BERT folders built here (random weights, no download): a 0-4 layout
with custom dimensions and a Google layout. `--init-from` each: the step-0 loss equals transformers' loss on the
same masked batch (fp32), 20 steps train, the export loads back in transformers, the card names the base model;
masking never selects a special or [unused*] id; custom shapes from the config; refusals by name."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from bert_folders import CUSTOM_DIMS, make_bert_folder, swapped_tokenizer
from test_mlm_mask import dense_labels, selected_mask

from mlmtrain import cli
from mlmtrain.config import MaskSpec
from mlmtrain.config_load import load_config
from mlmtrain.errors import UserError
from mlmtrain.evaluate import masker
from mlmtrain.kernels.mlm_mask import max_masked_bound
from mlmtrain.model import BertConfig
from mlmtrain.packing import Packer
from mlmtrain.prepare import load_split, prepare, read_meta, shard_specials
from mlmtrain.pretrained import read_config
from mlmtrain.tokenizer import DEFAULT_SPECIALS
from mlmtrain.tokenizer_folder import read_special_tokens, read_vocab
from mlmtrain.train import setup, train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["0-4", "google"])
def folder_and_data(request, tmp_path_factory, tokenizer_dir, sample_corpus):
    root = tmp_path_factory.mktemp(f"bert_{request.param}")
    folder = make_bert_folder(root / "bert", tokenizer_dir, request.param)
    prepare([sample_corpus], folder, root / "data", valid_fraction=0.05, max_seq_len=128, progress=False)
    return request.param, folder, root / "data"


def run_config(folder, data, out, **overrides):
    base = {
        "out_dir": str(out),
        "data.data_dir": str(data),
        "model.init_from": str(folder),
        "model.dropout": 0.0,
        "data.tokens_per_batch": 1024,
        "train.max_steps": 20,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.device": "cpu",
        "train.compile": "off",
        "optim.lr": 1e-3,
        "optim.warmup_steps": 2,
    }
    return load_config(None, {**base, **overrides})


def transformers_loss(folder, batch, masked) -> float:
    """transformers' BertForMaskedLM loss on the packed batch's real segments, padded one per row."""
    hf = transformers.BertForMaskedLM.from_pretrained(str(folder)).float().eval()
    cu = batch.cu_seqlens.tolist()[: batch.num_segments + 1]
    rows = [(a, b) for a, b in zip(cu[:-1], cu[1:])]
    L = max(b - a for a, b in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    for r, (a, b) in enumerate(rows):
        ids[r, : b - a] = masked.masked_ids[a:b]
        labels[r, : b - a] = dense_labels(masked, masked.masked_ids.numel())[a:b]
        attention[r, : b - a] = 1
    with torch.no_grad():
        return float(hf(input_ids=ids, attention_mask=attention, labels=labels).loss)


def test_init_from_matches_transformers_trains_and_exports(folder_and_data, tmp_path):
    layout, folder, data = folder_and_data
    probe = setup(run_config(folder, data, tmp_path / "probe"))
    try:
        assert probe.plan.model_config.hidden_size == CUSTOM_DIMS["hidden_size"]
        assert probe.plan.model_config.layer_norm_eps == CUSTOM_DIMS["layer_norm_eps"]
        batch = probe.prefetch.get()
        masked = probe.mask(batch.input_ids, step=0, offset=0)
    finally:
        probe.close()
    want = transformers_loss(folder, batch, masked)

    summary = train(run_config(folder, data, tmp_path / "run"))
    losses = [loss for _, loss in summary["losses"]]
    print(layout, "step-0 loss", losses[0], "transformers", want)
    assert losses[0] == pytest.approx(want, rel=1e-5)
    assert summary["steps"] == 20 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]  # the folder's shape decides:
    assert saved["init_from"] == str(folder) and not {"size", "hidden_size", "layer_norm_eps"} & set(saved)  # unsaid

    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    manifest = json.loads((out / "mlmtrain_export.json").read_text())
    assert manifest["verified"]  # transformers loaded it: no missing, unexpected or mismatched keys
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == 0 and config["hidden_size"] == CUSTOM_DIMS["hidden_size"]
    card = (out / "README.md").read_text()
    assert f"continued from a local model (`{folder.name}`)" in card and str(folder) not in card


def test_google_layout_masking_never_selects_a_special(tokenizer_dir, sample_corpus, tmp_path):
    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "google")
    prepare([sample_corpus], folder, tmp_path / "data", valid_fraction=0.05, progress=False)
    meta = read_meta(tmp_path / "data")
    specials = shard_specials(meta)
    vocab = read_vocab(folder)
    never = {i for a, b in specials.never_mask for i in range(a, b + 1)}
    assert (specials.pad, specials.unk, specials.cls, specials.sep, specials.mask) == (0, 100, 101, 102, 103)
    assert never == {i for i, t in enumerate(vocab) if t.startswith("[unused")} | {0, 100, 101, 102, 103}
    assert specials.num_leading == 109 and specials.never_mask_ids() == [len(vocab) - 2, len(vocab) - 1]

    shard = load_split(tmp_path / "data", "train")
    packer = Packer(shard, 2048, 128, seed=0, loop=False, static_shapes=False, specials=specials)
    never_t = torch.tensor(sorted(never))
    # mask half the tokens, every selected one replaced by a random id: the worst case for both rules
    mask = masker(specials, len(vocab), MaskSpec(0.5, 0.0, 1.0), 0, max_masked_bound(2048, 0.5), "cpu")
    selected = 0
    for i, batch in zip(range(10), packer.batches()):
        ids = batch.input_ids
        assert ids[batch.cu_seqlens[:-1][: batch.num_segments].long()].eq(101).all()  # [CLS] is 101 here
        m = mask(ids, step=i)
        chosen = selected_mask(m, ids.numel())
        selected += int(chosen.sum())
        assert not torch.isin(ids[chosen], never_t).any(), "a special or [unused*] id was selected"
        assert not torch.isin(m.masked_ids[chosen], never_t).any(), "a random replacement is never-masked"
    assert selected > 5000


def test_hub_id_is_downloaded_once_named_and_carried_to_the_card(folder_and_data, tmp_path, monkeypatch, capsys):
    """A Hub id goes through huggingface_hub.snapshot_download (faked here: it returns the local folder); the
    checkpoint records it and the card's header names it as base_model."""
    import huggingface_hub

    layout, folder, data = folder_and_data
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg = run_config("tester/tiny-bert", data, tmp_path / "run", **{"train.max_steps": 2})
    train(cfg)
    assert calls and all(c[0] == "tester/tiny-bert" and "model.safetensors" in c[1] for c in calls)
    assert cfg.data.tokenizer_dir == str(folder)  # the model's own tokenizer, recorded in the run config
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-verify"]) == 0
    card = (out / "README.md").read_text()
    assert "base_model: tester/tiny-bert" in card.split("---")[1]

    calls.clear()  # resuming reads the checkpoint and the recorded tokenizer folder: no download
    cfg = load_config(tmp_path / "run" / "config.json", {"train.max_steps": 3})
    resumed = train(cfg, resume="auto", change_max_steps=True)
    assert resumed["steps_this_run"] == 1 and not calls

    # prepare takes a Hub id for its tokenizer: the tokenizer files only
    rc = cli.main(["prepare", "--input", str(cli_corpus(tmp_path)), "--tokenizer", "tester/tiny-bert",
                   "--out", str(tmp_path / "d2"), "--no-progress"])  # fmt: skip
    assert rc == 0 and calls and "model.safetensors" not in calls[0][1]


def cli_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("대한민국은 민주공화국이다.\nThe capital of France is Paris.\n", encoding="utf-8")
    return path


def test_missing_mlm_head_is_initialised(tokenizer_dir, sample_corpus, tmp_path, capsys):
    folder = make_bert_folder(tmp_path / "encoder", tokenizer_dir, "0-4", head=False)
    prepare([sample_corpus], folder, tmp_path / "data", valid_fraction=0.05, progress=False)
    logs = []
    summary = train(run_config(folder, tmp_path / "data", tmp_path / "run", **{"train.max_steps": 2}), log=logs.append)
    assert summary["steps"] == 2
    assert any("the MLM head (5 tensors) initialised" in line for line in logs), logs
    rc = cli.main(["eval", "--model", str(folder), "--data", str(tmp_path / "data")])
    assert rc == 2 and "has no MLM head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value",
    [("hidden_act", "relu"), ("position_embedding_type", "relative_key"), ("model_type", "roberta"),
     ("tie_word_embeddings", False), ("is_decoder", True)],
)  # fmt: skip
def test_unsupported_settings_are_refused_by_name(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **BertConfig().to_hf_dict(), key: value}))
    with pytest.raises(UserError, match=key if key != "model_type" else "roberta"):
        read_config(tmp_path)


def test_init_from_refuses_a_shape_setting_and_the_model_flag(tmp_path, capsys):
    """A shape setting beside init_from is refused however it is given, its default value too (it would be
    ignored); a run's own config.json, which omits them, resumes."""
    with pytest.raises(UserError, match="model.hidden_size=64, from a flag, cannot be combined with model.init_from"):
        load_config(None, {"model.init_from": "x/y", "model.hidden_size": 64})
    for sets in (["model.size=tiny"], ["model.type_vocab_size=2"], ["model.layer_norm_eps=1e-12"]):
        with pytest.raises(UserError, match=f"model.{sets[0].split('=')[0][6:]}=.*, from --set, cannot be combined"):
            load_config(None, {"model.init_from": "x/y"}, sets)
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nsize = "tiny"\ninit_from = "x/y"\n')
    with pytest.raises(UserError, match="model.size=tiny .--model., from the config file .*run.toml, cannot be"):
        load_config(toml)
    saved = load_config(None, {"model.init_from": "x/y", "out_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved.to_dict()))
    assert load_config(tmp_path / "run" / "config.json").model.init_from == "x/y"
    rc = cli.main(["train", "--init-from", "x/y", "--model", "base", "--data", "d", "--out", str(tmp_path)])
    assert rc == 2 and "model.size=base (--model), from a flag, cannot be combined" in capsys.readouterr().err


def test_custom_shape_from_the_config(data_dir, tokenizer_dir, tmp_path):
    cfg = load_config(
        None,
        {"out_dir": str(tmp_path / "run"), "data.data_dir": str(data_dir), "data.tokenizer_dir": str(tokenizer_dir),
         "data.tokens_per_batch": 1024, "train.max_steps": 2, "train.device": "cpu", "train.eval_batches": 1},
        ["model.size=mini", "model.hidden_size=96", "model.num_attention_heads=6", "model.num_hidden_layers=1",
         "model.layer_norm_eps=1e-6", "model.max_position_embeddings=256"],
    )  # fmt: skip
    summary = train(cfg)
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/config.json")).read_text())["model"]
    assert summary["steps"] == 2
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_hidden_layers"]) == (96, 6, 1)
    assert saved["intermediate_size"] == 1024 and saved["layer_norm_eps"] == 1e-6  # mini's, and the override
    with pytest.raises(UserError, match="not divisible"):
        load_config(None, {"model.hidden_size": 101})


def test_default_layout_is_what_mlmtrain_tokenizer_writes(tokenizer_dir, data_dir):
    assert read_special_tokens(tokenizer_dir) == DEFAULT_SPECIALS
    assert DEFAULT_SPECIALS.num_leading == 5 and DEFAULT_SPECIALS.never_mask_ids() == []
    assert shard_specials(read_meta(data_dir)) == DEFAULT_SPECIALS


def test_legacy_weights_are_read_like_the_modern_folder(tokenizer_dir, tmp_path):
    """pytorch_model.bin (read with weights_only) with TF-era LayerNorm gamma/beta names, a pooler and a
    next-sentence head, as BertForPreTraining checkpoints were saved: the same weights, the extras dropped."""
    from safetensors.torch import load_file

    from mlmtrain.pretrained import read_pretrained

    modern = make_bert_folder(tmp_path / "modern", tokenizer_dir, "0-4")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (legacy / name).write_bytes((modern / name).read_bytes())
    weights = load_file(modern / "model.safetensors")
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in weights.items()}  # fmt: skip
    old["bert.pooler.dense.weight"] = torch.zeros(48, 48)
    old["cls.seq_relationship.weight"] = torch.zeros(2, 48)
    torch.save({k: v.half() for k, v in old.items()}, legacy / "pytorch_model.bin")
    a, b = read_pretrained(modern), read_pretrained(legacy)
    assert b.dropped == ["bert.pooler.dense.weight", "cls.seq_relationship.weight"] and not b.initialised
    assert a.weights.keys() == b.weights.keys() and all(b.weights[k].dtype == torch.float32 for k in b.weights)
    assert all(torch.equal(a.weights[k].half().float(), b.weights[k]) for k in a.weights)


def test_an_mlm_bias_stored_under_its_tied_alias_alone_is_the_bias(tokenizer_dir, tmp_path):
    """transformers loads a folder whose MLM bias is stored only as cls.predictions.decoder.bias (its tied alias):
    so does mlmtrain, as the head's bias, not as a missing head."""
    from safetensors.torch import load_file, save_file

    from mlmtrain.pretrained import read_pretrained

    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4")
    weights = load_file(folder / "model.safetensors")
    bias = weights.pop("cls.predictions.bias")
    weights.pop("cls.predictions.decoder.bias", None)
    save_file({**weights, "cls.predictions.decoder.bias": bias}, folder / "model.safetensors")
    read = read_pretrained(folder)
    assert not read.initialised and torch.equal(read.weights["cls.predictions.bias"], bias)


@pytest.mark.parametrize(
    "damage",
    ["truncated safetensors", "garbage safetensors header", "garbage pytorch_model.bin", "pickled code"],
)
def test_damaged_weights_are_one_sentence_naming_the_file(damage, tokenizer_dir, tmp_path):
    """eval --model and train --init-from read a folder's weights: a truncated or corrupted file is refused
    naming it, not a SafetensorError or unpickling traceback (exit 1)."""
    from mlmtrain.pretrained import read_pretrained

    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4")
    weights = folder / "model.safetensors"
    if damage == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage safetensors header":
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    else:
        weights.unlink()
        weights = folder / "pytorch_model.bin"
        if damage == "garbage pytorch_model.bin":
            weights.write_bytes(b"not a torch archive at all")
        else:  # weights_only refuses a pickle that would run code
            import pickle

            weights.write_bytes(pickle.dumps(print))
    unpickled = damage in ("pickled code", "garbage pytorch_model.bin")  # torch's tensors-only unpickler tells
    refused = r"cannot be read as tensors alone \(damaged, or it pickles" if unpickled else "is damaged or not a"
    with pytest.raises(UserError, match=f"{weights.name} {refused}") as e:
        read_pretrained(folder)
    assert "weights_only" not in str(e.value)  # torch's advice to turn the check off is not repeated


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "holds a JSON list, not an object of settings"),
        ({"hidden_size": 48}, "names no model_type; mlmtrain continues pretraining BERT models only"),
        ({"model_type": "bert", "layer_norm_eps": "1e-12"}, "layer_norm_eps='1e-12': a number is expected"),
        ({"model_type": "bert", "num_hidden_layers": 2.0}, "num_hidden_layers=2.0: a whole number is expected"),
        ({"model_type": "bert", "type_vocab_size": True}, "type_vocab_size=True: a whole number is expected"),
        ({"model_type": "bert", "hidden_dropout_prob": None}, "hidden_dropout_prob=None: a number is expected"),
        ({"model_type": "bert", "num_attention_heads": 0}, "num_attention_heads=0: a whole number >= 1 is expected"),
        ({"model_type": "bert", "num_hidden_layers": -2}, "num_hidden_layers=-2: a whole number >= 1 is expected"),
        ({"model_type": "bert", "layer_norm_eps": -1}, "layer_norm_eps=-1: a number > 0.0 is expected"),
        ({"model_type": "bert", "attention_probs_dropout_prob": 1.0}, "a number >= 0.0 and < 1.0 is expected"),
        ({"model_type": "bert", "initializer_range": float("nan")}, "initializer_range=nan: a number is expected"),
        ({"model_type": "bert", "hidden_act": {"x": 1}}, "has hidden_act={'x': 1} in config.json"),
        ({"model_type": "bert", "position_embedding_type": ["absolute"]}, "position_embedding_type=['absolute']"),
    ],
)
def test_config_json_is_read_as_settings_of_the_right_types(tmp_path, config, message):
    """A config.json that is not an object, names no model_type, or holds a setting of the wrong type is one
    sentence before any run starts (a string layer_norm_eps used to fail in the first forward, mid-run)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(message)):
        read_config(tmp_path)


def test_a_tokenizer_with_other_tokens_or_too_few_positions_is_refused_before_the_run(
    tokenizer_dir, data_dir, sample_corpus, tmp_path, capsys
):
    """--tokenizer beside --init-from must hold the folder's own tokens id for id: the same size is not enough
    (each embedding row would train on as another token). Positions too few for the data can only be fixed by
    preparing shorter rows: the folder's weights fix max_position_embeddings. Both: one sentence, exit 2, no run
    folder."""
    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4", max_position_embeddings=64)
    capsys.readouterr()  # transformers' own progress bars
    vocab = read_vocab(folder)
    other = swapped_tokenizer(folder, tmp_path / "other_tokenizer")  # ids 10 and 11 trade tokens
    prepare([sample_corpus], other, tmp_path / "data", valid_fraction=0.05, max_seq_len=64, progress=False)
    capsys.readouterr()
    common = ["--init-from", str(folder), "--max-steps", "1", "--set", "train.device=cpu"]
    rc = cli.main(["train", *common, "--tokenizer", str(other), "--data", str(tmp_path / "data"),
                   "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"other tokens than {folder}'s own (id 10: {vocab[11]!r} against {vocab[10]!r})" in err
    assert not (tmp_path / "run").exists()
    # the folder's own tokens, shards of 128 tokens against its 64 positions
    rc = cli.main(["train", *common, "--tokenizer", str(tokenizer_dir), "--data", str(data_dir),
                   "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "max_position_embeddings is 64: the model's positions are fixed by its weights: re-run" in err
    assert "raise max_position_embeddings" not in err and not (tmp_path / "run").exists()


def test_init_from_a_run_folder_says_to_export_it(tmp_path):
    from mlmtrain.pretrained import locate

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    for name in ("manifest.json", "state.json"):
        (run / "checkpoints" / "step_00000002" / name).write_text("{}")
    for folder in (run, run / "checkpoints" / "step_00000002"):
        with pytest.raises(UserError, match="is an mlmtrain run or checkpoint, not a BERT folder: export it"):
            locate(folder)
    bert = tmp_path / "bert"  # a BERT folder that happens to hold an empty checkpoints/ is one
    (bert / "checkpoints").mkdir(parents=True)
    assert locate(bert) == bert


def test_a_missing_hidden_act_is_transformers_default_and_a_folder_path_is_stored_absolute(
    tokenizer_dir, tmp_path, monkeypatch
):
    """transformers reads a config.json without hidden_act as "gelu" (it was a KeyError traceback here); a
    relative --init-from folder is kept absolute, so a resume, export or eval from another directory finds it
    (and the card never takes the relative path for a Hub id); a Hub id stays as given."""
    folder = make_bert_folder(tmp_path / "models" / "bert", tokenizer_dir, "0-4")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_act"]
    (folder / "config.json").write_text(json.dumps(config))
    assert read_config(folder).hidden_size == CUSTOM_DIMS["hidden_size"]
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {"model.init_from": "models/bert"}).model.init_from == str(folder)
    assert load_config(None, {"model.init_from": "klue/bert-base"}).model.init_from == "klue/bert-base"


def test_a_transformers_folder_given_as_a_checkpoint_is_named_for_what_it_is(tokenizer_dir, tmp_path):
    from mlmtrain.checkpoint import latest_checkpoint

    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4")
    with pytest.raises(
        UserError, match=f"{folder} holds a transformers model, not an mlmtrain checkpoint .*--init-from"
    ):
        latest_checkpoint(folder)


def test_a_model_whose_tokenizer_transformers_reads_otherwise_is_refused(tokenizer_dir, sample_corpus, tmp_path):
    """The model learned text as transformers splits it (tokenizer_config.json's flags); shards made by
    tokenizer.json's other casing would train and score it on text it never saw that way."""
    folder = make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4")
    prepare([sample_corpus], folder, tmp_path / "data", valid_fraction=0.05, max_seq_len=128, progress=False)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": True}))
    with pytest.raises(UserError, match="transformers tokenizes for this model with do_lower_case=true"):
        setup(run_config(folder, tmp_path / "data", tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    rc = cli.main(["eval", "--model", str(folder), "--data", str(tmp_path / "data")])
    assert rc == 2


def test_bert_two_phases_short_rows_then_long_through_the_export(tokenizer_dir, sample_corpus, tmp_path):
    """BERT's recipe: most steps on short rows, the rest on long ones. Phase 2 is a new run started from phase 1's
    export (weights carry over, optimizer and data cursor start fresh), on shards of the export's own tokenizer
    at the longer length: its first loss is phase 1's level, far below a fresh model's."""
    common = ["--tokens-per-batch", "1024", "--eval-every", "0", "--no-compile",
              "--set", "train.device=cpu", "--set", "train.log_every=1", "--set", "model.dropout=0"]  # fmt: skip
    assert cli.main(["prepare", "--input", str(sample_corpus), "--tokenizer", str(tokenizer_dir), "--out",
                     str(tmp_path / "data64"), "--max-seq-len", "64", "--quiet"]) == 0  # fmt: skip
    assert cli.main(["train", "--data", str(tmp_path / "data64"), "--tokenizer", str(tokenizer_dir), "--model", "tiny",
                     "--out", str(tmp_path / "phase1"), "--max-steps", "40", "--lr", "2e-3", *common]) == 0  # fmt: skip
    assert cli.main(["export", "--checkpoint", str(tmp_path / "phase1"), "--out", str(tmp_path / "bert1")]) == 0
    assert cli.main(["prepare", "--input", str(sample_corpus), "--tokenizer", str(tmp_path / "bert1"), "--out",
                     str(tmp_path / "data128"), "--max-seq-len", "128", "--quiet"]) == 0  # fmt: skip
    phase2 = ["train", "--data", str(tmp_path / "data128"), "--max-steps", "5", *common, "--lr", "1e-4"]
    assert cli.main([*phase2, "--init-from", str(tmp_path / "bert1"), "--out", str(tmp_path / "phase2")]) == 0
    from_scratch = [*phase2, "--tokenizer", str(tmp_path / "bert1"), "--model", "tiny"]  # the same run, fresh weights
    assert cli.main([*from_scratch, "--out", str(tmp_path / "fresh")]) == 0

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [row["loss"] for row in map(json.loads, lines) if "loss" in row]

    phase1, phase2, fresh = losses("phase1"), losses("phase2"), losses("fresh")
    print("phase 1", phase1[0], phase1[-1], "phase 2", phase2[0], "fresh", fresh[0])
    assert phase2[0] < phase1[-1] + 0.5 * (phase1[0] - phase1[-1]) and phase2[0] < fresh[0] - 0.5
    assert read_meta(tmp_path / "data128")["max_seq_len"] == 128
    assert cli.main(["export", "--checkpoint", str(tmp_path / "phase2"), "--out", str(tmp_path / "bert2")]) == 0
    assert "continued from a local model (`bert1`)" in (tmp_path / "bert2" / "README.md").read_text()
