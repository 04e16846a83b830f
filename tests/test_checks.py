"""The checks made before any device work, at their boundaries: a model's fields (open and closed bounds), the
batch layout against the shards, a manifest's table, and what a resume may not change (the normalization, and a
batch size given as auto, compared as it was resolved)."""

from __future__ import annotations

import re

import pytest


def test_layer_norm_eps_zero_is_refused_and_its_neighbours_are_not():
    """layer_norm_eps = 0 (a division by zero on a constant row) is refused: its bound is open; closed bounds take
    their edge."""
    from mlmtrain.errors import UserError
    from mlmtrain.preflight import check_model_fields

    with pytest.raises(UserError, match=r"layer_norm_eps=0.0: a number > 0.0 is expected"):
        check_model_fields({"layer_norm_eps": 0.0}, "config.json")
    check_model_fields({"layer_norm_eps": 1e-12, "initializer_range": 0.0, "pad_token_id": 0}, "config.json")


def test_a_micro_batch_of_exactly_max_seq_len_is_accepted():
    """A micro-batch of exactly max_seq_len tokens holds the longest segment: accepted; one token less is refused."""
    from mlmtrain.errors import UserError
    from mlmtrain.preflight import check_batch_layout

    meta = {"valid": {"sentences": 5}, "max_seq_len": 128}
    check_batch_layout(meta, "data", 128, 1, 1)
    check_batch_layout(meta, "data", 0, 1, 1)  # auto
    with pytest.raises(UserError, match="--tokens-per-batch 127 is below the shards' max_seq_len 128"):
        check_batch_layout(meta, "data", 127, 1, 1)


def test_a_manifest_entry_without_its_checksum_is_one_problem(tmp_path):
    """A manifest entry without its sha256 is named as a problem, not read (a KeyError traceback)."""
    from mlmtrain.manifest import file_entries, manifest_problems

    (tmp_path / "a.bin").write_bytes(b"abc")
    entries = file_entries(tmp_path)
    assert manifest_problems(tmp_path, entries) == []
    del entries["a.bin"]["sha256"]
    assert manifest_problems(tmp_path, entries) == ["the manifest entry for a.bin lacks size or sha256"]


def test_a_manifest_whose_files_are_not_a_table_is_one_problem(tmp_path):
    """A manifest whose "files" is not a table names a damaged checkpoint (not an AttributeError)."""
    import json

    from mlmtrain.checkpoint import verify_checkpoint
    from mlmtrain.manifest import manifest_problems

    assert manifest_problems(tmp_path, ["a.bin"]) == ["the manifest has no table of files"]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": ["config.json"]}))
    assert verify_checkpoint(tmp_path) == "the manifest has no table of files"


def test_a_resume_under_another_layer_norm_eps_is_refused(tmp_path, monkeypatch):
    """`--resume` with another model.layer_norm_eps would continue the weights under another normalization:
    refused."""
    import dataclasses

    from mlmtrain import checkpoint, plan
    from mlmtrain.config import RunConfig
    from mlmtrain.errors import UserError
    from mlmtrain.model import BertConfig

    meta = {"tokenizer_fingerprint": "t", "vocab_size": 100, "max_seq_len": 64}
    saved, run = BertConfig(vocab_size=100), RunConfig()
    state = {"data_fingerprint": checkpoint.data_fingerprint(meta), "tokenizer_fingerprint": "t",
             "resolved": {"data.tokens_per_batch": 4096}}  # fmt: skip
    config = {"model": dataclasses.asdict(saved), "run": run.to_dict()}
    monkeypatch.setattr(checkpoint, "read_state", lambda ckpt: (config, state))
    plan.check_resume_compatible(tmp_path, run, meta, saved, 4096)  # the same model: accepted
    with pytest.raises(UserError, match="model layer_norm_eps is 1e-06 but the checkpoint has 1e-12"):
        plan.check_resume_compatible(tmp_path, run, meta, dataclasses.replace(saved, layer_norm_eps=1e-6), 4096)


def test_an_auto_batch_size_is_compared_as_it_was_resolved(tmp_path, monkeypatch):
    """A run started with data.tokens_per_batch = 0 (auto) resumes where auto resolves the same way, and is refused
    where it would resolve to another size (a CPU run resumed on a GPU)."""
    import dataclasses

    from mlmtrain import checkpoint, plan
    from mlmtrain.config import RunConfig
    from mlmtrain.errors import UserError
    from mlmtrain.model import BertConfig

    meta = {"tokenizer_fingerprint": "t", "vocab_size": 100, "max_seq_len": 64}
    model, run = BertConfig(vocab_size=100), RunConfig()
    assert run.data.tokens_per_batch == 0  # auto
    state = {
        "data_fingerprint": checkpoint.data_fingerprint(meta),
        "tokenizer_fingerprint": "t",
        "resolved": {"data.tokens_per_batch": 4096},
    }
    config = {"model": dataclasses.asdict(model), "run": run.to_dict()}
    monkeypatch.setattr(checkpoint, "read_state", lambda ckpt: (config, state))
    plan.check_resume_compatible(tmp_path, run, meta, model, 4096)  # auto, resolved the same way: accepted
    with pytest.raises(UserError, match="data.tokens_per_batch is 65536 here but 4096"):
        plan.check_resume_compatible(tmp_path, run, meta, model, 65536)


HISTORY = {  # every setting of a run's history (plan.HISTORY_KEYS), with a value other than its default
    "optim.lr": 1e-4,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.weight_decay": 0.1,
    "optim.warmup_steps": 10,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 0.1,
    "optim.grad_clip": 0.5,
    "mask.mask_prob": 0.2,
    "mask.mask_frac": 0.7,
    "mask.random_frac": 0.2,
    "mask.whole_word": True,
    "model.dropout": 0.0,
}


@pytest.mark.parametrize("key", HISTORY)
def test_a_resume_in_its_own_folder_keeps_each_history_setting(tmp_path, monkeypatch, key):
    """Each optimizer, schedule, masking and dropout setting: another value is refused, named, on a resume in the
    run's own folder, and taken by a new run from its checkpoint in another folder."""
    import dataclasses

    from mlmtrain import checkpoint, plan
    from mlmtrain.config_load import load_config
    from mlmtrain.errors import UserError
    from mlmtrain.model import BertConfig

    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step_00000002"
    meta = {"tokenizer_fingerprint": "t", "vocab_size": 100, "max_seq_len": 64}
    model = BertConfig(vocab_size=100)
    state = {"data_fingerprint": checkpoint.data_fingerprint(meta), "tokenizer_fingerprint": "t",
             "resolved": {"data.tokens_per_batch": 4096}}  # fmt: skip
    config = {"model": dataclasses.asdict(model), "run": load_config(None, {"out_dir": str(run_dir)}).to_dict()}
    monkeypatch.setattr(checkpoint, "read_state", lambda ckpt: (config, state))
    same = load_config(None, {"out_dir": str(run_dir), "train.log_every": 7, "train.precision": "bf16"})
    plan.check_resume_compatible(ckpt, same, meta, model, 4096)  # a cadence, the precision: not its history
    with pytest.raises(UserError, match=rf"{re.escape(key)} is .* here but .* in the run .*--out NEW_RUN"):
        plan.check_resume_compatible(ckpt, load_config(None, {"out_dir": str(run_dir), key: HISTORY[key]}), meta,
                                     model, 4096)  # fmt: skip
    new_run = load_config(None, {"out_dir": str(tmp_path / "new"), key: HISTORY[key]})
    plan.check_resume_compatible(ckpt, new_run, meta, model, 4096)
