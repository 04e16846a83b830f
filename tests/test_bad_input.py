"""Bad shards, bad flags and damaged checkpoints are found before any device work (no run folder is even created),
each with one sentence: a truncated .npy, ids outside the vocabulary (checked on the data, not only meta.json),
offsets that do not increase or run past the end, a broken meta.json (or one whose max_seq_len or special tokens
the shards contradict); --tokens-per-batch below max_seq_len, out-of-range or mistyped values, cuda without a
GPU, a transformers config.json as --config, a run config.json edited to hold unknown keys or mistyped values,
--nproc against grad_accum before torchrun starts; a malformed manifest or state.json."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from cli_run import TINY, assert_refused, in_process

from mlmtrain import prepare, shard_check
from mlmtrain.config_load import load_config
from mlmtrain.errors import UserError
from mlmtrain.manifest import file_entries
from mlmtrain.train import train


@pytest.fixture
def shards(data_dir, tmp_path):
    return shutil.copytree(data_dir, tmp_path / "data")


def train_cli(data, tokenizer_dir, out, *extra):
    return ["train", "--data", data, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", 2, *TINY, *extra]


def poke(path, index: int, value: int) -> None:
    """Overwrite one element of a .npy in place."""
    array = np.load(path, mmap_mode="r+")
    array[index] = value
    array.flush()


def edit_meta(data, change) -> None:
    meta = json.loads((data / "meta.json").read_text())
    change(meta)
    (data / "meta.json").write_text(json.dumps(meta))


DAMAGE = {  # name -> (how to damage the shards, what the sentence says)
    "truncated_tokens": (
        lambda d: (d / "train" / "tokens.npy").write_bytes((d / "train" / "tokens.npy").read_bytes()[:-10]),
        "train/tokens.npy is damaged",
    ),
    "id_outside_the_vocabulary": (
        lambda d: poke(d / "train" / "tokens.npy", 3, json.loads((d / "meta.json").read_text())["vocab_size"]),
        "is outside the vocabulary of",
    ),
    "offsets_not_increasing": (lambda d: poke(d / "train" / "offsets.npy", 5, 0), "does not increase after"),
    "offsets_past_the_end": (lambda d: poke(d / "valid" / "offsets.npy", -1, 10**9), "valid/offsets.npy is damaged"),
    "meta_not_json": (lambda d: (d / "meta.json").write_text('{"format_version": 1,'), "not valid JSON"),
    "meta_without_vocab_size": (lambda d: edit_meta(d, lambda m: m.pop("vocab_size")), "vocab_size missing"),
    "meta_counts_differ": (lambda d: edit_meta(d, lambda m: m["train"].update(tokens=7)), "meta.json says 7"),
    "meta_max_seq_len_below_a_sentence": (
        lambda d: edit_meta(d, lambda m: m.update(max_seq_len=4)),
        "meta.json's max_seq_len 4 leaves room for 2",
    ),
    "meta_never_mask_not_pairs": (
        lambda d: edit_meta(d, lambda m: m["special_tokens"].update(never_mask=[[0]])),
        "special_tokens missing or wrong",
    ),
    "meta_never_mask_a_string": (
        lambda d: edit_meta(d, lambda m: m["special_tokens"].update(never_mask="x")),
        "special_tokens missing or wrong",
    ),
    "meta_mask_id_outside_the_vocabulary": (
        lambda d: edit_meta(d, lambda m: m["special_tokens"].update(mask=10**6)),
        "special_tokens missing or wrong",
    ),
    "meta_not_an_object": (lambda d: (d / "meta.json").write_text("[1, 2]"), "not a JSON object"),
    "meta_special_tokens_a_list": (
        lambda d: edit_meta(d, lambda m: m.update(special_tokens=[0, 1, 2, 3, 4])),
        "special_tokens missing or wrong",
    ),
    "tokens_header_unreadable": (
        lambda d: (d / "train" / "tokens.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 100),
        "not a readable .npy",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shards_are_named_before_any_device_work(damage, shards, tokenizer_dir, tmp_path, capsys):
    break_it, phrase = DAMAGE[damage]
    break_it(shards)
    line = assert_refused(in_process(capsys, *train_cli(shards, tokenizer_dir, tmp_path / "run")), phrase)
    assert "damaged" in line and "mlmtrain prepare" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "spoil, words",
    [
        (lambda d: edit_meta(d, lambda m: m.update(format_version=99)), "has shard format 99, this mlmtrain reads"),
        (
            lambda d: (d / "meta.json").unlink(),
            "holds no token shards (no meta.json); make them with `mlmtrain prepare`",
        ),
        (lambda d: shutil.rmtree(d), "does not exist: pass a folder of token shards (`mlmtrain prepare` makes one)"),
        (lambda d: (shutil.rmtree(d), d.write_text("x")), "is a file, not a folder of token shards"),
    ],
    ids=["format_version", "no_meta", "absent", "a_file"],
)
def test_a_data_folder_that_is_not_shards_of_this_format_is_one_sentence(spoil, words, shards, tokenizer_dir, tmp_path,
                                                                          capsys):  # fmt: skip
    spoil(shards)
    assert_refused(in_process(capsys, *train_cli(shards, tokenizer_dir, tmp_path / "run")), str(shards), words)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_be_made_is_one_sentence(data_dir, tokenizer_dir, tmp_path, capsys):
    """--out under a file (a typo, or a path another program took): the system's reason, in one sentence."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "run"
    assert_refused(in_process(capsys, *train_cli(data_dir, tokenizer_dir, out)), f"cannot create the run folder {out}")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("missing", ["file", "folder"])
def test_a_missing_shard_file_is_named_before_any_device_work(missing, shards, tokenizer_dir, tmp_path, capsys):
    tokens = shards / "train" / "tokens.npy"
    tokens.unlink()
    if missing == "folder":
        tokens.mkdir()
    words = "is missing" if missing == "file" else "is not a file"
    line = assert_refused(in_process(capsys, *train_cli(shards, tokenizer_dir, tmp_path / "run")), str(tokens), words)
    assert "run `mlmtrain prepare` again" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("packer", ["thread", "process"])
def test_an_id_the_sample_misses_is_caught_in_the_batch_before_the_device(
    shards, tokenizer_dir, tmp_path, monkeypatch, packer
):
    """The check at start reads 64 blocks; the packer (its thread, or its process) checks every batch, so no id
    outside the vocabulary reaches an embedding lookup (a device-side assert on a GPU)."""
    from test_train import tiny_config

    monkeypatch.setattr(shard_check, "CHECK_BLOCK", 1)
    tokens = np.load(shards / "train" / "tokens.npy", mmap_mode="r+")
    sampled = np.unique(np.linspace(0, len(tokens) - 1, 64).astype(np.int64))
    vocab_size = json.loads((shards / "meta.json").read_text())["vocab_size"]
    tokens[:] = vocab_size
    tokens[sampled] = 5
    tokens.flush()
    with pytest.raises(UserError, match=f"hold token id {vocab_size}, outside the vocabulary"):
        train(tiny_config(shards, tokenizer_dir, tmp_path / "run", **{"data.packer": packer}))


BAD_FLAGS = {  # name -> (extra arguments, what the sentence says)
    "tokens_per_batch_below_max_seq_len": (["--tokens-per-batch", "64"], "below the shards' max_seq_len 128"),
    "log_every_0": (["--set", "train.log_every=0"], "train.log_every must be from 1 to 65536"),
    "log_every_huge": (
        ["--set", "train.log_every=100000000000000000000000"],
        "train.log_every must be from 1 to 65536",
    ),
    "grad_accum_0": (["--set", "optim.grad_accum=0"], "optim.grad_accum must be at least 1"),
    "lr_nan": (["--set", "optim.lr=nan"], "optim.lr must be a positive number"),
    "dropout_1": (["--set", "model.dropout=1"], "model.dropout must be in [0, 1)"),
    "schedule_typo": (["--set", "optim.schedule=cosin"], "optim.schedule must be one of linear, cosine"),
    "packer_typo": (["--set", "data.packer=proces"], "data.packer must be one of thread, process"),
    "nan_policy_typo": (["--set", "train.nan_policy=skp"], "train.nan_policy must be one of skip, stop"),
    "cuda_without_a_gpu": (["--set", "train.device=cuda"], "train.device is cuda but 0 CUDA GPUs are usable"),
    "seed_negative": (["--seed", "-1"], "train.seed must be from 0 to 2**64 - 1, got -1"),
    "tokens_per_batch_huge": (["--tokens-per-batch", "99999999999"], "must be from 0 (auto) to 16,777,216"),
    "seed_too_large": (["--seed", str(2**64)], "train.seed must be from 0 to 2**64 - 1"),
    "mask_split_over_1": (
        ["--set", "mask.mask_frac=0.9", "--set", "mask.random_frac=0.2"],
        "mask.mask_frac + mask.random_frac",
    ),
    "beta_1": (["--set", "optim.betas=[0.9, 1.0]"], "optim.betas"),
}


def test_shards_without_a_valid_split_are_refused(sample_corpus, tokenizer_dir, tmp_path, capsys):
    prepare.prepare([sample_corpus], tokenizer_dir, tmp_path / "data", valid_fraction=0.0, progress=False)
    done = in_process(capsys, *train_cli(tmp_path / "data", tokenizer_dir, tmp_path / "run"))
    assert_refused(done, "have no valid split to evaluate on", "--valid-fraction")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_one_sentence_before_any_device_work(case, data_dir, tokenizer_dir, tmp_path, capsys):
    if case == "cuda_without_a_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra, phrase = BAD_FLAGS[case]
    assert_refused(in_process(capsys, *train_cli(data_dir, tokenizer_dir, tmp_path / "run", *extra)), phrase)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--steps", "-1"], "--steps must be at least 1"),
        (["--vocab-size", "3"], "--vocab-size must be larger than 5"),
        (["--device", "cuda"], "sees no CUDA device"),
    ],
)
def test_demo_flags_are_checked_before_anything_is_written(extra, phrase, tmp_path, capsys):
    if extra[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused(in_process(capsys, "demo", "--out", str(tmp_path / "demo"), *extra), phrase)
    assert not (tmp_path / "demo").exists()


def test_a_config_that_is_not_a_run_config_is_refused(data_dir, tokenizer_dir, tmp_path, capsys):
    hf = tmp_path / "bert" / "config.json"  # what a transformers model folder holds
    hf.parent.mkdir()
    hf.write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768}))
    args = train_cli(data_dir, tokenizer_dir, tmp_path / "run", "--config", hf)
    assert_refused(in_process(capsys, *args), "is a transformers model config", "--init-from FOLDER")
    saved = tmp_path / "ckpt_config.json"
    saved.write_text(json.dumps({"model": {"hidden_size": 128}, "run": {"out_dir": "x"}}))
    args = train_cli(data_dir, tokenizer_dir, tmp_path / "run", "--config", saved)
    assert_refused(in_process(capsys, *args), "is a checkpoint's config")
    assert not (tmp_path / "run").exists()


RUN_CONFIG_EDITS = {  # name -> (a hand edit of a run's config.json, what the sentence says)
    "lr_not_a_number": (lambda c: c["optim"].update(lr="fast"), "optim.lr must be a number, got 'fast'"),
    "section_not_a_table": (lambda c: c.update(optim=[]), "config section 'optim' must be a table of its keys"),
    "max_steps_a_list": (lambda c: c["train"].update(max_steps=[4]), "train.max_steps must be an integer, got [4]"),
    "unknown_key": (lambda c: c["train"].update(max_step=4), "unknown config key 'train.max_step'"),
    "value_a_table": (lambda c: c["optim"].update(lr={"a": 1}), "config key 'optim.lr' takes a value, not a table"),
}


@pytest.mark.parametrize("edit", sorted(RUN_CONFIG_EDITS))
def test_a_run_config_is_checked_as_toml_and_set_are(edit, data_dir, tokenizer_dir, tmp_path, capsys):
    """A run's config.json passed as --config follows the TOML file's rule: known keys, values of each key's type
    (a string a TOML file or --set may give, such as "3e-4", is read as the key's type)."""
    from test_train import tiny_config

    config = json.loads(json.dumps(tiny_config(data_dir, tokenizer_dir, tmp_path / "run").to_dict()))
    config["optim"]["lr"], config["train"]["max_steps"] = "3e-4", "4"
    path = tmp_path / "run" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.optim.betas) == (3e-4, 4, (0.9, 0.98))
    change, phrase = RUN_CONFIG_EDITS[edit]
    change(config)
    path.write_text(json.dumps(config))
    assert_refused(in_process(capsys, "train", "--config", path, "--resume"), phrase)


def test_nproc_is_checked_against_grad_accum_before_torchrun_starts(data_dir, tokenizer_dir, tmp_path, capsys):
    args = train_cli(data_dir, tokenizer_dir, tmp_path / "run", "--nproc", 3, "--set", "optim.grad_accum=4")
    done = in_process(capsys, *args)  # refused before anything starts: no new interpreter needed to show it
    assert_refused(
        done, "optim.grad_accum=4 must be a multiple of the number of processes (3)", "--set optim.grad_accum=6"
    )
    assert "torch.distributed" not in done.stdout + done.stderr and not (tmp_path / "run").exists()
    assert_refused(
        in_process(capsys, *train_cli(data_dir, tokenizer_dir, tmp_path / "run", "--nproc", 0)), "at least 1"
    )


def test_a_malformed_manifest_or_state_is_a_damaged_checkpoint(data_dir, tokenizer_dir, tmp_path, capsys):
    from test_train import tiny_config

    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3, "train.checkpoint_every": 1}))
    step1, step2, step3 = sorted((run / "checkpoints").iterdir())
    (step3 / "manifest.json").write_text("[]")
    (step2 / "state.json").write_text(json.dumps({"cursor": [0, 0]}))  # no step; the manifest agrees with it
    manifest = json.loads((step2 / "manifest.json").read_text())
    manifest["files"] = file_entries(step2, manifest["files"])
    (step2 / "manifest.json").write_text(json.dumps(manifest))
    for ckpt, phrase in ((step3, "manifest.json is unreadable"), (step2, "state.json lacks a step")):
        args = ["export", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x", "--no-verify"]
        assert_refused(in_process(capsys, *args), f"checkpoint {ckpt} is damaged", phrase)
    args = ["export", "--checkpoint", run, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x", "--no-verify"]
    done = in_process(capsys, *args)
    assert done.returncode == 0, done.stderr
    assert "skipping damaged checkpoint" in done.stderr and "exported step 1" in done.stdout  # a warning: stderr
    assert "Traceback" not in done.stdout + done.stderr
    done = in_process(capsys, "export", "--checkpoint", run, "--out", tmp_path / "y", "--no-verify")  # its tokenizer
    assert done.returncode == 0 and "exported step 1" in done.stdout, done.stderr
    assert [done.stderr.count(f"skipping damaged checkpoint {ckpt}:") for ckpt in (step3, step2)] == [1, 1]


@pytest.mark.parametrize("optimizer", [None, {"param_groups": [], "scalars": {"x": 1}}])
def test_a_checkpoint_whose_optimizer_state_is_malformed_is_refused_at_resume(
    optimizer, data_dir, tokenizer_dir, tmp_path, capsys
):
    """state.json's optimizer section missing, or naming a parameter as no saved one is named, with a manifest
    that agrees (a hand edit): a resume says the checkpoint is damaged in one sentence, before any step, and the
    run folder keeps its checkpoint."""
    from cli_run import train_args

    run = tmp_path / "run"
    assert in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 2)).returncode == 0
    (ckpt,) = (run / "checkpoints").iterdir()
    state = json.loads((ckpt / "state.json").read_text())
    state["optimizer"] = optimizer
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = file_entries(ckpt, manifest["files"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    args = [*train_args(data_dir, tokenizer_dir, run, 4), "--resume", "--change-max-steps"]
    assert_refused(in_process(capsys, *args), f"checkpoint {ckpt} is damaged", "optimizer state")
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ckpt.name]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_a_packaged_config_is_found_by_name_from_any_folder_and_a_missing_one_is_named(tmp_path, monkeypatch, capsys):
    """`--config base_gpu` (README) reads trainer/configs/base_gpu.toml wherever the command runs; a name that is
    neither a file nor a packaged config is one sentence listing the packaged ones."""
    monkeypatch.chdir(tmp_path)
    sizes = {name: load_config(name).model.size for name in ("tiny_cpu", "base_gpu", "large_gpu")}
    assert sizes == {"tiny_cpu": "tiny", "base_gpu": "base", "large_gpu": "large"}
    assert load_config("base_gpu.toml").data.tokens_per_batch == 65536
    (tmp_path / "base_gpu.toml").write_text('[model]\nsize = "mini"\n')  # a file of that name here is the user's
    assert load_config("base_gpu.toml").model.size == "mini"
    with pytest.raises(UserError, match=r"config file base_gpt does not exist \(packaged configs: base_gpu, large_gpu, "
                                        r"tiny_cpu\)"):  # fmt: skip
        load_config("base_gpt")


CONFIG_REFUSALS = {  # name -> (config file text or None, --set items, the sentence's words)
    "toml": ("[train\nmax_steps = 3\n", [], "is not valid TOML"),
    "set_without_value": (
        None,
        ["train.max_steps"],
        "--set takes key=value (e.g. optim.lr=3e-4), got 'train.max_steps'",
    ),
    "section": (None, ["trainer.max_steps=3"], "unknown config section 'trainer' in 'trainer.max_steps'"),
    "bool": (None, ["train.tf32=maybe"], "train.tf32 must be true or false, got 'maybe'"),
    "tuple": (None, ["optim.betas=0.9"], "optim.betas must be a list like [0.9, 0.98]"),
    "json": ('{"out_dir": "x", "model": {', [], "is not valid JSON"),
    "json_not_a_run": ('{"vocab_size": 30000}', [], "is not an mlmtrain run config (a run's config.json)"),
}


@pytest.mark.parametrize("name", list(CONFIG_REFUSALS))
def test_a_bad_config_file_or_set_is_one_sentence_before_any_work(name, data_dir, tokenizer_dir, tmp_path, capsys):
    """`mlmtrain train --config FILE --set KEY=VALUE`: a config file that is not TOML (or, named .json, not a
    run's config.json), a --set without a value, an unknown section, a value of the wrong type: exit 2, one
    sentence, no run folder."""
    text, sets, words = CONFIG_REFUSALS[name]
    args = ["train", "--data", data_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / "run", *TINY]
    if text is not None:
        config = tmp_path / ("config.json" if name.startswith("json") else "run.toml")
        config.write_text(text)
        args += ["--config", config]
    for item in sets:
        args += ["--set", item]
    assert_refused(in_process(capsys, *args), words)
    assert not (tmp_path / "run").exists()


def test_eval_checks_every_batch_for_ids_the_sample_missed(data_dir, shards, tokenizer_dir, tmp_path, monkeypatch,
                                                           capsys):  # fmt: skip
    """eval --data packs its own batches: each is checked as training's are, so an id outside the vocabulary that
    the sampled blocks missed is one sentence, not an embedding's IndexError."""
    from test_train import tiny_config

    train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 1}))
    monkeypatch.setattr(shard_check, "CHECK_BLOCK", 1)
    tokens = np.load(shards / "train" / "tokens.npy", mmap_mode="r+")
    vocab_size = json.loads((shards / "meta.json").read_text())["vocab_size"]
    tokens[:] = vocab_size
    tokens[np.unique(np.linspace(0, len(tokens) - 1, 64).astype(np.int64))] = 5
    tokens.flush()
    result = in_process(capsys, "eval", "--model", tmp_path / "run", "--data", shards, "--data-split", "train")
    assert_refused(result, f"hold token id {vocab_size}, outside the vocabulary")


def test_one_sentence_for_a_bad_flag_a_damaged_checkpoint_config_and_unreadable_text(
    data_dir, tokenizer_dir, sample_corpus, tmp_path, capsys
):
    """Exit 2 and one line on stderr, nothing else: a flag argparse cannot read (no usage block: --help shows
    it), a tokenizer refusing a folder it does not own (its settings line comes after the checks), a checkpoint
    whose config.json holds a wrong-typed model field with its manifest updated to match (export and eval, as
    resume already did), a vocab.txt and a --token-file that are not UTF-8."""
    from test_train import tiny_config

    from mlmtrain.manifest import file_entries as entries
    from mlmtrain.tokenizer_folder import read_vocab
    from mlmtrain.upload import resolve_token

    def one_line(result, phrase):
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert phrase in result.stderr and "Traceback" not in result.stderr, result.stderr

    def argparse_refusal(*args):  # argparse exits through SystemExit, as the installed command does
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            in_process(capsys, *args)
        return subprocess.CompletedProcess(args, e.value.code, *capsys.readouterr())

    one_line(argparse_refusal("train", "--data", data_dir, "--max-steps", "1e3"), "invalid int value: '1e3'")
    one_line(argparse_refusal("export", "--dtype", "fp64"), "(see `mlmtrain export --help`)")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    one_line(in_process(capsys, "tokenizer", "--input", sample_corpus, "--out", user, "--vocab-size", "500"), str(user))
    assert (user / "notes.txt").read_text() == "mine"

    train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 1}))
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["hidden_size"] = "x"
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"].update(entries(ckpt, ["config.json"]))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    damaged = f"checkpoint {ckpt} is damaged: its config.json has hidden_size='x': a whole number is expected"
    one_line(in_process(capsys, "export", "--checkpoint", ckpt, "--out", tmp_path / "export"), damaged)
    one_line(in_process(capsys, "eval", "--model", ckpt, "--data", data_dir), damaged)

    bad_vocab = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    with open(bad_vocab / "vocab.txt", "ab") as f:
        f.write(b"\xff\n")
    with pytest.raises(UserError, match="vocab.txt is not UTF-8 text"):
        read_vocab(bad_vocab)
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="is not UTF-8 text: it must hold exactly one token"):
        resolve_token(str(tmp_path / "token"))


def test_a_missing_optional_package_is_one_sentence_naming_its_extra(monkeypatch, tmp_path):
    """Every optional package's absence is said one way: what needs which package, and the extra that brings it."""
    import sys

    from mlmtrain import corpus_rows, plot

    for name in ("pyarrow", "pyarrow.parquet", "matplotlib", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    with pytest.raises(UserError, match=r'^reading x\.parquet needs pyarrow: pip install -e "\.\[parquet\]"\.$'):
        corpus_rows.import_pyarrow("x.parquet")
    with pytest.raises(UserError, match=r'^plotting needs matplotlib: pip install -e "\.\[plot\]"\.$'):
        plot.plot(tmp_path, tmp_path / "curves.png")
    with pytest.raises(UserError, match=r'^--dataset needs the datasets library: pip install -e "\.\[datasets\]"\.$'):
        corpus_rows.open_dataset(None)


def test_a_command_that_needs_a_missing_package_says_so_before_any_work(monkeypatch, capsys, tmp_path):
    """demo, export (verifying), upload and bench need transformers (and bench's recipe accelerate): without it they
    refuse before writing anything, not after the training, the export's files or a section's runs."""
    import sys

    from mlmtrain.benchmarks import charts

    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, "transformers", None)
        demo = in_process(capsys, "demo", "--out", tmp_path / "demo")
        assert_refused(demo, "mlmtrain demo", 'pip install -e ".[hf]"')
        export = in_process(capsys, "export", "--checkpoint", tmp_path / "demo", "--out", tmp_path / "export")
        assert_refused(export, "verification needs transformers", "or pass --no-verify")
        upload = in_process(capsys, "upload", "--folder", tmp_path / "export", "--repo-id", "me/x", "--dry-run")
        assert_refused(upload, "upload (it loads the export before sending it) needs transformers")
        bench = in_process(capsys, "bench", "--out", tmp_path / "bench", "--quick", "--device", "cpu", "--sections",
                           "ceilings,mask")  # fmt: skip
        assert_refused(bench, "mlmtrain bench --sections mask needs transformers", 'pip install -e ".[bench]"')
    monkeypatch.setitem(sys.modules, "accelerate", None)
    bench = in_process(capsys, "bench", "--out", tmp_path / "bench", "--quick", "--device", "cpu", "--sections",
                       "train")  # fmt: skip
    assert_refused(bench, "mlmtrain bench --sections train needs accelerate")
    assert not any(tmp_path.iterdir())  # nothing written
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the report's charts are optional: tables only
    rows = [{"seq_cap": 128, "tokens_per_batch": 1024, "tokens_per_s": {"min": 1, "median": 2, "max": 3}}]
    assert charts.chart_throughput(rows, tmp_path / "chart.png") is False
