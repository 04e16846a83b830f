"""Every pre-flight check: passes on good input, and on bad input raises a UserError whose one sentence names
both numbers and the fix (instead of a `device-side assert triggered` on the GPU)."""

from __future__ import annotations

from pathlib import Path

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


def test_shard_checks_hold_at_their_boundaries(tmp_path):
    """check_shard / check_meta / open_npy refuse, in one sentence, exactly past each limit: an empty sentence
    (a repeated offset), a sentence one token too long for [CLS] and [SEP], a special id at vocab_size, a file of
    another dtype of the same width."""
    import numpy as np

    from mlmtrain.shard_check import check_meta, check_shard, open_npy

    tokens = np.full(12, 7, dtype=np.uint16)
    counts = {"tokens": 12, "sentences": 3}
    check_shard(tokens, np.array([0, 4, 8, 12]), np.array([0, 3]), counts, 100, 6, tmp_path)  # 4 = 6 - 2 fits
    with pytest.raises(UserError, match="it does not increase after position 1"):
        check_shard(tokens, np.array([0, 4, 4, 12]), np.array([0, 3]), counts, 100, 10, tmp_path)
    with pytest.raises(UserError, match="a sentence of 5 tokens, where meta.json's max_seq_len 6 leaves room for 4"):
        check_shard(tokens, np.array([0, 5, 8, 12]), np.array([0, 3]), counts, 100, 6, tmp_path)

    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "never_mask": [[0, 4]]}
    meta = {"vocab_size": 5, "max_seq_len": 3, "max_token_id": 4, "dtype": "uint16", "tokenizer_fingerprint": "f",
            "train": counts, "special_tokens": specials}  # fmt: skip
    check_meta(meta, tmp_path / "meta.json", ["train"])
    for changed, key in (({"mask": 5}, "special_tokens"), ({"never_mask": [[0, 5]]}, "special_tokens")):
        with pytest.raises(UserError, match=f"{key} missing or wrong"):
            check_meta({**meta, "special_tokens": {**specials, **changed}}, tmp_path / "meta.json", ["train"])
    with pytest.raises(UserError, match="max_seq_len missing or wrong"):
        check_meta({**meta, "max_seq_len": 2}, tmp_path / "meta.json", ["train"])

    np.save(tmp_path / "tokens.npy", np.arange(4, dtype=np.int16))  # as wide as uint16, read as uint16 it lies
    with pytest.raises(UserError, match="holds int16 of shape"):
        open_npy(tmp_path / "tokens.npy", np.dtype(np.uint16))


def test_the_fingerprint_covers_which_tokens_are_special(tokenizer_dir, tmp_path):
    """The same vocab.txt and normalizer with one more token marked special masks differently: another
    fingerprint, so shards or a checkpoint made with one are refused with the other."""
    import json
    import shutil

    from mlmtrain.tokenizer_folder import read_special_tokens, tokenizer_fingerprint

    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    word = next(w for w, i in spec["model"]["vocab"].items() if i == 10)
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    spec["added_tokens"].append({"id": 10, "content": word, **flags})
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert (other / "vocab.txt").read_bytes() == (Path(tokenizer_dir) / "vocab.txt").read_bytes()
    assert 10 in read_special_tokens(other).never_mask_ids()
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer_dir)
