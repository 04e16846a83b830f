"""Pre-flight checks: run on plain numbers and CPU arrays before anything touches a device.

The seed's worst pain was a vocab size that did not match the tokenizer: an out-of-range id inside an
embedding lookup on the GPU surfaces as `device-side assert triggered` or `CUBLAS_STATUS_*`, far from the
cause. Every check here turns such a mismatch into one sentence naming both numbers and the fix.

Imports nothing heavy (no torch): `check_batch` duck-types torch tensors and numpy arrays alike.
"""

from __future__ import annotations

from mlmtrain.errors import UserError


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


def check_vocab_match(config_vocab_size: int, tokenizer_vocab_size: int) -> None:
    """The model's vocab must equal the tokenizer's, so every exported id decodes and no row is dead weight."""
    if config_vocab_size != tokenizer_vocab_size:
        raise UserError(
            f"the model config has vocab_size {config_vocab_size} but the tokenizer has {tokenizer_vocab_size} "
            f"tokens: set vocab_size to {tokenizer_vocab_size} (mlmtrain does this for you when the model is "
            "built from the tokenizer), or pass the tokenizer the model was trained with."
        )


def check_positions(max_position_embeddings: int, max_seq_len: int) -> None:
    """The longest packed segment (a sentence with [CLS] and [SEP]) needs a learned position for each token."""
    if max_seq_len > max_position_embeddings:
        raise UserError(
            f"the data has segments of up to {max_seq_len} tokens but max_position_embeddings is "
            f"{max_position_embeddings}: raise max_position_embeddings to at least {max_seq_len}, or re-run "
            f"`mlmtrain prepare --max-seq-len {max_position_embeddings}`."
        )


def check_tokenizer_fingerprint(data_fingerprint: str | None, tokenizer_fingerprint: str | None) -> None:
    """Shards made with one tokenizer and trained/exported with another give a model that decodes garbage."""
    if data_fingerprint and tokenizer_fingerprint and data_fingerprint != tokenizer_fingerprint:
        raise UserError(
            f"the token shards were made with tokenizer {data_fingerprint[:12]} but the tokenizer given is "
            f"{tokenizer_fingerprint[:12]}: pass the tokenizer directory the shards were prepared with, or re-run "
            "`mlmtrain prepare` with this one."
        )


def check_data_meta(
    meta: dict,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    tokenizer_vocab_size: int | None = None,
    tokenizer_fingerprint: str | None = None,
) -> None:
    """All data-vs-model checks from a shard `meta.json` (see docs/ARCHITECTURE.md, "Token shards")."""
    if tokenizer_vocab_size is not None:
        check_vocab_match(vocab_size, tokenizer_vocab_size)
    check_token_ids(int(meta["max_token_id"]), vocab_size)
    check_positions(max_position_embeddings, int(meta["max_seq_len"]))
    check_tokenizer_fingerprint(meta.get("tokenizer_fingerprint"), tokenizer_fingerprint)


def check_tokenizer_vocab(tokenizer_vocab_size: int, data_vocab_size: int) -> None:
    """The shards' meta `vocab_size` must be the tokenizer's (both come from `mlmtrain prepare`)."""
    if tokenizer_vocab_size != data_vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the token shards were made with a vocab of "
            f"{data_vocab_size}: pass the tokenizer the shards were prepared with, or re-run `mlmtrain prepare`."
        )


def check_data_against_model(meta: dict, config, max_seqlen: int) -> None:
    """Shard meta vs a model config (any object with vocab_size and max_position_embeddings) and the packer's
    segment bound: vocab equal, every id in range, every segment position learned."""
    if "vocab_size" in meta:
        check_vocab_match(config.vocab_size, int(meta["vocab_size"]))
    check_token_ids(int(meta["max_token_id"]), config.vocab_size)
    check_positions(config.max_position_embeddings, max(int(meta["max_seq_len"]), int(max_seqlen)))


def _max(x) -> int:
    return int(x.max())


def _min(x) -> int:
    return int(x.min())


def check_batch(
    input_ids,
    position_ids=None,
    cu_seqlens=None,
    max_seqlen: int | None = None,
    masked_positions=None,
    *,
    vocab_size: int,
    max_position_embeddings: int | None = None,
) -> None:
    """Check one packed batch on the host, before the copy to the device (torch CPU tensors or numpy arrays).

    Costs a few reductions over T ids; call it on the first batches or under a debug flag, not every step."""
    T = len(input_ids)
    if T == 0:
        raise UserError("the batch holds no tokens: check tokens_per_batch and the data directory.")
    check_token_ids(_max(input_ids), vocab_size, source="the batch")
    if _min(input_ids) < 0:
        raise UserError(
            f"the batch holds a negative token id ({_min(input_ids)}): the data is corrupt; re-run `mlmtrain prepare`."
        )
    if position_ids is not None:
        if len(position_ids) != T:
            raise UserError(
                f"position_ids has {len(position_ids)} entries but input_ids has {T}: the packer "
                "must emit one position per token."
            )
        if max_position_embeddings is not None and _max(position_ids) >= max_position_embeddings:
            raise UserError(
                f"the batch has position id {_max(position_ids)} but max_position_embeddings is "
                f"{max_position_embeddings}: raise max_position_embeddings to at least {_max(position_ids) + 1}, "
                "or prepare the data with a smaller --max-seq-len."
            )
    if cu_seqlens is not None:
        if "int32" not in str(cu_seqlens.dtype):
            raise UserError(f"cu_seqlens must be int32 (flash attention's format), not {cu_seqlens.dtype}.")
        if len(cu_seqlens) < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise UserError(
                f"cu_seqlens must start at 0 and end at the token count {T}, but it runs from "
                f"{int(cu_seqlens[0])} to {int(cu_seqlens[-1])}: pad the tail of the batch as [PAD] segments."
            )
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if _min(lengths) < 0:
            raise UserError("cu_seqlens decreases somewhere: segment starts must be non-decreasing.")
        if max_seqlen is not None and _max(lengths) > max_seqlen:
            raise UserError(
                f"the batch has a segment of {_max(lengths)} tokens but max_seqlen is {max_seqlen}: pass the "
                "true maximum (attention would silently drop the overflow), or split long segments."
            )
    if masked_positions is not None and len(masked_positions) > 0:
        if _min(masked_positions) < 0 or _max(masked_positions) >= T:
            raise UserError(
                f"masked_positions range over [{_min(masked_positions)}, {_max(masked_positions)}] but the batch "
                f"has {T} tokens: padded slots must point at a real token (e.g. 0) with label -100."
            )
