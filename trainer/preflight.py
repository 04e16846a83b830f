"""Do the tokenizer, the shards and the model fit together? Checked on plain numbers before anything touches a
device.

A vocab size that does not match the tokenizer makes an out-of-range id reach an embedding lookup on the GPU,
where it surfaces as `device-side assert triggered` or `CUBLAS_STATUS_*`, far from the cause. Every check here
turns such a mismatch into one sentence naming both numbers and the fix. No torch import.
"""

from __future__ import annotations

from math import isfinite

from mlmtrain.errors import UserError

# A model config's fields (transformers' names) -> (integer, lowest, highest, lowest allowed itself): what a
# saved config.json may hold; anything else would fail mid-run, or train something else (0 layers, a negative eps)
MODEL_FIELDS = {
    "vocab_size": (True, 1, None, True), "hidden_size": (True, 1, None, True),
    "num_hidden_layers": (True, 1, None, True), "num_attention_heads": (True, 1, None, True),
    "intermediate_size": (True, 1, None, True), "max_position_embeddings": (True, 1, None, True),
    "type_vocab_size": (True, 1, None, True), "pad_token_id": (True, 0, None, True),
    "layer_norm_eps": (False, 0.0, None, False), "initializer_range": (False, 0.0, None, True),
    "hidden_dropout_prob": (False, 0.0, 1.0, True), "attention_probs_dropout_prob": (False, 0.0, 1.0, True),
}  # fmt: skip


def check_model_fields(config: dict, source: str) -> None:
    """The model fields a config dict holds (others are not read), by type and range, in one sentence naming
    `source`: a whole number or a number, a finite one, within MODEL_FIELDS' bounds."""
    for name, (integer, low, high, closed) in MODEL_FIELDS.items():
        if name not in config:
            continue
        value = config[name]
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not isfinite(value):
            raise UserError(f"{source} has {name}={value!r}: {kind} is expected.")
        if value < low or (value == low and not closed) or (high is not None and value >= high):
            bound = f">= {low}" if closed else f"> {low}"
            raise UserError(
                f"{source} has {name}={value!r}: {kind} {bound}{f' and < {high}' if high else ''} is expected."
            )


def check_token_ids(max_token_id: int, vocab_size: int, *, source: str = "the token shards") -> None:
    """Every token id must index a row of the embedding: max id < vocab_size."""
    if max_token_id >= vocab_size:
        raise UserError(
            f"{source} hold token id {max_token_id} but the model's vocab_size is {vocab_size}: "
            f"set vocab_size to the tokenizer's vocab size (at least {max_token_id + 1}), or re-run "
            "`mlmtrain prepare` with the tokenizer this model is meant for."
        )
    if max_token_id < 0:
        raise UserError(f"{source} hold a negative token id ({max_token_id}): re-run `mlmtrain prepare`.")


def check_vocab_match(config_vocab_size: int, tokenizer_vocab_size: int, what: str = "the model") -> None:
    """The model's vocab must equal the tokenizer's, so every exported id decodes and no row is dead weight
    (`what`: a trained model, such as a checkpoint, whose vocab_size is fixed)."""
    if config_vocab_size != tokenizer_vocab_size:
        raise UserError(
            f"{what} has vocab_size {config_vocab_size} but the tokenizer has {tokenizer_vocab_size} tokens: pass "
            "the tokenizer it was trained with."
        )


def check_positions(max_position_embeddings: int, max_seq_len: int, fixed: bool = False) -> None:
    """The longest packed segment (a sentence with [CLS] and [SEP]) needs a learned position for each token.
    `fixed`: the positions are a trained model's (a pretrained folder, a checkpoint), so only the data can change."""
    if max_seq_len > max_position_embeddings:
        redo = f"re-run `mlmtrain prepare --max-seq-len {max_position_embeddings}`"
        fix = f"the model's positions are fixed by its weights: {redo}" if fixed else (
            f"raise max_position_embeddings to at least {max_seq_len}, or {redo}")  # fmt: skip
        raise UserError(
            f"the data has segments of up to {max_seq_len} tokens but max_position_embeddings is "
            f"{max_position_embeddings}: {fix}."
        )


def check_tokenizer_vocab(tokenizer_vocab_size: int, data_vocab_size: int) -> None:
    """The shards' meta `vocab_size` must be the tokenizer's (both come from `mlmtrain prepare`)."""
    if tokenizer_vocab_size != data_vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the token shards were made with a vocab of "
            f"{data_vocab_size}: pass the tokenizer the shards were prepared with, or re-run `mlmtrain prepare`."
        )


def check_data_against_model(meta: dict, config, max_seqlen: int, fixed: bool = False) -> None:
    """Shard meta vs a model config (any object with vocab_size and max_position_embeddings) and the packer's
    segment bound: vocab equal, every id in range, every segment position learned (`fixed`: a trained model's
    positions, as check_positions says)."""
    if "vocab_size" in meta and int(meta["vocab_size"]) != config.vocab_size:
        raise UserError(
            f"the model has vocab_size {config.vocab_size} but the token shards were made with a vocab of "
            f"{meta['vocab_size']}: pass shards prepared with the model's tokenizer, or re-run `mlmtrain prepare`."
        )
    check_token_ids(int(meta["max_token_id"]), config.vocab_size)
    check_positions(config.max_position_embeddings, max(int(meta["max_seq_len"]), int(max_seqlen)), fixed)


def check_batch_layout(meta: dict, data_dir, tokens_per_batch: int, grad_accum: int, world: int) -> None:
    """The shards against the batch settings: a valid split to evaluate on, a micro-batch that holds the
    longest segment (`tokens_per_batch` 0 = auto, decided later), a global batch shared evenly by `world`
    processes."""
    if meta["valid"]["sentences"] == 0:
        fix = (
            "give it more text: the corpus is one split unit (one document of a few sentences), all of it train"
            if meta.get("valid_fraction", 0) > 0
            else "run `mlmtrain prepare` again with --valid-fraction above 0"
        )
        raise UserError(f"the shards in {data_dir} have no valid split to evaluate on: {fix}")
    if 0 < tokens_per_batch < meta["max_seq_len"]:
        raise UserError(
            f"--tokens-per-batch {tokens_per_batch} is below the shards' max_seq_len {meta['max_seq_len']}: a "
            f"micro-batch must hold the longest segment; use at least {meta['max_seq_len']}"
        )
    if grad_accum % world:
        raise UserError(
            f"optim.grad_accum={grad_accum} must be a multiple of the number of processes ({world}) so every rank "
            f"gets the same share of the global batch: e.g. --set optim.grad_accum={(grad_accum // world + 1) * world}"
        )


def check_device(device: str, gpus: int, name: str = "train.device", cpu: str = "--set train.device=cpu") -> None:
    """A device setting (`name`, its CPU choice `cpu`) against the CUDA GPUs usable here: "cuda" means this
    rank's, "cuda:N" needs N + 1."""
    if device.startswith("cuda") and gpus <= int(device[5:] or 0):
        raise UserError(f"{name} is {device} but {gpus} CUDA GPUs are usable here: use {cpu}")
