"""How fast the step runs: `--profile-steps A:B` (a torch.profiler trace of those steps, Chrome/Perfetto JSON, and
a per-phase device-time table: data, forward, backward, optimizer, read with CUDA events once per profiled step),
and `spread`, the min/median/max every rate is reported with."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mlmtrain.config import profile_range


def spread(values) -> dict | None:
    """{"min", "median", "max"} of a list of measurements (None for none): how every rate is reported."""
    values = [v for v in values if v is not None]
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


class PhaseTimer:
    """Per-phase device time of a profiled step (events, read once at the end of the step)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        if enabled:
            self.marks.append(("start", self._now()))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.enabled:
            self.marks.append((name, self._now()))

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()  # sync: profiled steps only
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


class StepProfiler:
    """`--profile-steps A:B`: a torch.profiler trace of steps A..B-1 (Chrome/Perfetto JSON) and a
    per-phase time table (data, forward, backward, optimizer), averaged over those steps."""

    def __init__(self, first: int, end: int, out_dir: Path):
        self.first, self.end, self.out_dir = first, end, out_dir
        self.prof = None
        self.tables: list[dict[str, float]] = []

    def active(self, step: int) -> bool:
        if self.first <= step < self.end and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self.prof.__enter__()
        return self.first <= step < self.end

    def step(self, step_done: int, phase: PhaseTimer, phase_ms: dict) -> None:
        if phase.enabled:
            self.tables.append(phase.read())
        if step_done == self.end and self.prof is not None:
            self.close(phase_ms)

    def close(self, phase_ms: dict) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        self.prof = None
        if self.tables:
            names = self.tables[0].keys()
            phase_ms.update({n: sum(t.get(n, 0.0) for t in self.tables) / len(self.tables) for n in names})
            (self.out_dir / "phases.json").write_text(json.dumps(phase_ms, indent=2), encoding="utf-8")
            print("profile (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in phase_ms.items()), file=sys.stderr)


def start_profiler(spec: str, run_dir: Path) -> StepProfiler | None:
    steps = profile_range(spec)
    return StepProfiler(*steps, run_dir / "profile") if steps else None
