"""Every pre-flight check: passes on good input, and on bad input raises a UserError whose one sentence names
both numbers and the fix (instead of a `device-side assert triggered` on the GPU)."""

from __future__ import annotations

import pytest

from mlmtrain.errors import UserError
from mlmtrain.preflight import (
    check_data_against_model,
    check_positions,
    check_token_ids,
    check_tokenizer_vocab,
    check_vocab_match,
)


def test_token_ids_below_vocab():
    check_token_ids(29999, 30000)
    with pytest.raises(UserError, match=r"token id 30000 .* vocab_size is 30000: set vocab_size .* \(at least 30001\)"):
        check_token_ids(30000, 30000)


def test_config_vocab_equals_tokenizer_vocab():
    check_vocab_match(2000, 2000)
    with pytest.raises(UserError, match=r"vocab_size 30000 but the tokenizer has 2000 tokens: pass the tokenizer it"):
        check_vocab_match(30000, 2000)
    with pytest.raises(UserError, match=r"tokenizer has 2000 tokens but the token shards .* vocab of 2001"):
        check_tokenizer_vocab(2000, 2001)


def test_max_position_covers_longest_segment():
    check_positions(512, 512)
    with pytest.raises(UserError, match=r"up to 256 tokens but max_position_embeddings is 128: raise .* at least 256"):
        check_positions(128, 256)


def test_tokenizer_fingerprint(tokenizer_dir, tmp_path, sample_corpus):
    from mlmtrain.prepare import check_tokenizer_match
    from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer
    from mlmtrain.tokenizer_folder import tokenizer_fingerprint

    check_tokenizer_match(tokenizer_fingerprint(tokenizer_dir), tokenizer_dir, "the shards")
    check_tokenizer_match(None, tokenizer_dir, "the shards")  # unknown: nothing to compare
    train_tokenizer([sample_corpus], tmp_path / "other", TokenizerSettings(vocab_size=1500), progress=False)
    with pytest.raises(
        UserError, match=r"the data folder d was made with another tokenizer than .*other \(fingerprint"
    ):
        check_tokenizer_match(tokenizer_fingerprint(tokenizer_dir), tmp_path / "other", "the data folder d")


def test_data_against_real_shards(data_dir, tokenizer_dir):
    from mlmtrain.prepare import read_meta
    from mlmtrain.tokenizer_folder import read_vocab

    class Config:
        vocab_size, max_position_embeddings = len(read_vocab(tokenizer_dir)), 128

    meta = read_meta(data_dir)
    check_data_against_model(meta, Config, 128)
    with pytest.raises(UserError, match=f"token id {meta['max_token_id']} but the model's vocab_size is"):
        check_data_against_model(
            {**meta, "vocab_size": meta["max_token_id"]},
            type("C", (), {"vocab_size": meta["max_token_id"], "max_position_embeddings": 128}),
            128,
        )
    with pytest.raises(UserError, match="segments of up to 128 tokens but max_position_embeddings is 64"):
        check_data_against_model(
            meta, type("C", (), {"vocab_size": Config.vocab_size, "max_position_embeddings": 64}), 128
        )


def test_data_against_model_uses_the_packer_bound():
    class Config:
        vocab_size, max_position_embeddings = 100, 128

    meta = {"vocab_size": 100, "max_token_id": 99, "max_seq_len": 64}
    check_data_against_model(meta, Config, 128)
    with pytest.raises(UserError, match="up to 200 tokens but max_position_embeddings is 128"):
        check_data_against_model(meta, Config, 200)
    with pytest.raises(UserError, match="model has vocab_size 100 but the token shards were made with a vocab of 101"):
        check_data_against_model({**meta, "vocab_size": 101}, Config, 64)
