"""What --init-from refuses in a Hugging Face BERT folder, by name, before any device work: cross-attention, a decoder
bias that differs from the MLM bias, a missing encoder weight, a weight of another shape, another pad id, a file
for a folder, and a folder that is not one readable BERT (its config or weights missing, damaged or sharded)."""

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


FOLDER_REFUSALS = {  # name -> (how to spoil a BERT folder, the sentence's words)
    "no_config": (lambda f: (f / "config.json").unlink(), "has no config.json: pass a transformers model folder"),
    "config_not_json": (
        lambda f: (f / "config.json").write_text('{"model_type": "be'),
        "config.json is not valid JSON",
    ),
    "config_a_list": (lambda f: (f / "config.json").write_text("[]"), "holds a JSON list, not an object of settings"),
    "weights_truncated": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
        "model.safetensors is damaged or not a weights file (",
    ),
    "weights_sharded": (
        lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors.index.json").write_text("{}")),
        "holds sharded weights (model.safetensors.index.json); save them as one file",
    ),
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors or pytorch_model.bin"),
}


@pytest.mark.parametrize("name", list(FOLDER_REFUSALS))
def test_a_folder_that_is_not_one_readable_bert_is_refused_in_one_sentence(name, tokenizer_dir, tmp_path):
    """A folder without a config.json, with one that is not a JSON object, or with weights that are cut short,
    sharded or absent: one sentence naming the file, not a traceback from transformers or safetensors."""
    from mlmtrain.errors import UserError
    from mlmtrain.pretrained import locate, read_pretrained

    folder = _bert_folder(tokenizer_dir, tmp_path)
    spoil, words = FOLDER_REFUSALS[name]
    spoil(folder)
    with pytest.raises(UserError) as refused:
        read_pretrained(folder)
    assert words in str(refused.value) and "\n" not in str(refused.value), refused.value
    with pytest.raises(UserError, match="is a file; pass the folder that holds it"):
        locate(folder / "config.json" if (folder / "config.json").is_file() else folder / "vocab.txt")
