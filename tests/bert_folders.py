"""transformers BERT folders built locally for the tests (random weights, no download): what `save_pretrained`
writes for a BertForMaskedLM (or a BertModel, without the MLM head) and its BertTokenizer.

Two vocabulary layouts over the same WordPiece pieces (those of the session's sample tokenizer):
- "0-4": [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4, as `mlmtrain tokenizer` writes them;
- "google": [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, [unused99..103], the
  pieces, then two more [unused*] rows at the end (as some domain vocabularies append them), so the masking
  kernel sees both a leading never-masked block and never-masked ids past it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlmtrain.tokenizer_folder import read_vocab

CUSTOM_DIMS = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=80,
    max_position_embeddings=136,
    type_vocab_size=1,
    layer_norm_eps=1e-7,
)


def vocabulary(tokenizer_dir, layout: str) -> list[str]:
    pieces = read_vocab(tokenizer_dir)[5:]
    if layout == "0-4":
        return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    head = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return [*head, *[f"[unused{i}]" for i in range(99, 104)], *pieces, "[unused104]", "[unused105]"]


def make_bert_folder(out: Path, tokenizer_dir, layout: str = "0-4", *, head: bool = True, seed: int = 0, **config):
    """Write a transformers BERT folder to `out` (random weights from `seed`); `config` overrides BertConfig."""
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(tokenizer_dir, layout)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tok = transformers.BertTokenizerFast(
        str(out / "vocab.txt"), do_lower_case=False, strip_accents=False, tokenize_chinese_chars=True
    )
    tok.save_pretrained(str(out))
    hf_config = transformers.BertConfig(vocab_size=len(vocab), pad_token_id=0, **{**CUSTOM_DIMS, **config})
    torch.manual_seed(seed)
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(hf_config)
    if head:
        with torch.no_grad():  # a bias that is not zero, so a head that is not carried over would show
            model.cls.predictions.bias.normal_(0.0, 0.5)
    model.save_pretrained(str(out))
    return out


def swapped_tokenizer(folder: Path, out: Path, i: int = 10) -> Path:
    """A copy of `folder`'s tokenizer with tokens i and i + 1 trading ids: the same size, other tokens."""
    import transformers

    vocab = read_vocab(folder)
    out = Path(out)
    out.mkdir(parents=True)
    swapped = [*vocab[:i], vocab[i + 1], vocab[i], *vocab[i + 2 :]]
    (out / "vocab.txt").write_text("".join(t + "\n" for t in swapped), encoding="utf-8")
    transformers.BertTokenizerFast(
        str(out / "vocab.txt"), do_lower_case=False, strip_accents=False, tokenize_chinese_chars=True
    ).save_pretrained(str(out))
    return out
