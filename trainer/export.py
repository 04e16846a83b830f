"""`mlmtrain export`: a checkpoint + its tokenizer -> a Hugging Face `BertForMaskedLM` folder, verified.

The seed saved with the HF Trainer and then hand-trimmed `tokenizer_config.json` and hand-wrote the model
card before the Hub widget worked. Here one command writes the folder transformers expects:

    model.safetensors        fp32 (or --dtype bf16|fp16), metadata {"format": "pt"}, transformers key names,
                             tied decoder weight/bias stored once, no position_ids buffer
    config.json              architectures ["BertForMaskedLM"], model_type bert, every field our model uses
    tokenizer.json, vocab.txt, tokenizer_config.json (clean: only what BertTokenizer reads), special_tokens_map.json
    README.md                the model card (huggingface_hub ModelCard): language, license, fill-mask widget,
                             training data, steps/tokens, final validation loss, the exact command
    mlmtrain_export.json     not uploaded: size + sha256 of every file above, run, step, verified

then (unless --no-verify) loads it back with transformers and checks: no missing/unexpected keys, logits equal
to our packed forward on a few sentences, the tokenizer splits text exactly like tokenizer.json, and
`pipeline("fill-mask")` answers every widget text. The folder is built in a temporary sibling and renamed,
so `--out` never holds half an export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

from mlmtrain.errors import UserError
from mlmtrain.files import sha256_file, write_json

EXPORT_MANIFEST = "mlmtrain_export.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_WIDGETS = {  # the seed's own widget sentence for Korean
    "ko": "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다.",
    "en": "The capital of France is [MASK].",
}
# What BertTokenizer (slow and fast, transformers 4.45-5.x) reads; anything else is dropped.
TOKENIZER_CONFIG_KEYS = (
    "tokenizer_class",
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
SPECIAL_TOKENS_MAP = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


# ---------------------------------------------------------------------------------------------------------
# the pieces of the folder


def tokenizer_config(tokenizer_dir: Path, max_position_embeddings: int) -> dict:
    """A clean tokenizer_config.json: the tokenizer folder's settings, only BertTokenizer's keys, and a
    model_max_length the model can actually take (never more than max_position_embeddings)."""
    source = {}
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        source = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    else:  # derive the normalizer flags from tokenizer.json
        norm = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            source = {
                "do_lower_case": norm.get("lowercase", False),
                "strip_accents": norm.get("strip_accents"),
                "tokenize_chinese_chars": norm.get("handle_chinese_chars", True),
            }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": False,
        "strip_accents": False,
        "tokenize_chinese_chars": True,
        "clean_up_tokenization_spaces": False,
    }
    config.update({k: v for k, v in source.items() if k in TOKENIZER_CONFIG_KEYS})
    config.update(SPECIAL_TOKENS_MAP)
    config["model_max_length"] = min(
        int(source.get("model_max_length") or max_position_embeddings), max_position_embeddings
    )
    return config


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
):
    """The README.md: YAML header the Hub reads (fill-mask widget) + what, on what, how long, how good."""
    from huggingface_hub import ModelCard, ModelCardData

    from mlmtrain import __version__
    from mlmtrain.model import MODEL_SIZES

    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["bert", "fill-mask", "mlmtrain"],
        mask_token="[MASK]",
        widget=[{"text": t} for t in widgets],
    )
    run = run_config.get("run") or {}
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
        inputs = (
            ", ".join(
                Path(str(p.get("path", p) if isinstance(p, dict) else p)).name for p in data_meta.get("inputs") or []
            )
            or "not recorded"
        )
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
        "pretrained from scratch with mlmtrain on single sentences: masked language "
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


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _pretty_command(command: str | None) -> str:
    """The recorded command line, with the console script's install path shortened to `mlmtrain`."""
    if not command:
        return "not recorded"
    first, _, rest = command.partition(" ")
    return f"mlmtrain {rest}" if Path(first).name == "mlmtrain" else command


def _read_data_meta(run_config: dict) -> dict | None:
    data_dir = ((run_config.get("run") or {}).get("data") or {}).get("data_dir")
    path = Path(data_dir) / "meta.json" if data_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None


# ---------------------------------------------------------------------------------------------------------
# export


def export_folder(
    checkpoint,
    tokenizer_dir,
    out_dir,
    *,
    language: str | None = None,
    license: str = "apache-2.0",
    widget_texts: list[str] | None = None,
    dtype: str = "fp32",
    verify: bool = True,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Write the export folder for `checkpoint` (a checkpoint folder or a run folder: its newest complete
    checkpoint) and return its `mlmtrain_export.json` content. Raises UserError on any user mistake, and when
    verification fails (the folder is then still written, with "verified": false, so it can be inspected)."""
    import torch
    from safetensors.torch import save_file

    from mlmtrain import __version__
    from mlmtrain.checkpoint import latest_checkpoint, load_checkpoint_model
    from mlmtrain.model import BertConfig, BertForMaskedLM
    from mlmtrain.preflight import check_tokenizer_fingerprint, check_vocab_match
    from mlmtrain.tokenizer import load_tokenizer, read_vocab, tokenizer_fingerprint

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    widgets = list(widget_texts or [DEFAULT_WIDGETS.get(language or "en", DEFAULT_WIDGETS["en"])])
    for text in widgets:
        if "[MASK]" not in text:
            raise UserError(f"widget text {text!r} has no [MASK]: the fill-mask widget needs one to fill.")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty: choose another --out or pass --overwrite.")

    # ---- inputs, checked before any work
    ckpt = latest_checkpoint(checkpoint, log=log)
    state_dict, run_config, state = load_checkpoint_model(ckpt)
    if "model" not in run_config:
        raise UserError(f'{ckpt / "config.json"} has no "model" section: it was not written by mlmtrain.')
    config = BertConfig.from_dict(run_config["model"])
    tokenizer_dir = Path(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # checks the files and the special-token ids
    check_vocab_match(config.vocab_size, len(read_vocab(tokenizer_dir)))
    check_tokenizer_fingerprint(state.get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer_dir))
    model = BertForMaskedLM(config)
    model.load_hf_state_dict(state_dict)  # UserError on missing/unexpected keys or wrong shapes
    step = int(state.get("step", 0))

    # ---- write into a temporary sibling, rename at the end
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.to(getattr(torch, DTYPES[dtype])).contiguous() for k, v in model.hf_state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    write_json(tmp / "config.json", {**config.to_hf_dict(), "torch_dtype": DTYPES[dtype]})
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(tokenizer_dir / name, tmp / name)
    write_json(tmp / "tokenizer_config.json", tokenizer_config(tokenizer_dir, config.max_position_embeddings))
    write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    card = model_card(
        title=out_dir.name,
        config=config,
        run_config=run_config,
        state=state,
        step=step,
        language=language,
        license=license,
        widgets=widgets,
        data_meta=_read_data_meta(run_config),
    )
    card.save(tmp / "README.md")

    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    manifest = {
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())},
        "run": str(run_dir) if run_dir else None,
        "checkpoint": str(ckpt),
        "step": step,
        "dtype": dtype,
        "verified": False,
        "mlmtrain_version": __version__,
    }
    failure = None
    if verify:
        try:
            manifest["verification"] = verify_export(tmp, widgets)
            manifest["verified"] = True
        except UserError as e:
            failure = e
            manifest["verification"] = {"error": str(e)}
    write_json(tmp / EXPORT_MANIFEST, manifest)
    try:  # the upload's structural check (files, sizes, shapes, card header), when that module is present
        from mlmtrain.hub import check_export_folder
    except ImportError:
        check_export_folder = None
    problems = check_export_folder(tmp) if check_export_folder else []

    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    os.replace(tmp, out_dir)
    if failure is not None:
        raise UserError(f"wrote {out_dir} but it failed verification: {failure}")
    if problems:
        raise UserError(f"wrote {out_dir} but it is incomplete: {'; '.join(problems)}")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# verification with transformers


def verify_export(folder, widget_texts: list[str], *, atol: float = 1e-4) -> dict:
    """Load `folder` with transformers and check it behaves as our model does. Returns a small report;
    raises UserError saying what differs. Comparison is in fp32 (a bf16/fp16 export is upcast on both sides,
    so the weights are identical and only the implementations differ)."""
    try:
        import transformers
    except ImportError:
        raise UserError("verification needs transformers: pip install -e '.[hf]', or pass --no-verify.") from None

    folder = Path(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # our checks say what matters; keep the output short
    transformers.logging.disable_progress_bar()
    try:
        return _verify(folder, list(widget_texts), atol)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _verify(folder: Path, widget_texts: list[str], atol: float) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from mlmtrain.model import BertConfig, BertForMaskedLM

    hf_model, info = AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
    hf_model = hf_model.float().eval()
    if type(hf_model).__name__ != "BertForMaskedLM":
        raise UserError(f"transformers loaded {type(hf_model).__name__}, not BertForMaskedLM.")
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"transformers reports key problems loading the export: {bad}.")

    # The tokenizer must split text exactly like tokenizer.json (which training used), with [CLS] ... [SEP].
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = list(widget_texts) + [" ".join(widget_texts)]
    cls_id, sep_id = hf_tok.cls_token_id, hf_tok.sep_token_id
    for text in texts:
        want = [cls_id] + raw_tok.encode(text, add_special_tokens=False).ids + [sep_id]
        got = hf_tok(text)["input_ids"]
        if got != want:
            raise UserError(
                f"AutoTokenizer splits {text!r} into {got} but tokenizer.json gives {want}: "
                "tokenizer_config.json does not match the tokenizer."
            )

    # Logits: our packed forward (the training path) vs BertForMaskedLM on the padded batch.
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    ours = BertForMaskedLM(config, attn_impl="sdpa").eval()
    ours.load_hf_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()  # (B, L)
    lengths = real.sum(1)  # (B,)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B+1,)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])  # (T,)
    input_ids = batch["input_ids"][real]  # (T,)
    with torch.no_grad():
        hf_logits = hf_model(**batch).logits[real]  # (T, V)
        our_logits = ours(
            input_ids, position_ids, cu_seqlens, int(lengths.max()), torch.arange(input_ids.numel())
        )  # (T, V)
    diff = (hf_logits - our_logits).abs()
    max_diff = float(diff.max())
    if not max_diff <= atol * max(1.0, float(hf_logits.abs().max())):
        raise UserError(
            f"transformers' logits differ from ours by up to {max_diff:.3g} (mean "
            f"{float(diff.mean()):.3g}) on {len(texts)} sentences."
        )

    # What the Hub widget runs.
    fill = pipeline("fill-mask", model=hf_model, tokenizer=hf_tok, device="cpu")
    answers = {}
    for text in widget_texts:
        result = fill(text, top_k=3)
        first = result[0] if result and isinstance(result[0], list) else result  # several [MASK]: a list per mask
        if not first or "token_str" not in first[0]:
            raise UserError(f"pipeline('fill-mask') gave no answer for {text!r}.")
        answers[text] = [r["token_str"] for r in first]
    return {
        "transformers": transformers.__version__,
        "max_abs_logit_diff": max_diff,
        "sentences": len(texts),
        "fill_mask": answers,
    }


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, or a run folder (its newest complete checkpoint is used)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer folder the model was trained with (default: the run's data.tokenizer_dir)",
    )
    p.add_argument("--out", required=True, help="the folder to write (must be new or empty, or pass --overwrite)")
    p.add_argument("--language", default=None, help="model card language code, e.g. ko (default: not stated)")
    p.add_argument("--license", default="apache-2.0", help="model card license identifier (default: apache-2.0)")
    p.add_argument(
        "--widget-text",
        action="append",
        default=None,
        metavar="TEXT",
        help="a fill-mask example with [MASK] for the Hub widget; repeat for several",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype in model.safetensors")
    p.add_argument("--no-verify", action="store_true", help="skip loading the folder back with transformers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def main(args) -> int:
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from mlmtrain.checkpoint import latest_checkpoint

        config_path = latest_checkpoint(args.checkpoint) / "config.json"
        run = json.loads(config_path.read_text(encoding="utf-8")).get("run") or {}
        tokenizer_dir = (run.get("data") or {}).get("tokenizer_dir")
        if not tokenizer_dir:
            raise UserError(f"{config_path} does not name the tokenizer: pass --tokenizer DIR.")
    manifest = export_folder(
        args.checkpoint,
        tokenizer_dir,
        args.out,
        language=args.language,
        license=args.license,
        widget_texts=args.widget_text,
        dtype=args.dtype,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
    size_mb = manifest["files"]["model.safetensors"]["size"] / 1e6
    print(f"exported step {manifest['step']} to {args.out} ({size_mb:.1f} MB weights, {args.dtype})")
    if manifest["verified"]:
        v = manifest["verification"]
        guesses = "; ".join(f"{t} -> {', '.join(a)}" for t, a in v["fill_mask"].items())
        print(
            f"verified with transformers {v['transformers']}: no missing/unexpected keys, logits match ours "
            f"(max abs diff {v['max_abs_logit_diff']:.2g}), fill-mask: {guesses}"
        )
    else:
        print("not verified (--no-verify); `mlmtrain upload` refuses unverified exports")
    return 0
