"""What --init-from refuses in a Hugging Face BERT folder, by name, before any device work: cross-attention, a decoder
bias that differs from the MLM bias, a missing encoder weight, a weight of another shape, another pad id."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


def _bert_folder(tokenizer_dir, tmp_path):
    pytest.importorskip("transformers")
    from bert_folders import make_bert_folder

    return make_bert_folder(tmp_path / "bert", tokenizer_dir, "0-4")


def test_a_model_with_cross_attention_is_refused_by_name(tmp_path):
    """A BERT built with cross-attention layers (add_cross_attention = true) has weights this encoder has no
    place for: refused, naming the setting."""
    from mlmtrain.errors import UserError
    from mlmtrain.model import BertConfig
    from mlmtrain.pretrained import read_config

    hf = {"model_type": "bert", **BertConfig().to_hf_dict(), "add_cross_attention": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="add_cross_attention"):
        read_config(tmp_path)


def test_a_decoder_bias_that_differs_from_the_mlm_bias_is_refused(tokenizer_dir, tmp_path):
    """mlmtrain ties cls.predictions.decoder.bias to cls.predictions.bias: a folder holding the two with
    different values (untied by another trainer) is refused, not silently trained with one of them."""
    from safetensors.torch import load_file, save_file

    from mlmtrain.errors import UserError
    from mlmtrain.pretrained import read_pretrained

    folder = _bert_folder(tokenizer_dir, tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["cls.predictions.decoder.bias"] = weights["cls.predictions.bias"] + 1.0
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(UserError, match="decoder.bias that differs from cls.predictions.bias"):
        read_pretrained(folder)


def test_a_folder_lacking_an_encoder_weight_is_refused(tokenizer_dir, tmp_path):
    """Only the MLM head may be missing (it is initialised); a missing encoder weight means the config and the
    weights are not one model's."""
    from safetensors.torch import load_file, save_file

    from mlmtrain.errors import UserError
    from mlmtrain.pretrained import read_pretrained

    folder = _bert_folder(tokenizer_dir, tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["bert.encoder.layer.0.output.dense.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks 1 encoder weights \(bert.encoder.layer.0.output.dense.weight"):
        read_pretrained(folder)


def test_a_weight_of_another_shape_than_the_config_implies_is_refused(tokenizer_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from mlmtrain.errors import UserError
    from mlmtrain.pretrained import read_pretrained

    folder = _bert_folder(tokenizer_dir, tmp_path)
    weights = load_file(folder / "model.safetensors")
    key = "bert.encoder.layer.0.output.dense.bias"
    weights[key] = torch.zeros(weights[key].numel() + 1)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(UserError, match=f"weight {key} has shape"):
        read_pretrained(folder)


def test_a_model_whose_pad_id_is_not_the_tokenizers_pad_is_refused(tmp_path):
    """The model's pad_token_id row must be the tokenizer's [PAD]: otherwise the padding embedding trains as a
    real token's."""
    from mlmtrain.errors import UserError
    from mlmtrain.model import BertConfig
    from mlmtrain.pretrained import check_tokenizer_fits

    vocab = [f"t{i}" for i in range(10)]
    with pytest.raises(UserError, match="pad_token_id=3 in config.json but the tokenizer's \\[PAD\\] is id 0"):
        check_tokenizer_fits(BertConfig(vocab_size=10, pad_token_id=3), SimpleNamespace(pad=0), vocab, tmp_path)
