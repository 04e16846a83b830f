"""Numbers and markdown tables of the benchmark reports (report.py, charts.py, and the sections that render their
own part): a results.json's sections and their measured rows, SI prefixes, "median (min–max)" spreads,
percentages, GiB, and a markdown table."""

from __future__ import annotations

import math


def section(results: dict, name: str) -> dict | None:
    return next((s for s in results["sections"] if s["section"] == name), None)


def rows_of(results: dict, name: str) -> list[dict]:
    """The rows of section `name` that measured something (not those with an error)."""
    s = section(results, name)
    return [r for r in (s or {}).get("rows", []) if "error" not in r]


def si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for step, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= step:
            return f"{x / step:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def spread_text(d: dict | None, fmt=si, unit: str = "") -> str:
    """'median (min–max)' of a {"min","median","max"} dict."""
    if not isinstance(d, dict) or d.get("median") is None:
        return "–"
    return f"{fmt(d['median'], unit)} ({fmt(d['min'], unit)}–{fmt(d['max'], unit)})"


def pct(d: dict | None) -> str:
    if not isinstance(d, dict) or d.get("median") is None:
        return "–"
    return f"{100 * d['median']:.1f}% ({100 * d['min']:.1f}–{100 * d['max']:.1f}%)"


def scale(d: dict | None, k: float) -> dict | None:
    return {key: v * k for key, v in d.items() if isinstance(v, (int, float))} if isinstance(d, dict) else None


def gib(b) -> str:
    return "–" if b is None else f"{b / 2**30:.2f} GiB"


def loss_text(loss: float | None) -> str:
    """A loss for a table or a sentence: "–" where there is none (a diverged run, or nothing masked)."""
    return f"{loss:.4f}" if loss is not None else "–"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)
