"""The model card (README.md of an export): the YAML header the Hub reads (fill-mask widget, language, license)
and what the model is, what it was trained on, for how long and how well, with the exact command."""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_WIDGETS = {  # the blog post's widget sentence for Korean
    "ko": "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다.",
    "en": "The capital of France is [MASK].",
}


def model_card(
    *,
    title: str,
    config,
    run_config: dict,
    state: dict,
    step: int,
    language: str | None,
    license: str,
    widgets: list[str],
    data_meta: dict | None,
    base_model: str | None = None,
):
    """The README.md: YAML header the Hub reads (fill-mask widget) + what, on what, how long, how good.
    `base_model`: the Hub id of the model training started from (`--init-from`), for the header's `base_model`;
    a run that started from a local folder names that folder in the text only."""
    from huggingface_hub import ModelCard, ModelCardData

    from mlmtrain import __version__
    from mlmtrain.config import MODEL_SIZES

    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["bert", "fill-mask", "mlmtrain"],
        mask_token="[MASK]",
        widget=[{"text": t} for t in widgets],
        base_model=base_model,
    )
    run = run_config.get("run") or {}
    init_from = base_model or (run.get("model") or {}).get("init_from")
    origin = f"continued from `{init_from}`" if init_from else "pretrained from scratch"
    data, mask, optim, train = (run.get(k) or {} for k in ("data", "mask", "optim", "train"))
    size = next(
        (name for name, dims in MODEL_SIZES.items() if all(getattr(config, k) == v for k, v in dims.items())), "custom"
    )
    valid_loss = state.get("valid_loss")
    loss_text = (
        "not measured" if valid_loss is None else f"{valid_loss:.4f} nats (perplexity {math.exp(valid_loss):.2f})"
    )
    tokens = state.get("real_tokens")
    if data_meta:
        train_split = data_meta.get("train") or {}
        inputs = ", ".join(_input_name(p) for p in data_meta.get("inputs") or []) or "not recorded"
        data_text = (
            f"{_count(train_split.get('sentences'))} sentences / {_count(train_split.get('tokens'))} tokens "
            f"from {inputs}, split into segments of at most {data_meta.get('max_seq_len')} tokens "
            f"([CLS] sentence [SEP])"
        )
    else:
        data_text = f"token shards in `{data['data_dir']}`" if data.get("data_dir") else "not recorded"
    lines = [
        f"# {title}",
        "",
        f"A BERT masked-language model (`BertForMaskedLM`, size `{size}`: {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads, vocabulary {config.vocab_size}) "
        f"{origin} with mlmtrain on single sentences: masked language "
        "modelling only, no next-sentence prediction.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'fill = pipeline("fill-mask", model="{title}")  # this folder, or the Hub repo id it was uploaded to',
        f"print(fill({widgets[0]!r}))",
        "```",
        "",
        "## Training",
        "",
        f"- Data: {data_text}.",
        f"- Steps: {step:,}" + (f", {tokens:,} real (non-padding) tokens seen" if tokens else "") + ".",
        f"- Masking: {mask.get('mask_prob', 0.15):.0%} of tokens selected"
        + (" (whole words)" if mask.get("whole_word") else "")
        + f", of those {mask.get('mask_frac', 0.8):.0%} [MASK], {mask.get('random_frac', 0.1):.0%} random.",
        *(
            [
                f"- Optimiser: AdamW, peak learning rate {optim['lr']}, {optim.get('schedule', 'linear')} decay; "
                f"{data.get('tokens_per_batch') or 'auto'} tokens per micro-batch x {optim.get('grad_accum', 1)} "
                f"micro-batches per step; precision {train.get('precision', 'auto')}."
            ]
            if "lr" in optim
            else []
        ),
        f"- Final validation MLM loss: {loss_text}.",
        "",
        "Command:",
        "",
        "```bash",
        _pretty_command(state.get("command")),
        "```",
        "",
        "## Limits",
        "",
        (
            f"Trained on segments of up to {data_meta['max_seq_len']} tokens; position embeddings past that (up "
            f"to {config.max_position_embeddings}) were never trained. "
            if data_meta
            else ""
        )
        + "Token type ids are all 0 (no sentence pairs were seen).",
        "",
        f"Exported by mlmtrain {__version__}.",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _input_name(entry) -> str:
    """A meta.json input as the card names it: a file's name, or a dataset's name and split."""
    if isinstance(entry, dict) and entry.get("dataset"):
        return f"{entry['dataset']} ({entry.get('split')})"
    return Path(str(entry.get("path", entry) if isinstance(entry, dict) else entry)).name


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _pretty_command(command: str | None) -> str:
    """The recorded command line, with the console script's install path shortened to `mlmtrain`."""
    if not command:
        return "not recorded"
    first, _, rest = command.partition(" ")
    return f"mlmtrain {rest}" if Path(first).name == "mlmtrain" else command


def read_data_meta(run_config: dict) -> dict | None:
    data_dir = ((run_config.get("run") or {}).get("data") or {}).get("data_dir")
    path = Path(data_dir) / "meta.json" if data_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
