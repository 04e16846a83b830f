"""`mlmtrain plot RUN_DIR`: loss (train and valid), learning rate and throughput curves from
RUN_DIR/metrics.jsonl, drawn to RUN_DIR/curves.png (matplotlib: `pip install -e ".[plot]"`) or another .png
path. The image is written all at once, and replaces only a PNG image: never a file plot could not have drawn."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

from mlmtrain.errors import UserError, missing_extra
from mlmtrain.files import write_bytes, write_failure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file


def check_out(out: Path) -> None:
    """The image's path: ending in .png, in a folder (or where one can be made), and not an existing file other
    than a PNG image."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} is not a .png path: plot draws a PNG image")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the path of the .png file to write")
    if out.exists() and not _is_png(out):
        raise UserError(f"{out} exists and is not a PNG image: plot replaces only an image; choose another --out")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise UserError(f"cannot write {out}: {folder} is a file, not a folder")


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a run folder of `mlmtrain train`?")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): was the file edited or damaged?") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # no newline after it: a line a running (or killed) run is still writing
                    break
                raise UserError(f"{path} line {n} is not JSON (was the file edited or truncated?)") from None
            # what the curves read: a training row's step, lr and rate; an evaluation row's step
            needs = ("step", "lr", "tokens_per_s") if isinstance(row, dict) and "loss" in row else ("step",)
            if not isinstance(row, dict) or not all(isinstance(row.get(k), int | float) for k in needs):
                raise UserError(f"{path} line {n} is not a metrics row with {', '.join(needs)} (was it edited?)")
            rows.append(row)
    return rows


def plot(run_dir: Path, out: Path) -> Path:
    check_out(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("plotting", "matplotlib", "plot") from None
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]  # a log window's row; its loss is null where it was not finite
    valid = [r for r in rows if r.get("valid_loss") is not None]
    if not train:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no training steps yet")
    diverged = sum(r.get("loss") is None for r in train)
    if diverged:
        print(
            f"note: {diverged} of {len(train)} log windows had a non-finite loss: gaps in the loss curve",
            file=sys.stderr,
        )
    fig, (ax_loss, ax_lr, ax_tok) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    losses = [math.nan if r.get("loss") is None else r["loss"] for r in train]  # NaN: matplotlib leaves a gap
    ax_loss.plot([r["step"] for r in train], losses, label="train MLM loss")
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
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(out, image.getvalue())
    except OSError as e:
        raise UserError(f"could not write {out}: {write_failure(e)}") from None
    return out


def main(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is {'a file' if run_dir.exists() else 'missing'}: pass a run folder of `mlmtrain train`"
        )
    out = plot(run_dir, Path(args.out) if args.out else run_dir / "curves.png")
    print(f"wrote {out}")
    return 0
