"""Every pre-flight check: passes on good input, and on bad input raises a UserError whose one sentence names
both numbers and the fix (the seed got `device-side assert triggered` instead)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlmtrain.errors import UserError
from mlmtrain.preflight import (
    check_batch,
    check_data_against_model,
    check_data_meta,
    check_positions,
    check_token_ids,
    check_tokenizer_fingerprint,
    check_tokenizer_vocab,
    check_vocab_match,
)


def test_token_ids_below_vocab():
    check_token_ids(29999, 30000)
    with pytest.raises(UserError, match=r"token id 30000 .* vocab_size is 30000: set vocab_size .* \(at least 30001\)"):
        check_token_ids(30000, 30000)


def test_config_vocab_equals_tokenizer_vocab():
    check_vocab_match(2000, 2000)
    with pytest.raises(UserError, match=r"vocab_size 30000 but the tokenizer has 2000 tokens: set vocab_size to 2000"):
        check_vocab_match(30000, 2000)
    with pytest.raises(UserError, match=r"tokenizer has 2000 tokens but the token shards .* vocab of 2001"):
        check_tokenizer_vocab(2000, 2001)


def test_max_position_covers_longest_segment():
    check_positions(512, 512)
    with pytest.raises(UserError, match=r"up to 256 tokens but max_position_embeddings is 128: raise .* at least 256"):
        check_positions(128, 256)


def test_tokenizer_fingerprint():
    check_tokenizer_fingerprint("a" * 64, "a" * 64)
    check_tokenizer_fingerprint(None, "a" * 64)  # unknown: nothing to compare
    with pytest.raises(UserError, match="made with tokenizer aaaa.* but the tokenizer given is bbbb"):
        check_tokenizer_fingerprint("a" * 64, "b" * 64)


def test_data_meta_checks_on_real_shards(data_dir, tokenizer_dir):
    from mlmtrain.data import read_meta
    from mlmtrain.tokenizer import read_vocab, tokenizer_fingerprint

    meta = read_meta(data_dir)
    vocab = len(read_vocab(tokenizer_dir))
    check_data_meta(
        meta,
        vocab_size=vocab,
        max_position_embeddings=128,
        tokenizer_vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
    )
    with pytest.raises(UserError, match=f"vocab_size {vocab + 1} but the tokenizer has {vocab} tokens"):
        check_data_meta(meta, vocab_size=vocab + 1, max_position_embeddings=128, tokenizer_vocab_size=vocab)
    with pytest.raises(UserError, match=f"token id {meta['max_token_id']} but the model's vocab_size is"):
        check_data_meta(meta, vocab_size=meta["max_token_id"], max_position_embeddings=128)
    with pytest.raises(UserError, match="segments of up to 128 tokens but max_position_embeddings is 64"):
        check_data_meta(meta, vocab_size=vocab, max_position_embeddings=64)


def test_data_against_model_uses_the_packer_bound():
    class Config:
        vocab_size, max_position_embeddings = 100, 128

    meta = {"vocab_size": 100, "max_token_id": 99, "max_seq_len": 64}
    check_data_against_model(meta, Config, 128)
    with pytest.raises(UserError, match="up to 200 tokens but max_position_embeddings is 128"):
        check_data_against_model(meta, Config, 200)
    with pytest.raises(UserError, match="vocab_size 100 but the tokenizer has 101"):
        check_data_against_model({**meta, "vocab_size": 101}, Config, 64)


def good_batch(lib):
    ids = lib.asarray([2, 7, 9, 3, 2, 8, 3, 0, 0])
    pos = lib.asarray([0, 1, 2, 3, 0, 1, 2, 0, 1])
    cu = lib.asarray([0, 4, 7, 9, 9], dtype=lib.int32)
    masked = lib.asarray([1, 5, 0])
    return ids, pos, cu, masked


@pytest.mark.parametrize("lib", [torch, np], ids=["torch", "numpy"])
def test_check_batch(lib):
    ids, pos, cu, masked = good_batch(lib)
    check_batch(ids, pos, cu, 4, masked, vocab_size=10, max_position_embeddings=4)
    with pytest.raises(UserError, match="token id 9 but the model's vocab_size is 9"):
        check_batch(ids, pos, cu, 4, masked, vocab_size=9)
    with pytest.raises(UserError, match="position id 3 but max_position_embeddings is 3"):
        check_batch(ids, pos, cu, 4, masked, vocab_size=10, max_position_embeddings=3)
    with pytest.raises(UserError, match="segment of 4 tokens but max_seqlen is 3"):
        check_batch(ids, pos, cu, 3, masked, vocab_size=10)
    with pytest.raises(UserError, match="int32"):
        check_batch(ids, pos, cu.astype(lib.int64) if lib is np else cu.long(), 4, vocab_size=10)
    short = lib.asarray([0, 4, 7], dtype=lib.int32)
    with pytest.raises(UserError, match="end at the token count 9, but it runs from 0 to 7"):
        check_batch(ids, pos, short, 4, vocab_size=10)
    with pytest.raises(UserError, match=r"masked_positions range over \[0, 9\] but the batch has 9 tokens"):
        check_batch(ids, pos, cu, 4, lib.asarray([0, 9]), vocab_size=10)
    with pytest.raises(UserError, match="negative token id"):
        check_batch(lib.asarray([1, -1]), vocab_size=10)


def test_preflight_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, mlmtrain.preflight; print(any(m in sys.modules for m in ('torch', 'numpy', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
