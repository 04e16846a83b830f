"""Model forward+backward: ours (packed batch, varlen/SDPA attention, masked-only head) vs transformers'
BertForMaskedLM (sdpa attention, padded batches of the SAME sentences, full-vocab head as HF computes it).

Both sides process the same sentences with the same masked positions and backpropagate the MLM loss; no
optimizer step. Throughput counts REAL tokens only ([CLS], words, [SEP]; never [PAD]), so padding is the
baseline's cost, not its credit. TFLOP/s: `model_flops_per_token` on the real tokens, with each side's own
head work (ours: the masked share of tokens; HF: every real token), so the number says how fast each side
executes the FLOPs it must do. Its padded tokens are not counted for HF.

Sentence lengths: real shards (`--data DIR`, lengths from offsets, + [CLS]/[SEP]) or, by default, a
log-normal fitted to the bundled sample corpus tokenized with an 8000-token WordPiece vocab (median 26 tokens
incl. [CLS]/[SEP], log-sd 0.55), clipped to [3, max_seq_len].
Ours packs whole sentences into exactly `tokens_per_batch` tokens (the tail is [PAD] segments of at most
max_seq_len, as the trainer does); HF splits the same sentences, in the same order, into micro-batches of
`hf_batch_size` sentences padded to their longest (dynamic padding, like DataCollatorForLanguageModeling),
accumulating gradients over them: one timed call = the whole batch on each side.

Run: `python -m mlmtrain.benchmarks.bench_model --size base --tokens-per-batch 65536 --device cuda
--dtype bf16 --compile --out benchmarks/results/bench_model_cuda.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlmtrain.benchmarks.common import record, time_fn
from mlmtrain.config import default_precision, torch_dtype
from mlmtrain.flops import model_flops_per_token
from mlmtrain.model import BertConfig, BertForMaskedLM, mlm_loss_sum
from mlmtrain.provenance import environment
from mlmtrain.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID

LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA = 26.0, 0.55  # fitted to the sample corpus (see the docstring)
VARIANTS = ("ours", "ours-sdpa", "hf")


def sentence_lengths(tokens_per_batch: int, max_seq_len: int, seed: int, data: str | None = None) -> list[int]:
    """Lengths (with [CLS]/[SEP]) of whole sentences filling at most tokens_per_batch tokens."""
    rng = np.random.default_rng(seed)
    if data:
        from mlmtrain.prepare import load_split

        offsets = np.asarray(load_split(data, "train").offsets)
        pool = np.minimum(np.diff(offsets) + 2, max_seq_len)

        def draw(n):
            return pool[rng.integers(0, len(pool), n)]
    else:

        def draw(n):
            return np.clip(np.round(rng.lognormal(math.log(LOGNORMAL_MEDIAN), LOGNORMAL_SIGMA, n)), 3, max_seq_len)

    lengths = []
    total = 0
    while True:
        for n in draw(1024).astype(int).tolist():
            if total + n > tokens_per_batch:
                return lengths
            lengths.append(n)
            total += n


def packed_layout(lengths: list[int], tokens_per_batch: int, max_seq_len: int):
    """cu_seqlens (int32) and position ids of the sentences + a [PAD] tail split into <= max_seq_len segments."""
    tail = tokens_per_batch - sum(lengths)
    segments = lengths + [max_seq_len] * (tail // max_seq_len) + ([tail % max_seq_len] if tail % max_seq_len else [])
    cu_seqlens = torch.tensor([0] + np.cumsum(segments).tolist(), dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in segments])
    return cu_seqlens, position_ids


def make_inputs(lengths: list[int], tokens_per_batch: int, vocab_size: int, masked_per_sentence, gen):
    """Random sentences ([CLS] ids [SEP]) flat, their masked positions and labels (the same for both sides)."""
    real = sum(lengths)
    ids = torch.randint(NUM_SPECIAL, vocab_size, (tokens_per_batch,), generator=gen)
    ids[real:] = PAD_ID
    starts = np.cumsum([0] + lengths[:-1])
    ids[torch.as_tensor(starts)] = CLS_ID
    ids[torch.as_tensor(starts + np.asarray(lengths) - 1)] = SEP_ID
    masked = torch.as_tensor(np.concatenate([s + 1 + m for s, m in zip(starts, masked_per_sentence)]))
    labels = torch.randint(NUM_SPECIAL, vocab_size, masked.shape, generator=gen)
    return ids, masked.long(), labels


def run(
    size: str = "tiny",
    tokens_per_batch: int = 4096,
    device: str = "cpu",
    dtype: str = "fp32",
    repeats: int = 5,
    *,
    warmup: int = 2,
    data: str | None = None,
    vocab_size: int = 30000,
    max_seq_len: int = 128,
    mask_prob: float = 0.15,
    hf_batch_size: int = 256,
    variants=None,
    compile: bool = False,
    seed: int = 0,
) -> list[dict]:
    """One row per variant (see VARIANTS), via benchmarks.common.record; rows carry tokens/s and TFLOP/s."""
    device = torch.device(device)
    if variants is None:
        variants = VARIANTS if device.type == "cuda" else ("ours", "hf")
    if data:
        from mlmtrain.prepare import read_meta

        vocab_size = int(read_meta(data)["vocab_size"])
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    lengths = sentence_lengths(tokens_per_batch, max_seq_len, seed, data)
    real_tokens = sum(lengths)
    masked_per_sentence = [
        np.sort(rng.choice(n - 2, max(1, round(mask_prob * (n - 2))), replace=False)) for n in lengths
    ]  # same BERT-like share for both sides, never [CLS]/[SEP]
    cu_seqlens, position_ids = packed_layout(lengths, tokens_per_batch, max_seq_len)
    config = BertConfig.from_size(
        size,
        vocab_size,
        max_position_embeddings=max(512, max_seq_len),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).to(device)
    autocast = torch.autocast(device.type, dtype=torch_dtype(dtype), enabled=dtype != "fp32")
    num_masked = sum(len(m) for m in masked_per_sentence)
    common = dict(
        size=size,
        device=device.type,
        dtype=dtype,
        tokens_per_batch=tokens_per_batch,
        real_tokens=real_tokens,
        sentences=len(lengths),
        masked=num_masked,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        lengths="shards" if data else "lognormal",
        seed=seed,
    )

    def fresh():
        ids, masked, labels = make_inputs(lengths, tokens_per_batch, vocab_size, masked_per_sentence, gen)
        return ids.to(device), masked.to(device), labels.to(device)

    rows = []
    for variant in variants:
        model.zero_grad(set_to_none=True)
        if variant == "hf":
            rows.append(
                _run_hf(
                    model,
                    config,
                    lengths,
                    masked_per_sentence,
                    fresh,
                    autocast,
                    device,
                    hf_batch_size,
                    warmup,
                    repeats,
                    common,
                )
            )
            continue
        model.attn_impl = "sdpa" if variant == "ours-sdpa" else "auto"
        cu, pos = cu_seqlens.to(device), position_ids.to(device)

        def step(ids, masked, labels):
            with autocast:
                loss_sum, n = mlm_loss_sum(model(ids, pos, cu, max_seq_len, masked), labels)
            return loss_sum / n

        fn = torch.compile(step) if compile else step

        def fwd_bwd(batch):
            fn(*batch).backward()

        seconds = time_fn(
            fwd_bwd,
            device,
            warmup=warmup,
            repeats=repeats,
            setup=lambda: (model.zero_grad(set_to_none=True), fresh())[1],
        )
        flops = model_flops_per_token(config, lengths, head_fraction=num_masked / real_tokens) * real_tokens
        attn = "varlen" if (device.type == "cuda" and dtype != "fp32" and variant != "ours-sdpa") else "sdpa"
        rows.append(
            record(
                "model",
                variant,
                seconds,
                work={"tokens": real_tokens, "flops": flops},
                attention=attn,
                compiled=compile,
                padded_tokens=tokens_per_batch,
                **common,
            )
        )
    return rows


def _run_hf(
    model, config, lengths, masked_per_sentence, fresh, autocast, device, hf_batch_size, warmup, repeats, common
) -> dict:
    """transformers' BertForMaskedLM with our weights, padded micro-batches of the same sentences."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf_config = transformers.BertConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k != "architectures"}, attn_implementation="sdpa"
    )
    hf = transformers.BertForMaskedLM(hf_config).to(device)
    hf.load_state_dict(model.state_dict())
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    chunks = [range(i, min(i + hf_batch_size, len(lengths))) for i in range(0, len(lengths), hf_batch_size)]

    def padded(batch):
        """(ids, masked, labels) flat -> per chunk: (input_ids, attention_mask, labels) padded (B, L)."""
        ids, _, labels = batch
        out, k = [], 0
        for chunk in chunks:
            L = max(lengths[i] for i in chunk)
            input_ids = torch.full((len(chunk), L), PAD_ID, dtype=torch.long, device=device)
            mlm_labels = torch.full((len(chunk), L), -100, dtype=torch.long, device=device)
            for row, i in enumerate(chunk):
                input_ids[row, : lengths[i]] = ids[starts[i] : starts[i] + lengths[i]]
                m = torch.as_tensor(masked_per_sentence[i] + 1, device=device)
                mlm_labels[row, m] = labels[k : k + len(m)]
                k += len(m)
            mask = (
                torch.arange(L, device=device)[None] < torch.tensor([lengths[i] for i in chunk], device=device)[:, None]
            )
            out.append((input_ids, mask.long(), mlm_labels))
        return out

    total_masked = sum(len(m) for m in masked_per_sentence)

    def fwd_bwd(micro_batches):
        for input_ids, attention_mask, mlm_labels in micro_batches:
            with autocast:
                logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V): full head
            loss = (
                F.cross_entropy(logits.float().flatten(0, 1), mlm_labels.flatten(), ignore_index=-100, reduction="sum")
                / total_masked
            )  # the same loss as ours, summed over chunks
            loss.backward()

    seconds = time_fn(
        fwd_bwd,
        device,
        warmup=warmup,
        repeats=repeats,
        setup=lambda: (hf.zero_grad(set_to_none=True), padded(fresh()))[1],
    )
    padded_tokens = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    real = common["real_tokens"]
    flops = model_flops_per_token(config, lengths, head_fraction=1.0) * real
    return record(
        "model",
        "hf",
        seconds,
        work={"tokens": real, "flops": flops},
        attention="sdpa (padded)",
        compiled=False,
        padded_tokens=padded_tokens,
        hf_batch_size=hf_batch_size,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Model forward+backward: ours (packed) vs transformers (padded).")
    p.add_argument("--size", default="tiny", help="tiny | mini | small | base | large (default tiny)")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="packed batch size in tokens (default 4096)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="autocast precision (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    p.add_argument("--data", default=None, help="token shards: take sentence lengths and vocab size from them")
    p.add_argument("--vocab-size", type=int, default=30000, help="vocab size without --data (default 30000)")
    p.add_argument("--max-seq-len", type=int, default=128, help="sentence/segment cap (default 128)")
    p.add_argument("--hf-batch-size", type=int, default=256, help="sentences per HF padded micro-batch (default 256)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile our step (HF stays eager, as the blog post ran it)"
    )
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here")
    args = p.parse_args(argv)
    dtype = args.dtype or default_precision(torch.device(args.device).type)
    variants = args.variants.split(",") if args.variants else None
    rows = run(
        args.size,
        args.tokens_per_batch,
        args.device,
        dtype,
        args.repeats,
        warmup=args.warmup,
        data=args.data,
        vocab_size=args.vocab_size,
        max_seq_len=args.max_seq_len,
        hf_batch_size=args.hf_batch_size,
        variants=variants,
        compile=args.compile,
    )
    env = environment(torch.device(args.device))
    print(
        f"{env['device']}, torch {env['versions']['torch']}, {args.size}, {args.tokens_per_batch} tokens/batch, "
        f"{dtype}, {rows[0]['real_tokens']} real tokens in {rows[0]['sentences']} sentences"
    )
    hf_rate = next((r["tokens_per_s"]["median"] for r in rows if r["name"] == "hf"), None)
    for r in rows:
        rate, s = r["tokens_per_s"], r["seconds"]
        speedup = f"  {rate['median'] / hf_rate:.2f}x hf" if hf_rate else ""
        print(
            f"{r['name']:>18}: {rate['median']:>12,.0f} real tokens/s "
            f"(min {rate['min']:,.0f}, max {rate['max']:,.0f}), "
            f"{r['flops_per_s']['median'] / 1e12:.3f} TFLOP/s, median {s['median'] * 1e3:.1f} ms, "
            f"{r['padded_tokens']} tokens computed{speedup}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
