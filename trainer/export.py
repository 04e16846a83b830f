"""`mlmtrain export`: a checkpoint + its tokenizer -> a Hugging Face `BertForMaskedLM` folder, verified.

One command writes the folder transformers and the Hub expect, with nothing to trim or write by hand:

    model.safetensors        fp32 (or --dtype bf16|fp16), metadata {"format": "pt"}, transformers key names,
                             tied decoder weight/bias stored once, no position_ids buffer
    config.json              architectures ["BertForMaskedLM"], model_type bert, every field our model uses
    tokenizer.json, vocab.txt, tokenizer_config.json (clean: only what BertTokenizer reads), special_tokens_map.json
    README.md                the model card (huggingface_hub ModelCard): languages, license, fill-mask widget,
                             data statistics, steps/tokens, validation loss and accuracy next to the unigram
                             baseline, the tokenizer/prepare/train commands, and the user's --card-extra section
    mlmtrain_export.json     not uploaded: size + sha256 of every file above, run, step, verified

then (unless --no-verify) loads it back with transformers and checks: no missing/unexpected keys, logits equal
to our packed forward on a few sentences, the tokenizer splits text exactly like tokenizer.json, and
`pipeline("fill-mask")` answers every widget text. The folder is built in a temporary sibling and renamed,
so `--out` never holds half an export. Its files are readable by everyone the umask allows (safetensors alone
would write the weights 0600).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from mlmtrain.card import default_widget, fit_warnings, model_card, parse_languages, read_card_extra, read_data_meta
from mlmtrain.config import PRECISIONS, torch_dtype
from mlmtrain.errors import UserError, missing_extra, refuse_tokens, require
from mlmtrain.export_check import EXPORT_LAYOUT, EXPORT_MANIFEST, check_export_folder
from mlmtrain.files import atomic_dir, check_out_folder, file_mode, write_json
from mlmtrain.manifest import file_entries
from mlmtrain.pretrained import HUB_ID
from mlmtrain.tokenizer import SPECIAL_TOKENS_MAP
from mlmtrain.tokenizer_folder import (
    check_unchanged,
    read_tokenizer_config,
    read_tokenizer_record,
    read_vocab,
    vocab_bytes,
)

# Text whose split depends on every normalizer setting: case, accents (composed and combining), full-width and
# compatibility forms (NFKC), control and zero-width characters, whitespace, CJK ideographs, Hangul syllables and jamo
NORMALIZATION_PROBE = "Ünïcode e\u0301 ＡＢＣ ① ㄱㄴ \x07tab\tzero\u200bwidth\u00a0nbsp 漢字 한국어 Ⅻ ﬁ"

# The unigram baseline is counted from the shards at export when they hold at most this many tokens (about a
# second and a few hundred MB); larger corpora get a card that says it was not computed.
UNIGRAM_MAX_TOKENS = 20_000_000

# ---------------------------------------------------------------------------------------------------------
# export


def export_folder(
    checkpoint,
    tokenizer_dir,
    out_dir,
    *,
    language: str | list[str] | None = None,
    name: str | None = None,
    card_extra: str | Path | None = None,
    license: str = "apache-2.0",
    widget_texts: list[str] | None = None,
    dtype: str = "fp32",
    verify: bool = True,
    overwrite: bool = False,
    base_model: str | None = None,
) -> dict:
    """Write the export folder for `checkpoint` (a checkpoint folder or a run folder: its newest complete
    checkpoint) and return its `mlmtrain_export.json` content. `language`: codes (a list, or "ko,en"); `name`:
    the card's title, e.g. the Hub repo id it will be uploaded to; `card_extra`: a Markdown file appended to the
    card; `base_model`: the Hub id the run started from, for the card (default: the one the checkpoint records,
    when it started from a Hub id). Raises UserError on any user mistake, and when verification fails (a new
    folder is then still written, with "verified": false, so it can be inspected; an existing one is kept)."""
    from safetensors.torch import save_file

    from mlmtrain import __version__
    from mlmtrain.checkpoint import data_fingerprint, read_trained, run_folder_of

    if dtype not in PRECISIONS:
        raise UserError(f"--dtype must be one of {', '.join(PRECISIONS)}, not {dtype!r}.")
    refuse_tokens(name=name, language=language, widget_text=widget_texts, license=license, base_model=base_model)
    if base_model is not None and not HUB_ID.fullmatch(base_model):
        raise UserError(f"--base-model takes a Hub model id like klue/bert-base, got {base_model!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise UserError(f"--license takes a license identifier like apache-2.0, mit or other, got {license!r}")
    languages = parse_languages(language)
    extra = read_card_extra(card_extra) if card_extra else None
    refuse_tokens(card_extra=extra)
    widgets = list(widget_texts or [])  # none given: the default, once the tokenizer is known (below)
    for text in widgets:
        if "[MASK]" not in text:
            raise UserError(f"widget text {text!r} has no [MASK]: the fill-mask widget needs one to fill.")
    out_dir = Path(out_dir)
    if verify:  # before anything is written: a refusal after it would leave a folder the retry must --overwrite
        require("transformers", "verification", "transformers", "hf", ", or pass --no-verify")
    check_out_folder(out_dir, EXPORT_LAYOUT, replace=overwrite)

    # ---- inputs, checked before any work
    trained = read_trained(checkpoint, tokenizer_dir)
    ckpt, model, state, tokenizer_dir = trained.ckpt, trained.model, trained.state, trained.tokenizer_dir
    run_config, config = trained.run_config, trained.model.config
    made_with = trained.tokenizer_fingerprint  # before the tokenizer was read: taken again before the export is kept
    if base_model and not (
        state.get("init_from") or ((run_config.get("run") or {}).get("model") or {}).get("init_from")
    ):
        raise UserError(
            f"--base-model names the model a run continued from, and checkpoint {ckpt} was pretrained from scratch "
            "(its run had no --init-from): drop --base-model"
        )
    step = int(state.get("step", 0))
    vocab = read_vocab(tokenizer_dir)
    widgets = widgets or [default_widget(languages, vocab)]

    # ---- write into a temporary sibling, rename at the end
    run_dir = run_folder_of(ckpt)
    data_meta = read_data_meta(run_config)
    if data_meta is not None and state.get("data_fingerprint") not in (None, data_fingerprint(data_meta)):
        print(f"note: the run's token shards ({run_config['run']['data']['data_dir']}) changed after it trained "
              "(another `prepare` wrote them): the card leaves out their settings, statistics and unigram baseline",
              file=sys.stderr)  # fmt: skip
        data_meta = None  # a card describes the data the weights saw, or none
    warnings = fit_warnings(vocab, data_meta)
    for warning in warnings:  # in the card's Limits too
        print(f"note: {warning}", file=sys.stderr)
    card = model_card(
        title=name,
        config=config,
        run_config=run_config,
        state=state,
        step=step,
        language=languages,
        license=license,
        widgets=widgets,
        data_meta=data_meta,
        tokenizer_record=read_tokenizer_record(tokenizer_dir),
        unigram=unigram_baseline(run_config, data_meta),
        extra=extra,
        base_model=base_model or state.get("base_model"),
        warnings=warnings,
    )
    tok_config = read_tokenizer_config(tokenizer_dir)
    tok_config["model_max_length"] = min(
        tok_config["model_max_length"] or config.max_position_embeddings, config.max_position_embeddings
    )
    failure, problems = None, []
    replacing = Path(out_dir).is_dir() and any(Path(out_dir).iterdir())
    with atomic_dir(out_dir, replace=overwrite, layout=EXPORT_LAYOUT) as tmp:
        weights = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in model.hf_state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        # `dtype`: transformers >= 4.56 reads it (5.x calls `torch_dtype` deprecated); older versions ignore it and
        # take the dtype from the weights under dtype="auto"
        write_json(tmp / "config.json", {**config.to_hf_dict(), "dtype": PRECISIONS[dtype]})
        shutil.copyfile(tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "vocab.txt").write_bytes(vocab_bytes(tokenizer_dir))  # a transformers 5 folder has none: made
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
        card.save(tmp / "README.md")
        mode = file_mode()
        for path in tmp.iterdir():
            os.chmod(path, mode)
        manifest = {
            "files": file_entries(tmp),
            "run": str(run_dir) if run_dir else None,
            "checkpoint": str(ckpt),
            "step": step,
            "dtype": dtype,
            "name": name,
            "verified": False,
            "mlmtrain_version": __version__,
        }
        if verify:
            try:
                manifest["verification"] = verify_export(tmp, widgets)
                manifest["verified"] = True
            except UserError as e:
                failure = e
                manifest["verification"] = {"error": str(e)}
        write_json(tmp / EXPORT_MANIFEST, manifest)
        os.chmod(tmp / EXPORT_MANIFEST, mode)
        problems = check_export_folder(tmp)  # what the upload checks: files, sizes, shapes, card header
        check_unchanged(tokenizer_dir, made_with, "export")
        if replacing and (failure is not None or problems):  # a failed export never replaces a good one
            why = f"it failed verification: {str(failure).rstrip('.')}" if failure is not None else "; ".join(problems)
            raise UserError(f"the new export of {out_dir} was not written: {why}; the previous {out_dir} is unchanged")
    if failure is not None:
        raise UserError(f"wrote {out_dir} but it failed verification: {failure}")
    if problems:
        raise UserError(f"wrote {out_dir} but it is incomplete: {'; '.join(problems)}")
    return manifest


def unigram_baseline(run_config: dict, data_meta: dict | None) -> tuple[float | None, str]:
    """(loss, how it was measured) of a unigram model fitted on the run's train shard, on its validation shard;
    (None, why not) when the shards are not here, have no validation split or are too large to count here."""
    import numpy as np

    from mlmtrain.evaluate import unigram_cross_entropy
    from mlmtrain.prepare import load_split, read_meta, shard_specials

    if not data_meta:
        return None, "not computed: the run's token shards were not found, or had changed, at export"
    n_train, n_valid = (int((data_meta.get(s) or {}).get("tokens") or 0) for s in ("train", "valid"))
    if not n_valid:
        return None, "not computed: the validation split is empty"
    if n_train + n_valid > UNIGRAM_MAX_TOKENS:
        return (
            None,
            f"not computed at export: the shards hold {n_train + n_valid:,} tokens (export counts up to "
            f"{UNIGRAM_MAX_TOKENS:,})",
        )
    data_dir = run_config["run"]["data"]["data_dir"]
    try:
        meta = read_meta(data_dir)  # checked, as load_split reads it: vocab_size and the specials are there
        train, valid = (np.asarray(load_split(data_dir, s).tokens) for s in ("train", "valid"))
        loss = unigram_cross_entropy(train, valid, meta["vocab_size"], shard_specials(meta))
    except (UserError, OSError, ValueError) as e:
        return None, f"not computed: the shards could not be read ({e})"
    return loss, "fitted on the train split, scored on the validation split's maskable tokens"


# ---------------------------------------------------------------------------------------------------------
# verification with transformers


def verify_export(folder, widget_texts: list[str], *, atol: float = 1e-4) -> dict:
    """Load `folder` with transformers and check it behaves as our model does. Returns a small report;
    raises UserError saying what differs. Comparison is in fp32 (a bf16/fp16 export is upcast on both sides,
    so the weights are identical and only the implementations differ)."""
    try:
        import transformers
    except ImportError:
        raise missing_extra("verification", "transformers", "hf", ", or pass --no-verify") from None

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    folder = Path(folder)
    verbosity = transformers.logging.get_verbosity()
    bars_on, hub_bars_off = transformers.logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    transformers.logging.set_verbosity_error()  # our checks say what matters; keep the output short
    transformers.logging.disable_progress_bar()
    # transformers' loading imports an installed torchao (the fp8 extra), whose import logs warnings that say
    # nothing about the export (optional extensions it could not load, deprecations): errors still show
    others = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in others]
    for logger in others:
        logger.setLevel(logging.ERROR)
    try:
        return _verify(folder, list(widget_texts), atol)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars_on:  # as they were: the upload's bars stay off where it turned them off (a log, --quiet)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # huggingface_hub's note that HF_HUB_DISABLE_PROGRESS_BARS wins
                transformers.logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()
        for logger, level in zip(others, levels):
            logger.setLevel(level)


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
    for text in [*texts, NORMALIZATION_PROBE]:
        want = [cls_id] + raw_tok.encode(text, add_special_tokens=False).ids + [sep_id]
        got = hf_tok(text)["input_ids"]
        if got != want:
            raise UserError(
                f"AutoTokenizer splits {text!r} into {got} but tokenizer.json gives {want}: "
                "transformers reads the exported tokenizer unlike the one the model was trained with."
            )

    # Logits: our packed forward (the training path) vs BertForMaskedLM on the padded batch.
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")), str(folder))
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


def main(args) -> int:
    manifest = export_folder(
        args.checkpoint,
        args.tokenizer,
        args.out,
        language=args.language,
        name=args.name,
        card_extra=args.card_extra,
        license=args.license,
        widget_texts=args.widget_text,
        dtype=args.dtype,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        base_model=args.base_model,
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
    if not (args.name and "/" in args.name):  # the card's usage snippet (card.model_card) has no repo to name
        print("note: the model card's usage example loads PATH_OR_REPO_ID: export with --name OWNER/REPO, the repo "
              "you will upload to, to name it there", file=sys.stderr)  # fmt: skip
    return 0
