"""Scoring masked-language models on fixed masks: the validation numbers of `mlmtrain train` and the command
`mlmtrain eval` are one code path, so a loss from either means the same thing.

- `masker`: `mlm_mask` with every setting but the per-call key (step, offset), from the shards' special-token
  layout; the training loop masks with it too.
- `score`: per batch, one mask (keyed by EVAL_KEY + the batch's index, so fixed for a given seed, data and
  batch size), then every model on that masked batch. Two models compared with `--compare` are scored on
  identical positions by construction; a digest of the masked positions and labels lets separate runs show
  they masked alike.
- The unigram baseline: the loss on the same targets of a model that knows only token frequencies (add-one
  smoothing over the maskable ids), fitted on the train split when there is one.
- `mlmtrain eval`: a checkpoint, a run folder, an export folder, a transformers BERT folder or a Hub id, on
  token shards or a corpus (tokenized into a temporary folder exactly as `prepare` does).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlmtrain.corpus_check import corpus_from_args
from mlmtrain.errors import UserError
from mlmtrain.export_check import EXPORT_MANIFEST, read_manifest
from mlmtrain.files import json_text
from mlmtrain.kernels.mlm_mask import IGNORE_INDEX, max_masked_bound, mlm_mask
from mlmtrain.model import BertForMaskedLM, mlm_loss_sum
from mlmtrain.text import LINE_PROBLEMS

EVAL_KEY = 1 << 40  # masking keys of eval batches live far from the training micro-batch indices


def masker(specials, vocab_size: int, mask_spec, seed: int, max_masked: int, device, word_start=None):
    """`mlm_mask` with every setting but the per-call (step, offset) key. Ids 0..num_leading-1 are excluded by
    the kernel's `num_special`; a never-mask table is passed only for blocked ids past those (Google's layout
    with [unused*] rows after the first real token, extra specials), so the 0-4 layout masks exactly as a
    vocabulary with `num_special=5` and no table always has."""
    blocked = [i for i in specials.never_mask_ids() if i < vocab_size]
    table = None
    if blocked:
        table = torch.zeros(vocab_size, dtype=torch.bool)
        table[blocked] = True
        table = table.to(device)
    return functools.partial(
        mlm_mask,
        vocab_size=vocab_size,
        mask_id=specials.mask,
        num_special=specials.num_leading,
        never_mask=table,
        mask_prob=mask_spec.mask_prob,
        mask_frac=mask_spec.mask_frac,
        random_frac=mask_spec.random_frac,
        max_masked=max_masked,
        word_start=word_start,
        # Triton on CUDA; on CPU the torch path, bit-identical to the kernel and far faster than the interpreter
        backend="auto" if torch.device(device).type == "cuda" else "torch",
        seed=seed,
    )


def perplexity(loss: float | None) -> float | None:
    """exp(loss); infinite past what a float holds (JSON: null), NaN for NaN, None for no score."""
    if loss is None or math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def score(models, batches, mask, device, autocast, max_seqlen: int | None, unigram_logp=None, digest=False):
    """MLM loss, masked-token accuracy, perplexity and target count of each model over `batches` (host
    PackedBatches), every model on the same masked batch. `max_seqlen` None: each batch's longest segment.
    `unigram_logp` (V,) float64 log-probabilities: adds the unigram model's loss on the same targets. `digest`:
    adds a sha256 of the masked positions and labels (one host copy per batch)."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    zeros = functools.partial(torch.zeros, (), device=device)
    loss_sums = [zeros(dtype=torch.float64) for _ in models]
    correct = [zeros(dtype=torch.int64) for _ in models]
    targets = zeros(dtype=torch.int64)
    unigram_sum = zeros(dtype=torch.float64)
    logp = None if unigram_logp is None else torch.as_tensor(unigram_logp, dtype=torch.float64, device=device)
    sha, count = hashlib.sha256(), 0
    for i, host_batch in enumerate(batches):
        count = i + 1
        b = host_batch.to(device)
        m = mask(b.input_ids, step=EVAL_KEY + i)
        seqlen = host_batch.max_segment_len if max_seqlen is None else max_seqlen
        real = m.masked_labels != IGNORE_INDEX
        for j, model in enumerate(models):
            with autocast:
                logits = model(m.masked_ids, b.position_ids, b.cu_seqlens, seqlen, m.masked_positions, b.segment_ids)
            s, n = mlm_loss_sum(logits, m.masked_labels)
            loss_sums[j] += s.double()
            correct[j] += ((logits.argmax(-1) == m.masked_labels) & real).sum()
        targets += real.sum()
        if logp is not None:
            unigram_sum -= torch.where(real, logp[m.masked_labels.clamp(min=0)], 0.0).sum()
        if digest:  # sync: a host copy per batch, only when asked
            sha.update(m.masked_positions.cpu().numpy().tobytes() + m.masked_labels.cpu().numpy().tobytes())
    for model, mode in zip(models, was_training):
        model.train(mode)
    totals = torch.stack([targets.double(), unigram_sum, *loss_sums, *[c.double() for c in correct]])
    totals = totals.tolist()  # sync: once per evaluation
    n, unigram, rest = totals[0], totals[1], totals[2:]
    mean = (lambda x: x / n) if n else (lambda x: None)  # nothing masked: no score, not a perfect one
    results = []
    for j in range(len(models)):
        loss = mean(rest[j])
        results.append(
            {
                "loss": loss,
                "accuracy": mean(rest[len(models) + j]),
                "ppl": perplexity(loss),
                "targets": int(n),
                "batches": count,
                **({"unigram_loss": mean(unigram)} if logp is not None else {}),
                **({"mask_sha256": sha.hexdigest()} if digest else {}),
            }
        )
    return results


# ---------------------------------------------------------------------------------------------------- unigram


def unigram_log_probs(tokens: np.ndarray, size: int, blocked: np.ndarray) -> np.ndarray:
    """(size,) float64 log-probabilities of a unigram model fitted on `tokens`: counts plus one (so an id unseen
    there still gets a probability) over the ids not `blocked`; blocked ids get -inf."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=size)[:size].astype(np.float64)
    allowed = counts[~blocked] + 1.0
    logp = np.full(size, -np.inf)
    logp[~blocked] = np.log(allowed / allowed.sum())
    return logp


def unigram_entropy(tokens: np.ndarray, vocab_size: int, specials) -> float:
    """Entropy in nats of the distribution of the tokens the masker could select (`never_masked` left out, as in
    `unigram_cross_entropy`)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts = counts[~never_masked(specials, vocab_size)].astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def never_masked(specials, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the ids the masker never selects as targets (`specials.never_mask`), so no unigram model
    gives them probability."""
    blocked = np.zeros(vocab_size, dtype=bool)
    for first, last in specials.never_mask:
        blocked[first : last + 1] = True
    return blocked


def unigram_cross_entropy(train: np.ndarray, valid: np.ndarray, vocab_size: int, specials) -> float:
    """Loss in nats of a unigram model fitted on the train tokens (add-one smoothing over the vocabulary, so valid
    tokens unseen in train get a probability) on the valid tokens the masker could select: what an MLM that learned
    only token frequencies would score on the validation split. The fair baseline for the validation MLM loss; the
    card, the demo and `mlmtrain eval` (which scores it on the masked targets themselves) all use this model."""
    blocked = never_masked(specials, vocab_size)
    logp = unigram_log_probs(train, vocab_size, blocked)
    counts = np.bincount(np.asarray(valid, dtype=np.int64), minlength=vocab_size)[:vocab_size][~blocked]
    return float(-(counts * logp[~blocked]).sum() / counts.sum())


# ---------------------------------------------------------------------------------------------------- models


def load_model(source: str, tokenizer_dir=None):
    """(model in fp32, its tokenizer folder, a description) for a run folder, a checkpoint folder, an export
    folder, a transformers BERT folder or a Hub id."""
    from mlmtrain.checkpoint import CHECKPOINTS, MANIFEST, read_trained
    from mlmtrain.pretrained import check_own_tokens, locate, read_pretrained
    from mlmtrain.tokenizer_folder import read_vocab, transformers_casing_problem

    path = Path(source).expanduser()
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / CHECKPOINTS).is_dir()):
        trained = read_trained(path, tokenizer_dir)
        model, tokenizer_dir, state = trained.model, trained.tokenizer_dir, trained.state
        info = {"model": str(source), "kind": "checkpoint", "checkpoint": str(trained.ckpt), "step": state.get("step")}
        run = trained.run_config.get("run") or {}
        info["layout"] = (run.get("data") or {}).get("layout", "flat")  # how it validated
        info["pack"] = (run.get("data") or {}).get("pack", "sentence")
    else:
        folder = locate(source, "--model")
        pretrained = read_pretrained(folder)
        if pretrained.initialised:
            raise UserError(f"{folder} has no MLM head ({pretrained.initialised[0]}, ...): there is nothing to score.")
        if tokenizer_dir:  # scored on another tokenizer's ids only if they are the same tokens
            check_own_tokens(folder, read_vocab(tokenizer_dir))
        tokenizer_dir = tokenizer_dir or folder
        problem = transformers_casing_problem(tokenizer_dir, folder)  # scored on text split as in its pretraining
        if problem:
            raise UserError(problem)
        kind = "export" if (folder / EXPORT_MANIFEST).is_file() else "transformers"
        info = {"model": str(source), "kind": kind, "folder": str(folder), "step": _export_step(folder)}
        model = BertForMaskedLM(pretrained.config)
        model.load_hf_state_dict(pretrained.weights)
    return model, Path(tokenizer_dir), info


def _export_step(folder: Path) -> int | None:
    """The training step an export's manifest names; None for a folder mlmtrain did not export."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        step = read_manifest(folder).get("step")
        return step if isinstance(step, int) else None
    return None


# ---------------------------------------------------------------------------------------------------- CLI


def main(args) -> int:
    from mlmtrain.config import MAX_TOKENS_PER_BATCH, MaskSpec, check_device_name, check_rows_fit, check_seed
    from mlmtrain.packing import Packer, RowPacker, check_ids
    from mlmtrain.preflight import check_data_against_model, check_device
    from mlmtrain.prepare import check_tokenizer_match, data_notes, load_split, prepare, read_meta, shard_specials
    from mlmtrain.tokenizer_folder import tokenizer_fingerprint

    has_corpus = bool(args.input or args.dataset)
    if args.data is not None and has_corpus:
        raise UserError("pass --data SHARDS or a corpus (--input FILE ... or --dataset NAME), not both.")
    if args.data is None and not has_corpus:
        raise UserError("pass what to score on: --data SHARDS, or a corpus (--input FILE ... or --dataset NAME).")
    corpus = corpus_from_args(args)
    if not 8 <= args.tokens_per_batch <= MAX_TOKENS_PER_BATCH:
        raise UserError(f"--tokens-per-batch must be from 8 to {MAX_TOKENS_PER_BATCH:,}, got {args.tokens_per_batch}.")
    if args.max_batches < 0:
        raise UserError(f"--max-batches must be 0 (all) or more, got {args.max_batches}.")
    if not 0 < args.mask_prob < 1:
        raise UserError(f"--mask-prob must be above 0 and below 1, got {args.mask_prob}.")
    check_seed("--seed", args.seed)
    check_device_name("--device", args.device)
    check_device(args.device, torch.cuda.device_count() if torch.cuda.is_available() else 0, "--device", "--device cpu")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer_dir, info = load_model(args.model, args.tokenizer)
    models, infos = [model], [info]
    if args.compare:
        other, other_tokenizer, other_info = load_model(args.compare, args.tokenizer)
        if tokenizer_fingerprint(other_tokenizer) != tokenizer_fingerprint(tokenizer_dir):
            raise UserError(
                f"{args.model} and {args.compare} use different tokenizers: the same text would be other tokens, "
                "so their losses are not comparable."
            )
        models.append(other)
        infos.append(other_info)
    run_layouts = [i.pop("layout") for i in infos if "layout" in i]  # the first model's run decides auto
    layout = args.layout if args.layout != "auto" else (run_layouts or ["flat"])[0]
    run_packs = [i.pop("pack") for i in infos if "pack" in i]
    pack = args.pack if args.pack != "auto" else (run_packs or ["sentence"])[0]

    positions = min(m.config.max_position_embeddings for m in models)
    if corpus is not None and args.max_seq_len > positions:  # eval's own flag cuts the text: it is the fix
        raise UserError(
            f"--max-seq-len {args.max_seq_len} is longer than the model's {positions} learned positions: pass "
            f"--max-seq-len {positions} or less."
        )
    with tempfile.TemporaryDirectory(prefix="mlmtrain_eval_") as tmp:
        if corpus is not None:  # tokenized exactly as `prepare` would, all into one split
            data_dir, split = Path(tmp) / "data", "train"
            prepare(corpus, tokenizer_dir, data_dir, valid_fraction=0.0, max_seq_len=args.max_seq_len, progress=False)
        else:
            data_dir, split = Path(args.data), args.data_split
        meta = read_meta(data_dir)
        problems = {**meta["line_problems"], **meta["row_problems"]} if corpus is not None else {}
        for note in data_notes(meta) if corpus is not None else []:  # the text's problems, said as prepare says them
            print(f"note: {note}", file=sys.stderr)
        not_scored = {k: n for k, n in problems.items() if n and LINE_PROBLEMS.get(k, ("skipped",))[0] == "skipped"}
        check_tokenizer_match(meta["tokenizer_fingerprint"], tokenizer_dir, f"the data folder {data_dir}")
        max_seq_len = int(meta["max_seq_len"])
        for m in models:
            check_data_against_model(meta, m.config, max_seq_len, fixed=True)
        shard = load_split(data_dir, split)
        if shard.num_sentences == 0:
            raise UserError(f"the {split} split of {data_dir} is empty: pass --data-split train.")
        specials = shard_specials(meta)
        vocab_size = int(meta["vocab_size"])
        T = max(args.tokens_per_batch, max_seq_len)
        if T != args.tokens_per_batch:  # a batch holds at least one whole segment
            print(f"note: --tokens-per-batch {args.tokens_per_batch} is below the shards' max_seq_len: batches of {T} "
                  "tokens", file=sys.stderr)  # fmt: skip
        if layout == "rows":
            check_rows_fit(T, max_seq_len, "--tokens-per-batch")
        packer = (RowPacker if layout == "rows" else Packer)(shard, T, max_seq_len, args.seed, pack, loop=False,
                                                             static_shapes=False, specials=specials)  # fmt: skip
        batches = (
            check_ids(b, vocab_size, data_dir) for _, b in zip(range(args.max_batches or sys.maxsize), packer.batches())
        )
        fit_split = "train" if split == "valid" and meta["train"]["sentences"] else split
        logp = unigram_log_probs(load_split(data_dir, fit_split).tokens, vocab_size, never_masked(specials, vocab_size))
        mask = masker(specials, vocab_size, MaskSpec(mask_prob=args.mask_prob), args.seed,
                      max_masked_bound(T, args.mask_prob), device)  # fmt: skip
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        results = score([m.to(device) for m in models], batches, mask, device, autocast, None, logp, digest=True)

    if corpus is not None:
        source = "corpus " + ", ".join(d.get("path") or d.get("dataset") for d in corpus.describe())
    else:
        source = f"{split} split of {data_dir}"
    report = {
        "schema": "mlmtrain.eval/1",  # a change of any key's meaning changes it
        "data": source,
        "batches": results[0]["batches"],
        "targets": results[0]["targets"],
        "seed": args.seed,
        "layout": layout,
        "pack": pack,
        "mask_prob": args.mask_prob,
        "precision": args.precision,
        "unigram_loss": results[0]["unigram_loss"],
        "unigram_fit": f"{fit_split} split" if corpus is None else "the scored text itself (in-sample)",
        "mask_sha256": results[0]["mask_sha256"],
        **({"skipped": not_scored} if corpus is not None else {}),  # lines and rows of --input not scored, by reason
        "models": [{**i, **{k: r[k] for k in ("loss", "ppl", "accuracy")}} for i, r in zip(infos, results)],
    }
    if report["targets"] == 0:
        raise UserError(
            f"no token was masked in the {report['batches']} batch(es) of {source}: too little text to score "
            "(give more, or another --seed)."
        )
    if args.json:
        print(json_text(report, indent=2, ensure_ascii=False))
        return 0
    batches = f"{report['batches']} batch{'es' if report['batches'] != 1 else ''}"
    print(f"{report['targets']:,} masked tokens in {batches} of {source} (seed {args.seed}, "
          f"{args.mask_prob:.0%} masked, {args.precision})")  # fmt: skip
    names = [m["model"] + (f" (step {m['step']})" if m.get("step") is not None else "") for m in report["models"]]
    unigram = f"unigram ({report['unigram_fit']})"
    width = max(map(len, [*names, unigram]))  # every row's columns line up
    print(f"{'model':<{width}} {'loss':>8} {'ppl':>10} {'accuracy':>9}")
    for name, m in zip(names, report["models"]):
        print(f"{name:<{width}} {m['loss']:>8.4f} {m['ppl']:>10.2f} {m['accuracy']:>9.4f}")
    uni = report["unigram_loss"]
    print(f"{unigram:<{width}} {uni:>8.4f} {perplexity(uni):>10.2f}")
    return 0
