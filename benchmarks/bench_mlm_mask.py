"""MLM masking throughput: the fused Triton kernel vs its torch reference vs transformers'
DataCollatorForLanguageModeling, and the device's copy bandwidth measured in the same run.

What each row times (one call = one batch of T tokens, 15% masking, 80/10/10):
- `triton` / `triton whole-word`: `mlm_mask(ids, backend="triton")` on the device: 2 kernels + a cumsum,
  every output ([T] masked ids, compacted [max_masked] positions and labels). On a CPU the
  kernel runs in Triton's interpreter: a correctness path, timed only at the smallest size, not a speed claim.
- `torch reference` (/ `whole-word`): `mlm_mask(ids, backend="torch")`, the same function in torch ops; the
  fallback where Triton cannot run, and on a CPU the path the trainer takes.
- `hf collator`: `DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)` called as users run
  it: a list of per-sentence examples (`input_ids`, `token_type_ids`, `attention_mask` lists, sentences of
  8..64 tokens with [CLS]/[SEP]) -> padded [B, L] tensors with masked ids and labels, on the CPU (its only
  path). Its tokens are real (unpadded) tokens, the same T. Run up to 1M tokens by default (--hf-max-tokens).
- `copy`: `dst.copy_(src)` on the device moving the same number of bytes (read + write).

Bytes: every masking row is credited with the same logical bytes, the minimum any masking that produces
these outputs must move (int32 ids): read T*4, write T*4 masked ids + max_masked*(8 + 8) positions and
labels (until 2026-12-01 the kernel also wrote T*4 dense labels, and the bytes counted them). The kernel's
own traffic also re-reads the ids once (`bytes_moved`); its fraction of copy bandwidth is computed on these
logical bytes.

Timing: `benchmarks/common.time_fn` (warm-up, device events on CUDA, medians with min/max), fresh ids and
a new `step` key every repeat. Run: `python -m mlmtrain.benchmarks.bench_mlm_mask [--device cuda] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from mlmtrain.benchmarks.common import description, kernel_bench_device, print_and_save, record, time_fn
from mlmtrain.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, SEP_ID

VOCAB_SIZE = 30000  # the blog post's vocabulary size
CONTINUATION_FROM = 20000  # ids >= this are `##` pieces in the whole-word rows (~1/3 of random ids)
GPU_SIZES = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)  # 64k .. 16M tokens
CPU_SIZES = (1 << 16, 1 << 18, 1 << 20)  # capped at 1M on 2 cores so the run takes minutes
INTERPRETER_MAX_TOKENS = 1 << 16  # the Triton interpreter takes seconds per 64k-token call
HF_MAX_TOKENS = 1 << 20  # the HF collator takes ~5 s per 1M-token call here; beyond, it would dominate the run


def logical_bytes(num_tokens: int, max_masked: int) -> int:
    """Read T int32 ids; write T int32 masked ids + max_masked int64 positions + labels."""
    return num_tokens * (4 + 4) + max_masked * (8 + 8)


def _hf_collator_and_examples(num_tokens: int, seed: int = 0):
    """A WordPiece tokenizer over a synthetic 30000-id vocabulary (offline) and per-sentence examples
    holding `num_tokens` tokens in all, as `tokenizer(line)` would return them."""
    import tokenizers
    import transformers

    transformers.logging.set_verbosity_error()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"w{i}" for i in range(NUM_SPECIAL, CONTINUATION_FROM)]
    vocab += [f"##w{i}" for i in range(CONTINUATION_FROM, VOCAB_SIZE)]
    model = tokenizers.models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    rng = random.Random(seed)
    examples, total = [], 0
    while total < num_tokens:
        n = min(rng.randint(8, 64), num_tokens - total)
        ids = [CLS_ID] + [rng.randrange(NUM_SPECIAL, VOCAB_SIZE) for _ in range(max(n - 2, 0))] + [SEP_ID]
        ids = ids[:n]
        examples.append({"input_ids": ids, "token_type_ids": [0] * n, "attention_mask": [1] * n})
        total += n
    return collator, examples


def add_graph_row(add, mask_fn, fresh_ids, device, repeats, work, rows) -> None:
    """The kernel's device time alone: the same call captured in a CUDA graph and replayed, so the
    wrapper's Python work and launch latency (~0.2 ms, which a training step hides because the host runs
    ahead of the device) are not in the number. Fresh ids are copied into the captured input outside the
    timed region; the key is fixed by the capture."""
    static_ids, _ = fresh_ids()
    try:
        mask_fn((static_ids, 1))  # compile outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask_fn((static_ids, 1))
    except Exception as e:  # say why instead of dropping the row
        print(f"CUDA-graph capture of the masking call failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return
    seconds = time_fn(lambda _: graph.replay(), device, repeats=repeats, setup=lambda: static_ids.copy_(fresh_ids()[0]))
    copy = next(r for r in reversed(rows) if r["name"] == "copy")
    add(
        "triton (CUDA graph, device time)",
        seconds,
        path="triton-graph",
        whole_word=False,
        fraction_of_copy=work["bytes"] / seconds["median"] / copy["bytes_per_s"]["median"],
    )


def run(
    sizes=None,
    device: str | torch.device | None = None,
    repeats: int = 10,
    *,
    hf_max_tokens: int | None = None,
    whole_word: bool = True,
    table=None,
) -> list[dict]:
    """Rows (benchmarks/common.record) per size: copy, triton, torch reference, hf collator; then one
    `summary` row per size with the kernel's fraction of copy bandwidth and its speed-up over the collator.
    Each row is printed as it is measured, to `table` (default stdout; `mlmtrain bench` keeps stdout clean)."""
    from mlmtrain.kernels import mlm_mask as mm
    from mlmtrain.kernels import triton_runs_on

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    hf_max_tokens = hf_max_tokens if hf_max_tokens is not None else HF_MAX_TOKENS
    kernel_ok = triton_runs_on(device)
    word_start = torch.arange(VOCAB_SIZE, device=device) < CONTINUATION_FROM  # (V,) True: starts a word
    rows = []
    for T in sizes:
        M = mm.max_masked_bound(T, 0.15)
        work = {"tokens": T, "bytes": logical_bytes(T, M)}
        steps = iter(range(1 << 30))

        def fresh_ids():  # new ids and a new step key per repeat, made outside the timed region
            return torch.randint(0, VOCAB_SIZE, (T,), device=device, dtype=torch.int32), next(steps)

        def masker(backend, ww):
            table = word_start if ww else None
            return lambda a: mm.mlm_mask(
                a[0],
                vocab_size=VOCAB_SIZE,
                mask_id=MASK_ID,
                num_special=NUM_SPECIAL,
                seed=0,
                step=a[1],
                max_masked=M,
                word_start=table,
                backend=backend,
            )

        def add(name, seconds, work=work, **fields):
            rows.append(
                record("mask", name, seconds, work=work, num_tokens=T, max_masked=M, device=str(device), **fields)
            )
            r = rows[-1]
            rate = f"{r['tokens_per_s']['median'] / 1e6:10.2f}" if "tokens_per_s" in r else f"{'-':>10}"  # copy: none
            print(
                f"{T:>9} tokens  {name:<28} {r['seconds']['median'] * 1e3:10.3f} ms  {rate} Mtok/s  "
                f"{r['bytes_per_s']['median'] / 1e9:8.2f} GB/s",
                file=table or sys.stdout,
                flush=True,
            )

        # the copy ceiling at this size: the same bytes, read + write
        numel = work["bytes"] // 8
        dst = torch.empty(numel, device=device, dtype=torch.float32)
        add(
            "copy",
            time_fn(dst.copy_, device, repeats=repeats, setup=lambda: torch.rand(numel, device=device)),
            work={"bytes": 8 * numel},
            path="copy",
        )

        interpreted = device.type == "cpu"
        if kernel_ok and (not interpreted or T <= INTERPRETER_MAX_TOKENS):
            label = "triton (interpreter)" if interpreted else "triton"
            r = 1 if interpreted else repeats
            add(
                label,
                time_fn(masker("triton", False), device, warmup=1 if interpreted else 3, repeats=r, setup=fresh_ids),
                path="triton",
                whole_word=False,
                bytes_moved=work["bytes"] + 4 * T,
            )
            if whole_word and not interpreted:
                add(
                    label + " whole-word",
                    time_fn(masker("triton", True), device, repeats=r, setup=fresh_ids),
                    path="triton",
                    whole_word=True,
                    bytes_moved=work["bytes"] + 4 * T,
                )
            if not interpreted:
                add_graph_row(add, masker("triton", False), fresh_ids, device, repeats, work, rows)
        ref_repeats = repeats if device.type == "cuda" else max(1, repeats // 3)
        add(
            "torch reference",
            time_fn(masker("torch", False), device, warmup=1, repeats=ref_repeats, setup=fresh_ids),
            path="torch",
            whole_word=False,
        )
        if whole_word:
            add(
                "torch reference whole-word",
                time_fn(masker("torch", True), device, warmup=1, repeats=ref_repeats, setup=fresh_ids),
                path="torch",
                whole_word=True,
            )
        if T <= hf_max_tokens:
            collator, examples = _hf_collator_and_examples(T)
            add(
                "hf collator (cpu)",
                time_fn(lambda: collator(examples), torch.device("cpu"), warmup=1, repeats=max(1, repeats // 3)),
                path="hf",
                whole_word=False,
                sentences=len(examples),
            )
            del examples
        rows.append(_summary(rows, T))
    return rows


def _summary(rows: list[dict], T: int) -> dict:
    """Kernel / copy bandwidth and kernel / HF and reference / HF token rates at one size (medians)."""
    at = {r["name"]: r for r in rows if r.get("num_tokens") == T and r["benchmark"] == "mask"}

    def rate(name, unit="tokens_per_s"):
        return at[name][unit]["median"] if name in at else None

    kernel = "triton" if "triton" in at else "triton (interpreter)" if "triton (interpreter)" in at else None
    copy_bw, hf = rate("copy", "bytes_per_s"), rate("hf collator (cpu)")
    out = {"benchmark": "mask", "name": f"summary {T}", "kind": "summary", "num_tokens": T, "kernel_row": kernel}
    if kernel:
        out["kernel_fraction_of_copy"] = rate(kernel, "bytes_per_s") / copy_bw
        out["kernel_speedup_vs_hf"] = rate(kernel) / hf if hf else None
        if "triton whole-word" in at:
            out["kernel_whole_word_fraction_of_copy"] = rate("triton whole-word", "bytes_per_s") / copy_bw
    out["reference_fraction_of_copy"] = rate("torch reference", "bytes_per_s") / copy_bw
    out["reference_speedup_vs_hf"] = rate("torch reference") / hf if hf else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="tokens per batch (default: 64k..16M on CUDA, 64k..1M on CPU)",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--hf-max-tokens",
        type=int,
        default=None,
        help=f"skip the HF collator above this size (default {HF_MAX_TOKENS})",
    )
    p.add_argument("--no-whole-word", action="store_true", help="skip the whole-word rows")
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    device = kernel_bench_device(args.device, args.threads)
    rows = run(args.sizes, device, args.repeats, hf_max_tokens=args.hf_max_tokens, whole_word=not args.no_whole_word)
    print_and_save(rows, device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
