"""What a training run resolves and checks before any device work: its inputs (shards, tokenizer, their fit,
the batch layout for N processes), the checkpoint a resume would take, the settings on its device and world,
the model's shape. `setup` runs it in every process; `mlmtrain train --nproc N` once, before starting them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from mlmtrain import checkpoint, parallel
from mlmtrain.config import RunConfig, default_precision, report_targets
from mlmtrain.config_load import config_from_dict, source_path
from mlmtrain.errors import UserError
from mlmtrain.fast_paths import check_speed_options
from mlmtrain.metrics import check_report_to
from mlmtrain.model import SHAPE_FIELDS, BertConfig
from mlmtrain.preflight import check_batch_layout, check_data_against_model, check_device, check_tokenizer_vocab
from mlmtrain.prepare import SPLITS, check_tokenizer_match, load_split, read_meta, shard_specials
from mlmtrain.pretrained import check_tokenizer_fits, locate, read_pretrained
from mlmtrain.tokenizer_folder import read_vocab, transformers_casing_problem


def check_inputs(cfg: RunConfig, world: int | None = None) -> tuple[dict, list[str]]:
    """Everything that can be wrong with the inputs, found before any device work (with `world`, the number
    of processes `--nproc` asks for, before torchrun starts them)."""
    if cfg.model.init_from and not cfg.data.tokenizer_dir:  # the pretrained model's own tokenizer
        cfg.data.tokenizer_dir = str(locate(cfg.model.init_from))
    if not cfg.data.data_dir or not cfg.data.tokenizer_dir or not cfg.out_dir:
        raise UserError("train needs --data DIR (from `mlmtrain prepare`), --tokenizer DIR and --out RUN_DIR")
    meta = read_meta(cfg.data.data_dir)
    vocab = read_vocab(cfg.data.tokenizer_dir)
    check_tokenizer_vocab(len(vocab), meta["vocab_size"])
    check_tokenizer_match(meta["tokenizer_fingerprint"], cfg.data.tokenizer_dir, f"the data folder {cfg.data.data_dir}")
    check_report_to(report_targets(cfg.train.report_to))
    for split in SPLITS:
        load_split(cfg.data.data_dir, split)  # a damaged file is named here, not by the packer mid-run
    world = world or parallel.world_size()
    check_batch_layout(meta, cfg.data.data_dir, cfg.data.tokens_per_batch, cfg.optim.grad_accum, world)
    check_device(cfg.train.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return meta, vocab


def model_config_for(cfg: RunConfig, vocab: list[str], specials, start, pretrained) -> BertConfig:
    """The model's shape: a pretrained model's, a resumed run's own (for a run that started from one), or
    `cfg.model`'s. Dropout is always the run's: a training setting, not part of the model."""
    dropout = dict(hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout)
    if pretrained is not None:
        config = dataclasses.replace(pretrained.config, **dropout)
        check_tokenizer_fits(config, specials, vocab, pretrained.folder)
        return config
    if cfg.model.init_from and start is not None:
        saved = checkpoint.read_state(start)[0]["model"]  # checked: a damaged file is one sentence
        return dataclasses.replace(BertConfig.from_dict(saved, f"checkpoint {start}'s config.json"), **dropout)
    return BertConfig.from_spec(cfg.model, len(vocab), specials.pad)


def start_check(cfg: RunConfig, meta: dict, vocab: list[str]):
    """What refuses a checkpoint this run would not continue (run_folder calls it before taking the folder)."""

    def check(ckpt: Path) -> None:  # a resumed run's model is its checkpoint's: no pretrained folder is read
        model_config = model_config_for(cfg, vocab, shard_specials(meta), ckpt, None)
        T = tokens_per_batch_on(cfg, parallel.rank_device(cfg.train.device))
        check_resume_compatible(ckpt, cfg, meta, model_config, T)

    return check


def tokens_per_batch_on(cfg: RunConfig, device: torch.device) -> int:
    return cfg.data.tokens_per_batch or (65536 if device.type == "cuda" else 4096)  # 0: auto


@dataclass
class Plan:
    """What a run resolves before any device work: its settings on its device and world, its model's shape."""

    precision: str
    compile: bool
    tokens_per_batch: int
    max_seqlen: int  # the shards' max_seq_len: the cap on a segment ([CLS] and [SEP] included)
    model_config: BertConfig
    pretrained: object  # the pretrained model to start from (pretrained.read_pretrained), or None


def plan_run(cfg: RunConfig, meta: dict, vocab: list[str], start, device: torch.device, world: int) -> Plan:
    """Resolve and check what needs no device (`--nproc` runs it for rank 0 before starting the processes)."""
    precision = cfg.train.precision if cfg.train.precision != "auto" else default_precision(device.type)
    use_compile = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    T = tokens_per_batch_on(cfg, device)
    parallel.check_shard(cfg.train.shard, precision, world)
    parallel.timeout()  # a malformed MLMTRAIN_DIST_TIMEOUT refused here, not at the first collective
    max_seqlen = int(meta["max_seq_len"])
    # a pretrained model's weights and shape are read only to start; a resumed run has them in its checkpoint
    pretrained = read_pretrained(locate(cfg.model.init_from)) if cfg.model.init_from and start is None else None
    if pretrained is not None:  # trained on from here only on text split as in its pretraining
        problem = transformers_casing_problem(cfg.data.tokenizer_dir, pretrained.folder)
        if problem:
            raise UserError(problem)
    model_config = model_config_for(cfg, vocab, shard_specials(meta), start, pretrained)
    check_data_against_model(meta, model_config, max_seqlen, fixed=pretrained is not None or start is not None)
    check_speed_options(cfg, max_seqlen, device, precision, use_compile, T, world, model_config.head_dim)
    return Plan(precision, use_compile, T, max_seqlen, model_config, pretrained)


# what a resumed run continues only under the same values: its batches and their split into micro-batches, the
# packer's layout and unit and its shuffles, and the masks (keyed by the seed, the step and the token's index in it)
CONTINUITY_KEYS = (("optim", "grad_accum"), ("data", "layout"), ("data", "pack"), ("train", "seed"))
# what else makes a run's history, which a resume in the run's own folder keeps (a new run from its checkpoint, in
# another folder, may change them): the optimizer and its schedule (max_steps: --change-max-steps), the masking,
# the dropout. The rest (cadences, speed options, device, precision, tracking) may change on any resume.
HISTORY_KEYS = (
    *(("optim", k) for k in ("lr", "betas", "eps", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio")),
    ("optim", "grad_clip"), *(("mask", k) for k in ("mask_prob", "mask_frac", "random_frac", "whole_word")),
    ("model", "dropout"),
)  # fmt: skip


def check_resume_compatible(ckpt: Path, run, meta: dict, model_config: BertConfig, tokens_per_batch: int) -> None:
    """Refuse to resume on other data, another tokenizer, another model shape, another starting model, or other
    batches, data order or masks (CONTINUITY_KEYS, and `tokens_per_batch` as resolved on this device); and, in the
    run's own folder, under other history settings (HISTORY_KEYS). `run` is the RunConfig the resumed run uses."""
    saved_config, state = checkpoint.read_state(ckpt)
    problems = []
    if state.get("data_fingerprint") != checkpoint.data_fingerprint(meta):
        problems.append(f"the data shards differ from those it was trained on ({run.data.data_dir})")
    if state.get("tokenizer_fingerprint") != meta["tokenizer_fingerprint"]:
        problems.append("the tokenizer differs")
    saved_model = saved_config.get("model", {})
    for key in (*SHAPE_FIELDS, "layer_norm_eps", "pad_token_id"):  # the shapes, and what else the weights mean
        if saved_model.get(key) != getattr(model_config, key):
            problems.append(
                f"model {key} is {getattr(model_config, key)} but the checkpoint has {saved_model.get(key)}"
            )
    saved_run = config_from_dict(saved_config.get("run", {}))
    resolved = state.get("resolved") if isinstance(state.get("resolved"), dict) else {}
    saved_tokens = resolved.get("data.tokens_per_batch") or saved_run.data.tokens_per_batch
    pairs = [("data.tokens_per_batch", tokens_per_batch, saved_tokens)]
    pairs += [(f"{a}.{b}", getattr(getattr(run, a), b), getattr(getattr(saved_run, a), b)) for a, b in CONTINUITY_KEYS]
    changed = [
        f"{key} is {ours!r} here but {theirs!r} in the checkpoint's run"
        for key, ours, theirs in pairs
        if ours != theirs
    ]
    if changed:  # fmt: skip
        problems.append(
            ", ".join(changed) + " (a run continues its batches, data order and masks only under the same values)"
        )
    if (checkpoint.run_folder_of(ckpt) or ckpt).resolve() == Path(run.out_dir).resolve():  # its own folder
        pairs = [(f"{a}.{b}", getattr(getattr(run, a), b), getattr(getattr(saved_run, a), b)) for a, b in HISTORY_KEYS]
        changed = [f"{key} is {ours!r} here but {theirs!r} in the run" for key, ours, theirs in pairs if ours != theirs]
        if changed:
            problems.append(
                ", ".join(changed) + " (a resume in the run's folder continues its history under its settings: drop "
                "those flags, as a resume without --config takes the run's own; or start a new run from this "
                f"checkpoint: --resume {ckpt} --out NEW_RUN)"
            )
    saved_init = state.get("init_from")
    if run.model.init_from and source_path(run.model.init_from) != source_path(saved_init or ""):
        problems.append(
            f"model.init_from is {run.model.init_from} but the checkpoint's run started from {saved_init or 'scratch'} "
            "(a resume takes its weights from the checkpoint: drop --init-from)"
        )
    if problems:
        raise UserError(f"cannot resume from {ckpt}: " + "; ".join(problems))
