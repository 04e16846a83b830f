"""The benchmark report's PNG charts (report.py names and links them): throughput against tokens per batch,
achieved TFLOP/s and MFU against the measured ceiling, ours against the recipe. Each returns whether it drew
(matplotlib is optional: without it the report has its tables only)."""

from __future__ import annotations

from pathlib import Path

from mlmtrain.benchmarks.tables import rows_of, scale


def _plt():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (no charts then)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(spreads: list[dict]) -> list[list[float]]:
    """matplotlib's yerr/xerr of median (min-max) spreads: [distances down, distances up]."""
    return [[d["median"] - d["min"] for d in spreads], [d["max"] - d["median"] for d in spreads]]


def chart_throughput(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if "error" not in r and isinstance(r.get("tokens_per_s"), dict)]
    if not rows:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cap in sorted({r["seq_cap"] for r in rows}):
        pts = sorted((r for r in rows if r["seq_cap"] == cap), key=lambda r: r["tokens_per_batch"])
        x = [r["tokens_per_batch"] for r in pts]
        spreads = [r["tokens_per_s"] for r in pts]
        ax.errorbar(
            x,
            [d["median"] for d in spreads],
            yerr=_err(spreads),
            marker="o",
            capsize=3,
            label=f"seq cap {cap} ({pts[0].get('pack')} packing)",
        )
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tokens_per_batch"] for r in rows})
    ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("real tokens/s (median, bars: min–max)")
    ax.set_title(f"Our training step: throughput vs batch size ({rows[0].get('size')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_tflops(results: dict, path: Path, ceil: dict, peak: float | None) -> bool:
    rows = [
        r
        for s in ("model", "train", "sweep")
        for r in rows_of(results, s)
        if isinstance(r.get("achieved_tflops"), dict) or isinstance(r.get("flops_per_s"), dict)
    ]
    if not rows:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.8))
    names = [f"{r['section']}: {r['name']}" for r in rows]
    spreads = [r["achieved_tflops"] if isinstance(r.get("achieved_tflops"), dict) else scale(r["flops_per_s"], 1e-12)
               for r in rows]  # fmt: skip
    y = list(range(len(rows)))
    ax.barh(y, [d["median"] for d in spreads], xerr=_err(spreads), capsize=3, color="tab:blue")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    for key, style, label in (
        ("matmul_bfloat16", "--", "measured bf16 matmul"),
        ("matmul_float32", ":", "measured fp32 matmul"),
    ):
        if ceil.get(key):
            ax.axvline(ceil[key], color="tab:red", linestyle=style, label=f"{label}: {ceil[key]:.3g} TFLOP/s")
    if peak:
        ax.axvline(peak, color="black", linestyle="-.", label=f"datasheet peak: {peak:.4g} TFLOP/s")
    ax.set_xlabel("achieved TFLOP/s (model FLOPs; median, bars: min–max)")
    ax.set_title("Achieved TFLOP/s against the measured ceiling")
    if ax.get_legend_handles_labels()[0]:  # no ceiling and no peak (a CPU run): no legend, and no warning
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_recipe(rows: list[dict], path: Path) -> bool:
    pair = [next((r for r in rows if r.get("trainer") == t), None) for t in ("ours", "recipe")]
    if None in pair:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    labels = ["ours", "HF Trainer recipe"]
    colors = ["tab:blue", "tab:gray"]
    tps = [r["tokens_per_s"] for r in pair]
    axes[0].bar(
        labels,
        [d["median"] for d in tps],
        yerr=_err(tps),
        capsize=4,
        color=colors,
    )
    axes[0].set_title("real tokens/s")
    losses = [r.get("valid_loss") or 0.0 for r in pair]
    axes[1].bar(labels, losses, color=colors)
    axes[1].set_title(f"valid MLM loss after {pair[0]['real_tokens']:,} tokens", fontsize=9)
    mem = [(r.get("peak_mem_bytes") or 0) / 2**30 for r in pair]
    axes[2].set_title("peak memory (GiB)")
    if any(mem):
        axes[2].bar(labels, mem, color=colors)
    else:  # torch reports allocator peaks on CUDA only
        axes[2].text(0.5, 0.5, "measured on CUDA only", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_xticks([])
        axes[2].set_yticks([])
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Ours vs the HF Trainer baseline ({pair[0].get('size')}, same sentences, same real tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- the report -----------------------------------------------------------------------------------------
