"""`mlmtrain plot RUN_DIR`: loss (train and valid), learning rate and throughput curves from
RUN_DIR/metrics.jsonl, drawn to RUN_DIR/curves.png (matplotlib: `pip install -e ".[plot]"`)."""

from __future__ import annotations

import json
from pathlib import Path

from mlmtrain.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a run folder of `mlmtrain train`?")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON (was the file edited or truncated?)") from None
    return rows


def plot(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("loss") is not None]
    valid = [r for r in rows if "valid_loss" in r]
    if not train:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no training steps yet")
    fig, (ax_loss, ax_lr, ax_tok) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train MLM loss")
    if valid:
        ax_loss.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid MLM loss")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_ylabel("learning rate")
    ax_tok.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax_tok.set_ylabel("real tokens / s")
    ax_tok.set_xlabel("step")
    for ax in (ax_loss, ax_lr, ax_tok):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(args) -> int:
    run_dir = Path(args.run_dir)
    out = plot(run_dir, Path(args.out) if args.out else run_dir / "curves.png")
    print(f"wrote {out}")
    return 0
