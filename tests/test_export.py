"""`mlmtrain export`: a random-initialised model saved as an mlmtrain checkpoint, exported, and loaded back by
transformers with no hand edits; logits per sentence equal our packed forward (<= 1e-4, fp32)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F

from mlmtrain import cli
from mlmtrain.checkpoint import save_checkpoint
from mlmtrain.errors import UserError
from mlmtrain.export import export_folder, verify_export
from mlmtrain.model import TIED_KEYS, BertConfig, BertForMaskedLM

transformers = pytest.importorskip("transformers")

WIDGET = "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다."
SENTENCES = ["산악 자전거 경기는 상대적으로 새로운 스포츠로 1990년대에 활성화 되었다.", "안녕하세요.", "가"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir):
    """A run folder holding one checkpoint of a random tiny model (as `mlmtrain train` writes it)."""
    from mlmtrain.tokenizer_folder import read_vocab, tokenizer_fingerprint

    torch.manual_seed(0)
    config = BertConfig.from_size("tiny", len(read_vocab(tokenizer_dir)), max_position_embeddings=64)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # a non-zero bias so a dropped or untied bias would show in the logits
        model.cls.predictions.bias.normal_(0, 0.5)
    run_dir = tmp_path_factory.mktemp("run")
    run_config = {"data": {"tokenizer_dir": str(tokenizer_dir), "data_dir": ""}, "optim": {"lr": 5e-4}}
    state = {
        "valid_loss": 4.5,
        "command": "mlmtrain train --model tiny",
        "real_tokens": 12345,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
    }
    save_checkpoint(run_dir, 42, model, None, run_config, state)
    return run_dir, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run, tokenizer_dir):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("export") / "tiny-ko"
    rc = cli.main(
        [
            "export",
            "--checkpoint",
            str(run_dir),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--language",
            "ko",
            "--widget-text",
            WIDGET,
        ]
    )
    assert rc == 0
    return out


def test_folder_has_every_file_with_manifest(exported, trained_run):
    manifest = json.loads((exported / "mlmtrain_export.json").read_text())
    expected = {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    }
    assert set(manifest["files"]) == expected
    assert {p.name for p in exported.iterdir()} == expected | {"mlmtrain_export.json", ".mlmtrain.json"}
    assert json.loads((exported / ".mlmtrain.json").read_text())["made_by"] == "mlmtrain export"
    for name, entry in manifest["files"].items():
        data = (exported / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert manifest["step"] == 42 and manifest["verified"] is True and manifest["mlmtrain_version"]
    assert manifest["run"] == str(trained_run[0]) and manifest["checkpoint"].endswith("step_00000042")
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    assert manifest["verification"]["fill_mask"][WIDGET]


def test_weights_and_config_are_transformers_layout(exported, trained_run):
    from safetensors import safe_open

    _, model = trained_run
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert keys == set(model.state_dict()) - set(TIED_KEYS)  # ties stored once, no position_ids buffer
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"
    assert config["vocab_size"] == len((exported / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert BertConfig.from_dict(config) == model.config
    tok_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == 64 and tok_config["mask_token"] == "[MASK]"
    assert "added_tokens_decoder" not in tok_config and "auto_map" not in tok_config


def test_model_card(exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    data = card.data.to_dict()
    assert data["language"] == "ko" and data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "fill-mask"
    assert data["mask_token"] == "[MASK]" and data["widget"] == [{"text": WIDGET}]
    assert "4.5000 nats" in card.text and "mlmtrain train --model tiny" in card.text
    assert "42" in card.text and "12,345" in card.text


def test_transformers_logits_equal_our_packed_forward_per_sentence(exported, trained_run):
    _, model = trained_run
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(exported)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    encoded = [torch.tensor(tok(s)["input_ids"]) for s in SENTENCES]
    lengths = torch.tensor([len(e) for e in encoded])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])
    with torch.no_grad():
        ours = model(torch.cat(encoded), position_ids, cu_seqlens, int(lengths.max()), torch.arange(int(lengths.sum())))
        for ids, start in zip(encoded, cu_seqlens.tolist()):
            pad = 5  # alone, with padding, as a transformers user runs it
            theirs = hf(
                input_ids=F.pad(ids, (0, pad))[None],
                attention_mask=(torch.arange(len(ids) + pad) < len(ids)).long()[None],
            ).logits[0, : len(ids)]
            diff = (ours[start : start + len(ids)] - theirs).abs()
            assert diff.max() <= 1e-4, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_verify_catches_a_model_that_differs(exported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_act"] = "relu"  # transformers would now compute something else than we trained
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="logits differ from ours by up to"):
        verify_export(broken, [WIDGET])


def test_verify_catches_a_tokenizer_transformers_reads_otherwise(exported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.update(do_lower_case=True, strip_accents=True)  # transformers would split Hangul into jamo
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="AutoTokenizer splits .* but tokenizer.json gives"):
        verify_export(broken, [WIDGET])


def test_an_export_that_fails_verification_never_replaces_a_good_one(trained_run, tokenizer_dir, tmp_path, monkeypatch):
    import mlmtrain.export

    run_dir, _ = trained_run
    good = tmp_path / "good"
    export_folder(run_dir, tokenizer_dir, good, verify=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def fails(folder, widgets):
        raise UserError("transformers' logits differ from ours by up to 3")

    monkeypatch.setattr(mlmtrain.export, "verify_export", fails)
    with pytest.raises(UserError, match="was not written: it failed verification.*previous .* is unchanged"):
        export_folder(run_dir, tokenizer_dir, good, overwrite=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no temporary sibling left
    with pytest.raises(UserError, match="failed verification"):  # a new folder is written, to be inspected
        export_folder(run_dir, tokenizer_dir, tmp_path / "new", overwrite=True)
    assert json.loads((tmp_path / "new" / "mlmtrain_export.json").read_text())["verified"] is False


def test_a_token_pasted_into_the_card_is_refused_before_anything_is_written(trained_run, tokenizer_dir, tmp_path):
    token = "hf_fakeWriteTokenA1b2C3d4E5f6G7h8I9j0"
    run_dir, _ = trained_run
    for flags in ({"name": f"alice/{token}"}, {"widget_texts": [f"{token} [MASK]"]}):
        with pytest.raises(UserError, match="looks like a Hugging Face token") as refused:
            export_folder(run_dir, tokenizer_dir, tmp_path / "export", **flags)
        assert token not in str(refused.value) and not (tmp_path / "export").exists()


def test_a_checkpoint_retired_while_it_is_read_is_not_called_damaged(trained_run, tmp_path, monkeypatch, capsys):
    """Export of a run that is training with keep_checkpoints=1: while the reader checks step 42, step 43
    lands and 42 is retired. The reader takes 43 and says nothing of damage (it used to see 42 half deleted:
    "skipping damaged checkpoint ... optimizer.safetensors is missing", then "no complete checkpoint")."""
    import shutil

    from mlmtrain import checkpoint

    source, model = trained_run
    run = shutil.copytree(source, tmp_path / "run")
    saved, state = checkpoint.read_state(run / "checkpoints" / "step_00000042")
    real = checkpoint.verify_checkpoint

    def training_meanwhile(ckpt):
        if ckpt.name == "step_00000042" and ckpt.exists():
            state_43 = {k: v for k, v in state.items() if k != "step"}
            checkpoint.save_checkpoint(run, 43, model, None, saved["run"], state_43, keep=1)
        return real(ckpt)

    monkeypatch.setattr(checkpoint, "verify_checkpoint", training_meanwhile)
    notes = []
    assert checkpoint.latest_checkpoint(run, log=notes.append).name == "step_00000043"
    assert notes == [] and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000043"]


def test_a_checkpoint_retired_after_its_check_is_replaced_by_the_newer_one(trained_run, tmp_path, monkeypatch):
    """The same race one step later: step 42 passes its check, then step 43 lands and 42 is retired before its
    weights are read. The export reads 43 (it used to fail: "checkpoint step_42 is damaged: ... unreadable")."""
    import shutil

    from mlmtrain import checkpoint

    source, model = trained_run
    run = shutil.copytree(source, tmp_path / "run")
    saved, state = checkpoint.read_state(run / "checkpoints" / "step_00000042")
    real = checkpoint.read_checkpoint

    def training_meanwhile(ckpt):
        if ckpt.name == "step_00000042":
            state_43 = {k: v for k, v in state.items() if k != "step"}
            checkpoint.save_checkpoint(run, 43, model, None, saved["run"], state_43, keep=1)
        return real(ckpt)

    monkeypatch.setattr(checkpoint, "read_checkpoint", training_meanwhile)
    manifest = export_folder(run, None, tmp_path / "export", verify=False)  # the tokenizer: the run's own
    assert manifest["step"] == 43 and (tmp_path / "export" / "model.safetensors").is_file()


def test_a_tokenizer_without_vocab_txt_exports_one(trained_run, tokenizer_dir, tmp_path):
    """A transformers 5 tokenizer folder (no vocab.txt): the export writes the vocab.txt that older transformers
    and the slow tokenizer read, and passes its own check."""
    import shutil

    v5 = shutil.copytree(tokenizer_dir, tmp_path / "v5")
    (v5 / "vocab.txt").unlink()
    export_folder(trained_run[0], v5, tmp_path / "export")
    assert (tmp_path / "export" / "vocab.txt").read_bytes() == (tokenizer_dir / "vocab.txt").read_bytes()


def test_an_export_changed_after_it_was_written_is_not_read_as_a_model(exported, tmp_path):
    """eval --model and train --init-from read exports through read_pretrained: a flipped byte in the weights'
    data still parses, so the manifest's sha256 is what tells."""
    import shutil

    from mlmtrain.pretrained import read_pretrained

    assert read_pretrained(exported).weights
    changed = shutil.copytree(exported, tmp_path / "changed")
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # in the last tensor's data, past the JSON header
    (changed / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="is a damaged export: model.safetensors does not match its sha256"):
        read_pretrained(changed)


def test_bf16_export_without_verify(trained_run, tokenizer_dir, tmp_path):
    from safetensors import safe_open

    run_dir, model = trained_run
    manifest = export_folder(run_dir, tokenizer_dir, tmp_path / "bf16", dtype="bf16", verify=False, name="me/bert")
    assert manifest["verified"] is False and manifest["dtype"] == "bf16" and manifest["name"] == "me/bert"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("bert.embeddings.word_embeddings.weight")
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, model.bert.embeddings.word_embeddings.weight.detach().bfloat16())
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # the key transformers 5 reads
    hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path / "bf16"))
    if isinstance(hf_config.dtype, str):  # transformers < 4.56 keeps the unknown `dtype` key as a plain string...
        # ...and loads the weights' dtype under torch_dtype="auto", as export.py says
        auto = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "bf16"), torch_dtype="auto")
        assert auto.dtype == torch.bfloat16
    else:
        assert hf_config.dtype == torch.bfloat16
    readme = (tmp_path / "bf16" / "README.md").read_text(encoding="utf-8")
    from mlmtrain.card import default_widget
    from mlmtrain.tokenizer_folder import read_vocab

    assert default_widget([], read_vocab(tokenizer_dir)) in readme  # default widget when no language is given
    assert "[UNK]" not in readme.split("## Limits")[1]  # a tokenizer that fits its text: no warning


def test_user_mistakes_are_sentences(trained_run, tokenizer_dir, tmp_path, sample_corpus, capsys):
    from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer

    run_dir, _ = trained_run
    with pytest.raises(UserError, match="has no \\[MASK\\]"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "a", widget_texts=["no mask here"], verify=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty and was not made by `mlmtrain export`"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "full", verify=False)
    other = tmp_path / "other_tokenizer"
    size = train_tokenizer([sample_corpus], other, TokenizerSettings(vocab_size=500), progress=False)
    with pytest.raises(UserError, match=f"vocab_size {trained_run[1].config.vocab_size} but the tokenizer has {size}"):
        export_folder(run_dir, other, tmp_path / "b", verify=False)
    assert not (tmp_path / "b").exists()  # nothing written on a failed check
    with pytest.raises(UserError, match="--base-model takes a Hub model id like klue/bert-base, got 'not a hub id'"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "b", base_model="not a hub id", verify=False)
    with pytest.raises(UserError, match="--license takes a license identifier like apache-2.0"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "b", license="my license", verify=False)
    with pytest.raises(UserError, match="was pretrained from scratch .* drop --base-model"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "b", base_model="klue/bert-base", verify=False)
    rc = cli.main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_card_from_a_real_run(data_dir, tokenizer_dir, tmp_path, capsys):
    """A card made from a training run: title from --name, languages as a YAML list, the user's extra section,
    values that said `auto` resolved, the tokenizer and prepare commands, data statistics, validation accuracy
    and the unigram baseline; it round-trips through ModelCard.load and the export check still passes. The
    files are readable (0644 under umask 022, though safetensors writes 0600)."""
    import os
    import stat

    import numpy as np
    from huggingface_hub import ModelCard
    from test_train import tiny_config

    from mlmtrain.evaluate import unigram_cross_entropy
    from mlmtrain.export_check import check_export_folder
    from mlmtrain.prepare import load_split, shard_specials
    from mlmtrain.train import train

    run = tmp_path / "run"
    cfg = tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 2, "optim.warmup_steps": 0})
    assert cfg.train.precision == "auto"
    train(cfg)
    extra = tmp_path / "extra.md"
    extra.write_text("## Intended use\n\nResearch on Korean MLMs only.\n", encoding="utf-8")
    out = tmp_path / "export"
    umask = os.umask(0o022)
    try:
        argv = ["export", "--checkpoint", str(run), "--out", str(out), "--no-verify", "--name", "me/ko-tiny"]
        capsys.readouterr()
        rc = cli.main([*argv, "--language", "ko", "--language", "en", "--card-extra", str(extra)])
    finally:
        os.umask(umask)
    assert rc == 0 and check_export_folder(out) == []
    assert "PATH_OR_REPO_ID" not in capsys.readouterr().err  # named: the card's usage example loads me/ko-tiny
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "unnamed"), "--no-verify"]) == 0
    assert "note: the model card's usage example loads PATH_OR_REPO_ID" in capsys.readouterr().err
    assert {oct(stat.S_IMODE((out / n).stat().st_mode)) for n in os.listdir(out)} == {"0o644"}

    card = ModelCard.load(out / "README.md")
    assert card.data.language == ["ko", "en"]
    text = card.text
    assert text.lstrip().startswith("# me/ko-tiny") and 'pipeline("fill-mask", model="me/ko-tiny")' in text
    assert "## Intended use" in text and "Research on Korean MLMs only." in text
    assert not re.search(r"\bauto\b", text), "a value the run resolved is shown as auto"
    assert "precision fp32" in text and "warm-up over 1 step," in text and "1024 tokens per micro-batch" in text
    assert "mlmtrain tokenizer --input sample_corpus.txt --out tokenizer --vocab-size 2000" in text
    assert "mlmtrain prepare --input sample_corpus.txt --tokenizer tokenizer --out data --valid-fraction 0.05" in text
    meta = json.loads((data_dir / "meta.json").read_text())
    assert f"| train | {meta['train']['documents']:,} | {meta['train']['sentences']:,} |" in text
    state = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "state.json").read_text())
    assert f"| masked-token accuracy | {state['metrics']['valid_accuracy']:.3f} |" in text
    assert state["metrics"]["step"] == state["step"] == 2 and "the evaluation at step" not in text
    train_tokens, valid_tokens = (np.asarray(load_split(data_dir, s).tokens) for s in ("train", "valid"))
    baseline = unigram_cross_entropy(train_tokens, valid_tokens, meta["vocab_size"], shard_specials(meta))
    assert f"| unigram baseline loss | {baseline:.4f} nats" in text


def test_a_card_leaves_out_shards_rewritten_after_training(data_dir, tokenizer_dir, tmp_path, capsys):
    """`prepare --overwrite` into the run's data folder after training: the card must not describe those shards
    (their statistics, prepare command and unigram baseline) as the data the weights saw."""
    from test_train import tiny_config

    from mlmtrain.train import train

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data_dir, data)
    train(tiny_config(data, tokenizer_dir, run, **{"train.max_steps": 1}), log=lambda m: None)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "seed": meta["seed"] + 1}))  # as another split would
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export"), "--no-verify"]) == 0
    assert f"note: the run's token shards ({data}) changed after it trained" in capsys.readouterr().err
    text = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    assert "### Data" not in text and "mlmtrain prepare" not in text and f"--seed {meta['seed'] + 1}" not in text
    assert "| unigram baseline loss | not computed: the run's token shards were not found, or had changed" in text


def test_language_list_forms(trained_run, tokenizer_dir, tmp_path):
    from huggingface_hub import ModelCard

    run_dir, _ = trained_run
    export_folder(run_dir, tokenizer_dir, tmp_path / "a", language="ko,en", verify=False)
    assert ModelCard.load(tmp_path / "a" / "README.md").data.language == ["ko", "en"]
    with pytest.raises(UserError, match="ISO 639 codes"):
        export_folder(run_dir, tokenizer_dir, tmp_path / "b", language="ko en", verify=False)
    with pytest.raises(UserError, match="starts with a YAML header"):
        (tmp_path / "x.md").write_text("---\nlicense: mit\n---\n")
        export_folder(run_dir, tokenizer_dir, tmp_path / "c", card_extra=tmp_path / "x.md", verify=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_card_extra_that_cannot_be_a_section_is_one_sentence(tmp_path):
    """--card-extra: a file that is absent, not UTF-8 text, empty, or a card of its own (YAML header)."""
    from mlmtrain.card import read_card_extra

    extra = tmp_path / "extra.md"
    for content, words in (
        (None, "does not exist"),
        ("안녕".encode("cp949"), "is not a readable UTF-8 text file"),
        (b"  \n\n", "is empty"),
        (b"---\nlicense: mit\n---\n", "starts with a YAML header"),
    ):
        if content is not None:
            extra.write_bytes(content)
        with pytest.raises(UserError, match=f"--card-extra {re.escape(str(extra))} {words}"):
            read_card_extra(extra)
    extra.write_text("## Limits\n\nTrained on news.\n", encoding="utf-8")
    assert read_card_extra(extra) == "## Limits\n\nTrained on news."


def test_the_public_card_shows_no_local_path():
    """The card's Reproduce block and data line name local paths by their last part only (the shards and the
    tokenizer as the commands above it make them), whatever started the program; Hub ids stay whole."""
    from mlmtrain.card import _data_text, _input_name, _pretty_command

    recorded = (
        "/home/alice/.venv/bin/python /home/alice/mlmtrain/trainer/cli.py train --data /home/alice/ko/data "
        "--tokenizer=/home/alice/ko/tok --out /home/alice/runs/r1 --init-from klue/bert-base "
        "--set data.data_dir=/home/alice/x --config ./secret/run.toml --resume ~/runs/r1/checkpoints/step_00000002"
    )
    shown = _pretty_command(recorded, "klue/bert-base")  # the run recorded it as a Hub id (its base_model)
    assert shown == (
        "mlmtrain train --data data --tokenizer=tokenizer --out r1 --init-from klue/bert-base "
        "--set data.data_dir=data --config run.toml --resume step_00000002"
    )
    # a relative dir/name looks like a Hub id: the run's base_model says which it was (train's --tokenizer: a folder)
    relative = "mlmtrain train --data runs/data --tokenizer demo/tok --init-from work/bert128 --out out/run"
    assert _pretty_command(relative) == "mlmtrain train --data data --tokenizer tokenizer --init-from bert128 --out run"
    # recorded with shlex (since 2026-12-01): a path holding '=' or spaces is one word, shown by its last part
    words = ["/w/sweep/lr=1e-3/bin/mlmtrain", "train", "--data", "/w/my data/shards", "--out", "/w/lr=1e-3/my run"]
    assert _pretty_command(shlex.join(words)) == "mlmtrain train --data data --out 'my run'"
    assert "/w" not in _pretty_command("mlmtrain train --data file:///w/d --set model.init_from=/w/m/bert")
    words = ["mlmtrain", "train", "--set=data.data_dir=/w/s=d/my data", "--out", "C:\\Users\\al\\run"]
    assert _pretty_command(shlex.join(words)) == "mlmtrain train --set data.data_dir=data --out run"
    old_windows = "C:\\Users\\al\\venv\\Scripts\\mlmtrain.exe train --out C:\\Users\\al\\run --init-from \\\\srv\\b"
    assert _pretty_command(old_windows) == "mlmtrain.exe train --out run --init-from b"
    assert _pretty_command("/opt/venv/bin/mlmtrain train --data d") == "mlmtrain train --data data"
    assert _data_text(None, {"data_dir": "/home/alice/ko/data"}) == "token shards in `data`"
    assert _input_name({"dataset": "/home/alice/private_ds", "split": "train"}) == "private_ds (train)"
    assert _input_name({"dataset": "klue/ynat", "split": "train"}) == "klue/ynat (train)"


def test_the_card_shows_every_command_that_trained_the_weights():
    """A resumed run's card showed only its last command (`--config config.json --resume`), which reproduces
    nothing; it shows every recorded command in order, and one alone as before."""
    from mlmtrain.card import _commands

    first, again = "mlmtrain train --data /d --tokenizer /t --out /r --lr 2e-3", "mlmtrain train --out /r --resume"
    shown = _commands(None, None, [first, again], None)
    at = shown.index("# training: the command lines the run recorded, in order (each after the first resumed it)")
    assert shown[at + 1 :] == [
        "mlmtrain train --data data --tokenizer tokenizer --out r --lr 2e-3",
        "mlmtrain train --out r --resume",
    ]
    assert _commands(None, None, [first], None)[-2:] == ["# training: the command line the run recorded", shown[at + 1]]
    assert _commands(None, None, [None], None)[-1] == "# (not recorded)"  # a checkpoint that recorded none


def test_the_card_says_which_position_embeddings_the_segments_reached():
    """A phase-2 card (512-token shards, 512 positions) said the positions past 512 (up to 512) were never trained;
    a model continued from another may have trained the ones its own shards did not reach."""
    from mlmtrain.card import _positions_text

    assert (
        _positions_text({"max_seq_len": 512}, 512, False)
        == "Trained on segments of up to 512 tokens: every position embedding. "
    )
    assert _positions_text({"max_seq_len": 128}, 512, False).endswith("past that (up to 512) were never trained. ")
    assert _positions_text({"max_seq_len": 128}, 512, True).endswith("(up to 512) were not trained in this run. ")
    assert _positions_text(None, 512, False) == ""


def test_the_default_widget_is_the_language_s_or_the_vocabulary_s():
    """With no --language, the widget sentence (which verification also fills) was English even for a Korean
    vocabulary; it follows the vocabulary's script now, and the first --language when one is given."""
    from mlmtrain.card import DEFAULT_WIDGETS, default_widget

    korean, english = ["[PAD]", "한국", "##어", "문장", "the"], ["[PAD]", "the", "##s", "capital", "한"]
    assert default_widget([], korean) == DEFAULT_WIDGETS["ko"] and default_widget([], english) == DEFAULT_WIDGETS["en"]
    assert (
        default_widget(["en"], korean) == DEFAULT_WIDGETS["en"]
        and default_widget(["ko"], english) == DEFAULT_WIDGETS["ko"]
    )
    assert default_widget(["fr"], korean) == DEFAULT_WIDGETS["en"]  # no sentence of its own: English, as before


def test_an_export_says_when_its_tokenizer_does_not_fit_korean_text():
    """A tokenizer trained on NFD text spells Hangul in jamo: the export verified, its widget went English and the
    Hub's widget read ordinary Korean as [UNK]; shards that were mostly [UNK] were not said either. Both are
    notes now, and in the card's Limits; a jamo vocabulary's widget is the Korean one, which shows it."""
    from mlmtrain.card import DEFAULT_WIDGETS, default_widget, fit_warnings, model_card

    nfd = ["[PAD]", "[UNK]", "\u1112\u1161\u11ab", "##\u1100\u116e\u11a8", "\u1100", "\u1102", "\u1103", "the"]
    assert default_widget([], nfd) == DEFAULT_WIDGETS["ko"]
    meta = {"train": {"tokens": 1000, "unk_tokens": 850}, "valid": {"tokens": 100, "unk_tokens": 90}}
    warnings = fit_warnings(nfd, meta)
    assert warnings == [
        "The vocabulary spells Hangul in conjoining jamo (5 such pieces, 0 with syllables): its tokenizer was "
        "trained on decomposed (NFD) text, so ordinary (NFC) Korean reads as [UNK].",
        "85.5% of the training text's tokens were [UNK]: the tokenizer does not fit it.",
    ]
    fits = {"train": {"tokens": 1000, "unk_tokens": 10}, "valid": {"tokens": 100, "unk_tokens": 1}}  # 1%: said no
    assert fit_warnings(["[PAD]", "한국", "##어", "\u1100"], fits) == [] and fit_warnings(nfd[:2], None) == []
    from mlmtrain.model import BertConfig

    settings = dict(title="m", run_config={}, state={}, step=0, language=[], license="mit", widgets=["x [MASK]"])
    readme = str(model_card(**settings, config=BertConfig.from_size("tiny", 64), data_meta=None, warnings=warnings))
    assert all(w in readme.split("## Limits")[1] for w in warnings)


def test_the_default_widget_takes_the_first_language_and_counts_capitals_as_latin():
    """Of several --language, the first one's sentence (the card's first language); with none, a piece in capitals
    (a cased vocabulary's) is a Latin one, and as many Hangul as Latin pieces is not more: English."""
    from mlmtrain.card import DEFAULT_WIDGETS, default_widget

    english = ["the", "capital", "France"]
    assert default_widget(["ko", "en"], english) == DEFAULT_WIDGETS["ko"]
    assert default_widget(["en", "ko"], ["한국", "문장"]) == DEFAULT_WIDGETS["en"]
    assert default_widget([], ["한국", "##어", "The", "USA", "NASA"]) == DEFAULT_WIDGETS["en"]
    assert default_widget([], ["한국", "##어", "the", "##s"]) == DEFAULT_WIDGETS["en"]


def test_the_card_shows_a_resumed_runs_commands_and_a_continued_models_positions():
    """model_card reads the checkpoint's `commands` (every command that trained the weights), a checkpoint of an
    older mlmtrain its one `command`; and a run started from another model (`init_from`) says its shards did not
    reach the other positions in this run, not that they were never trained."""
    from mlmtrain.card import model_card

    config = BertConfig.from_size("tiny", 100, max_position_embeddings=512)
    first, again = "mlmtrain train --out r --lr 2e-3", "mlmtrain train --out r --resume"

    def card(**state):
        return model_card(title="me/tiny", config=config, run_config={"run": {}}, state=state, step=2,
                          language=None, license="apache-2.0", widgets=["a [MASK]."],
                          data_meta={"max_seq_len": 128}).content  # fmt: skip

    text = card(command=again, commands=[first, again])
    assert "the command lines the run recorded, in order" in text and f"{first}\n{again}\n" in text
    assert "were never trained" in text
    old = card(command=first)
    assert "# training: the command line the run recorded\n" + first in old
    assert "(up to 512) were not trained in this run" in card(command=first, init_from="/models/ko-bert")


def test_a_name_that_is_no_repo_id_gets_the_usage_note(trained_run, tokenizer_dir, tmp_path, capsys):
    """--name without OWNER/ titles the card but names no repo: its usage example loads PATH_OR_REPO_ID, said."""
    run_dir, _ = trained_run
    out = tmp_path / "named"
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(run_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    assert cli.main([*argv, "--no-verify", "--name", "tiny"]) == 0
    assert "note: the model card's usage example loads PATH_OR_REPO_ID" in capsys.readouterr().err
    assert 'model="PATH_OR_REPO_ID"' in (out / "README.md").read_text(encoding="utf-8")


def test_an_export_gives_its_fit_warnings_as_notes_and_in_the_limits(trained_run, tokenizer_dir, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    import mlmtrain.export as export_module

    seen = []
    monkeypatch.setattr(export_module, "fit_warnings", lambda vocab, meta: seen.append((vocab, meta)) or ["W one."])
    run_dir, _ = trained_run
    argv = ["export", "--checkpoint", str(run_dir), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "w")]
    capsys.readouterr()
    assert cli.main([*argv, "--no-verify"]) == 0
    assert "note: W one.\n" in capsys.readouterr().err and "[CLS]" in seen[0][0]  # the tokenizer's vocabulary
    assert "W one." in (tmp_path / "w" / "README.md").read_text(encoding="utf-8").split("## Limits")[1]


def test_an_exports_fit_warnings_read_the_runs_shard_meta(trained_run, data_dir, tokenizer_dir, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    """The [UNK] share fit_warnings judges is the one prepare counted in the run's shards (its meta.json): an
    export that passed no meta would never say a tokenizer that does not fit its training text."""
    import mlmtrain.export as export_module
    from mlmtrain.card import fit_warnings
    from mlmtrain.tokenizer_folder import tokenizer_fingerprint

    _, model = trained_run
    run_dir = tmp_path / "run"
    run_config = {"data": {"tokenizer_dir": str(tokenizer_dir), "data_dir": str(data_dir)}, "optim": {"lr": 5e-4}}
    state = {"command": "mlmtrain train --model tiny", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir)}
    save_checkpoint(run_dir, 1, model, None, run_config, state)
    seen = []
    monkeypatch.setattr(
        export_module, "fit_warnings", lambda vocab, meta: seen.append(meta) or fit_warnings(vocab, meta)
    )
    argv = ["export", "--checkpoint", str(run_dir), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "w")]
    assert cli.main([*argv, "--no-verify"]) == 0
    assert seen == [json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))]


def test_an_exports_default_widget_follows_its_language(trained_run, tokenizer_dir, tmp_path):
    """No --widget-text: the card's widget is the first --language's sentence, whatever the vocabulary's script."""
    from mlmtrain.card import DEFAULT_WIDGETS, default_widget
    from mlmtrain.tokenizer_folder import read_vocab

    run_dir, _ = trained_run
    by_vocab = default_widget([], read_vocab(tokenizer_dir))
    language = next(code for code, text in DEFAULT_WIDGETS.items() if text != by_vocab)
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(run_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    assert cli.main([*argv, "--no-verify", "--language", language]) == 0
    assert DEFAULT_WIDGETS[language] in (out / "README.md").read_text(encoding="utf-8")


def test_the_card_says_what_a_segment_held():
    """A document-packed run (the README's phase 2) trained on runs of a document's sentences, not on single ones."""
    from mlmtrain.card import _data_text

    meta = {"train": {"sentences": 1000, "tokens": 20000}, "inputs": [], "max_seq_len": 512}
    assert _data_text(meta, {"pack": "sentence"}).endswith("at most 512 tokens ([CLS] sentence [SEP])")
    assert _data_text(meta, {"pack": "document"}).endswith("([CLS] s1 [SEP] s2 [SEP] ..., sentences of one document)")


def test_the_card_says_what_dropout_the_run_applied():
    """config.json keeps attention_probs_dropout_prob for fine-tuning; the card says what pretraining applied."""
    from mlmtrain.card import _dropout_lines
    from mlmtrain.model import BertConfig

    config = BertConfig(vocab_size=100, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    fast = {"attention_dropout": 0.0, "resolved": {"model.attention": "varlen"}}
    assert _dropout_lines(config, fast) == [
        "- Dropout: 0.1 on hidden states; on attention probabilities none (varlen attention has none)."
    ]
    assert _dropout_lines(config, {"attention_dropout": 0.1})[0].endswith("on attention probabilities 0.1.")
    assert _dropout_lines(config, {})[0].endswith("on attention probabilities not recorded.")  # an older checkpoint
    assert _dropout_lines(BertConfig(vocab_size=100, hidden_dropout_prob=0.0), {}) == ["- Dropout: none."]


def test_the_card_says_which_step_an_earlier_evaluation_was_at():
    from mlmtrain.card import _evaluation_lines

    metrics = {"step": 5, "valid_loss": 7.5629, "valid_accuracy": 0.006, "valid_targets": 1200}
    lines = _evaluation_lines({"step": 6, "valid_loss": 7.5629, "metrics": metrics}, (None, "not computed"))
    assert "1,200 masked tokens, the evaluation at step 5):" in lines[0]


@pytest.mark.parametrize("when", ["model", "files"])  # while the model loads (after the tokenizer checks), or later
def test_a_tokenizer_replaced_while_export_reads_it_is_not_exported(
    when, trained_run, tokenizer_dir, tmp_path, monkeypatch
):
    """An export whose files come from two tokenizers (or from one the model was not trained with) would load and
    decode garbage: the fingerprint is taken before the tokenizer is read (and checked) and again before the export
    is kept."""
    from test_prepare import replaced_tokenizer

    from mlmtrain import export

    run_dir, _ = trained_run
    tok, replace = replaced_tokenizer(tokenizer_dir, tmp_path)
    if when == "model":
        load = BertForMaskedLM.load_hf_state_dict
        monkeypatch.setattr(BertForMaskedLM, "load_hf_state_dict", lambda *a: (replace(), load(*a))[1])
    else:
        read_config = export.read_tokenizer_config
        monkeypatch.setattr(export, "read_tokenizer_config", lambda folder: (replace(), read_config(folder))[1])
    with pytest.raises(UserError, match=r"changed while `mlmtrain export` read it"):
        export_folder(run_dir, tok, tmp_path / "export", verify=False)
    assert not (tmp_path / "export").exists()


def test_the_card_states_the_data_statistics_of_the_shards():
    from mlmtrain.card import _data_statistics

    meta = {
        "train": {"documents": 3, "sentences": 40, "tokens": 500, "max_sentence_len": 30},
        "valid": {"documents": 1, "sentences": 4, "tokens": 60, "max_sentence_len": 20},
        "max_seq_len": 128, "sentences_split": 2, "lines_skipped": 7, "lines_repaired": 5,
    }  # fmt: skip
    text = "\n".join(_data_statistics(meta, 30000))
    assert "| train | 3 | 40 | 500 | 12.5 (max 30) |" in text and "| valid | 1 | 4 | 60 | 15.0 (max 20) |" in text
    assert "longer than 126 tokens split into pieces: 2" in text
    assert "skipped (invalid UTF-8, NUL bytes): 7; repaired (CR endings, byte-order mark): 5." in text


def test_the_cards_reproduce_block_shows_the_runs_hub_base_model_whole():
    """model_card hands its base_model to the Reproduce block: the train command's --init-from (or --set
    model.init_from=) that names it stays whole; any other value, a dir/name too, shows its last part only."""
    from mlmtrain.card import model_card

    config = BertConfig.from_size("tiny", 100, max_position_embeddings=512)
    command = "mlmtrain train --out /home/al/r --init-from klue/bert-base --set model.init_from=klue/bert-base"

    def card(base_model):
        return model_card(title="me/tiny", config=config, run_config={"run": {}}, state={"command": command}, step=2,
                          language=None, license="apache-2.0", widgets=["a [MASK]."], data_meta={"max_seq_len": 128},
                          base_model=base_model).content  # fmt: skip

    whole = "mlmtrain train --out r --init-from klue/bert-base --set model.init_from=klue/bert-base\n"
    assert whole in card("klue/bert-base")
    assert "mlmtrain train --out r --init-from bert-base --set model.init_from=bert-base\n" in card(None)
