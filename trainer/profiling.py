"""How fast the step runs, measured with torch's own profiler (`--profile-steps A:B`), and `spread`, the
min/median/max every rate is reported with.

    schedule    torch.profiler.schedule: wait, then `train.profile_warmup` warm-up steps just before A (the
                profiler's start-up cost lands there, not in the trace), then record steps A..B-1, then stop.
                Every rank of a torchrun job traces its own steps.
    ranges      record_function ranges data / mask / forward / backward / optimizer, opened by `phase(name)`
                in the loop. Without --profile-steps the loop's `phase` is `no_phase`: no range, no sync, no
                device work.
    artefacts   in RUN/profile/: trace.json (open in ui.perfetto.dev or chrome://tracing), categories.json (the
                kernel-category breakdown below), phases.json (ms per phase per step), and with
                --profile-memory on CUDA memory_snapshot.pickle (torch.cuda.memory's allocation history of the
                same steps: drag it onto pytorch.org/memory_viz). Under torchrun every rank writes its own,
                named with a _rank{R} suffix (trace_rank1.json, ...).

categories.json, schema "mlmtrain.profile.categories/1" (the benchmark suite reads it):

    {"schema", "source": the trace's file name, "timeline": "device" (CUDA kernels, copies and memsets) or
     "host" (a CPU-only trace: operator self times, so nested operators count once), "steps": traced steps,
     "step_ms": mean time of a traced step on that timeline, "busy_ms": mean time with work on it,
     "categories": {name: {"ms": per step, "pct": of step_ms, "count": events per step,
                           "top": [{"name", "ms", "count"}, ...]}  (the 5 largest, names cut at 160 chars)
                    for every name in CATEGORIES, and "idle": {"ms", "pct"} (step time with no work)},
     "idle_gaps": on the device timeline, the gaps of >= 50 us put down to what the host was doing
                  (idle_gaps.py: {"min_gap_us", "ms", "count", "top": [{"kind", "phase", "op", "call",
                  "waited_in", "ms", "count"}], "host": {"step_ms", "waiting_ms"}}); null on the host timeline}

A kernel goes to the first category whose rule matches (see `kernel_category`). Device steps are the span
from the first to the last device event over the traced steps, divided by their number. Kernels on
concurrent streams (NCCL next to compute) overlap, so the categories can add up to more than busy_ms.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import warnings
from pathlib import Path

import torch

from mlmtrain.files import write_json
from mlmtrain.idle_gaps import format_gaps, idle_gaps

PHASES = ("data", "mask", "forward", "backward", "optimizer")
CATEGORIES = ("gemm", "attention", "norm_elementwise", "reduction", "optimizer", "communication", "copy", "other")
LABELS = {
    "gemm": "GEMM",
    "attention": "attention",
    "norm_elementwise": "norm + elementwise",
    "reduction": "reductions",
    "optimizer": "optimizer",
    "communication": "communication",
    "copy": "copies, memsets",
    "other": "other",
    "idle": "idle",
}
CATEGORIES_SCHEMA = "mlmtrain.profile.categories/1"
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # the kineto trace's `cat` of device work


def spread(values) -> dict | None:
    """{"min", "median", "max"} of a list of measurements (None for none): how every rate is reported."""
    values = [v for v in values if v is not None]
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


def no_phase(name: str | None) -> None:
    """The loop's `phase` when nothing is profiled."""


# ---------------------------------------------------------------------------------------------------- the profiler


class StepProfiler:
    """torch.profiler over steps `first`..`end`-1 of a loop that starts at `start_step` (a resumed run starts
    late: the window is clipped to the steps it runs). `phase(name)` closes the open range and opens `name`;
    `step()` after every optimizer step; `close()` at the end returns the per-phase ms."""

    def __init__(self, first, end, warmup, start_step, out_dir: Path, device, rank, world, memory, log):
        self.out_dir, self.device, self.rank, self.world, self.log = out_dir, device, rank, world, log
        self.suffix = "" if world == 1 else f"_rank{rank}"
        self.first, self.end = max(first, start_step), end
        self.active = end - self.first
        self.warmup = min(warmup, self.first - start_step)
        self.wait = self.first - start_step - self.warmup
        self.memory = memory and device.type == "cuda"
        self.steps_done, self.phase_ms, self._range, self.written = 0, {}, None, False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # no warm-up when A is the first step: the message below says so
            warnings.simplefilter("ignore")
            schedule = torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1)
        # the trace's ProfilerStep#N names the loop's step N, a resumed run's too (torch counts from 0 in each
        # process): its counter starts at start_step, and the schedule reads it from there
        self.prof = torch.profiler.profile(
            activities=activities, schedule=lambda n: schedule(max(n - start_step, 0)), on_trace_ready=self._write
        )
        self.prof.step_num = start_step
        if self.wait + self.warmup == 0:  # the trace starts with the next step
            self._drain()
        self.prof.start()
        if memory and not self.memory:
            log(f"--profile-memory: no memory snapshot: it records CUDA allocations, and this run is on {device}")
        if self.memory and self.wait == 0:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if self.warmup == 0:
            log(f"profile: no warm-up step before step {self.first}: the first traced step carries the start-up")

    def phase(self, name: str | None) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if name is not None:
            self._range = torch.profiler.record_function(name)
            self._range.__enter__()

    def step(self) -> float:
        """After every optimizer step; returns the seconds it spent writing the trace (no training time: the
        device is drained first, so its work stays in the log window's time and the export does not)."""
        self.phase(None)
        spent = 0.0
        if self.prof is not None:
            if self.steps_done + 1 == self.wait + self.warmup:  # the next step is the first one traced
                self._drain()
            last = self.steps_done + 1 == self.wait + self.warmup + self.active  # this step ends the trace
            if last:
                self._drain()
            t0 = time.perf_counter()
            self.prof.step()
            spent = time.perf_counter() - t0 if last else 0.0
        self.steps_done += 1
        if self.memory and self.steps_done == self.wait:  # the warm-up starts: record allocations from here
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        return spent

    def _drain(self) -> None:
        """Wait for the device (sync: twice per run, before the first traced step and after the last): the host runs
        steps ahead of it, and kernels of untraced steps still running then would be counted in the traced ones."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> dict:
        """Stop (a run that ended inside the window writes what it traced) and return the per-phase ms."""
        self.phase(None)
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
            if not self.written:
                self.log(f"profile: nothing traced: the run stopped before step {self.first}")
        return self.phase_ms

    def _write(self, prof) -> None:
        """on_trace_ready: the trace, then what is read from it, then the memory snapshot; says where each went."""
        self.written = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = {name: self.out_dir / f"{name}{self.suffix}.json" for name in ("trace", "categories", "phases")}
        prof.export_chrome_trace(str(paths["trace"]))
        trace = json.loads(paths["trace"].read_text(encoding="utf-8"))
        report = kernel_categories(trace, source=paths["trace"].name)
        self.phase_ms = phase_times(trace)
        write_json(paths["categories"], report)
        write_json(paths["phases"], self.phase_ms)
        lines = [
            f"profile: traced steps {self.first}..{self.first + report['steps'] - 1} after {self.warmup} warm-up "
            f"step(s); files{' of every rank (suffix _rank<R>)' if self.world > 1 else ''}:",
            f"  {paths['trace']}  (open in https://ui.perfetto.dev or chrome://tracing)",
            f"  {paths['categories']}  (kernel categories per step, JSON)",
            f"  {paths['phases']}  (ms per phase per step, JSON)",
        ]
        if self.memory:
            snapshot = self.out_dir / f"memory_snapshot{self.suffix}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            lines.append(f"  {snapshot}  (drag onto https://pytorch.org/memory_viz)")
        if self.phase_ms:
            lines.append("phases (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in self.phase_ms.items()))
        self.log("\n".join(lines + [format_categories(report)]))


def start_profiler(train_spec, start_step: int, out_dir: Path, device, rank: int, world: int, log):
    """The run's StepProfiler, or None without --profile-steps (or when a resumed run starts past the window)."""
    from mlmtrain.config import profile_range

    steps = profile_range(train_spec.profile_steps)
    if steps is None:
        return None
    if steps[1] <= start_step:
        log(f"profile: steps {steps[0]}..{steps[1] - 1} were run before step {start_step}, where this run starts")
        return None
    if max(steps[0], start_step) >= train_spec.max_steps:  # loop steps count from 0: the last is max_steps - 1
        log(
            f"profile: nothing traced: steps {steps[0]}..{steps[1] - 1} come after the run's last step, "
            f"{train_spec.max_steps - 1} (steps count from 0)"
        )
        return None
    # the window ends with the run at the latest: a profiler still on when the loop ends would count the final
    # evaluation and checkpoint as one more traced step
    if steps[1] > train_spec.max_steps:
        log(f"profile: steps {steps[0]}..{steps[1] - 1} end with the run's last step, {train_spec.max_steps - 1}")
    # an evaluation or a save after step count c runs in loop step c (after the profiler's step boundary)
    first, end = max(steps[0], start_step), min(steps[1], train_spec.max_steps)
    inside = [
        f"{what} after step {c} (train.{key} {every}) runs in traced step {c}"
        for what, key, every in (("the evaluation", "eval_every", train_spec.eval_every),
                                 ("the checkpoint", "checkpoint_every", train_spec.checkpoint_every))
        if every for c in range(max(first, 1), end) if c % every == 0
    ]  # fmt: skip
    if inside:
        log(f"profile: {'; '.join(inside[:4])}{'; ...' if len(inside) > 4 else ''}: its work counts in that step")
    return StepProfiler(steps[0], min(steps[1], train_spec.max_steps), train_spec.profile_warmup, start_step, out_dir,
                        device, rank, world, train_spec.profile_memory, log)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- categories

_GEMM = ("gemm", "gemv", "cutlass", "cublas", "xmma", "nvjet", "splitkreduce")
_HOST_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
              "aten::_addmm_activation"}  # fmt: skip
_NORM = ("layer_norm", "layernorm", "rms_norm", "rmsnorm", "gammabeta", "batch_norm", "group_norm")
_REDUCTION = ("reduce", "softmax", "nll_loss", "cross_entropy", "argmax", "argmin", "cumsum", "vector_norm")
_HOST_REDUCTION = {
    "sum", "mean", "max", "min", "amax", "amin", "prod", "norm", "topk", "all", "any", "std", "var", "logsumexp",
    "log_softmax", "softmax", "log_softmax_backward_data", "softmax_backward_data", "nll_loss", "nll_loss_forward",
    "nll_loss_backward", "nll_loss_nd", "cross_entropy_loss", "argmax", "argmin", "cumsum", "linalg_vector_norm",
}  # fmt: skip
_ELEMENTWISE = ("elementwise", "gelu", "dropout", "bernoulli", "fillfunctor")
_HOST_POINTWISE = {
    "add", "sub", "mul", "div", "gelu", "gelu_backward", "relu", "threshold_backward", "tanh", "tanh_backward", "exp",
    "log", "pow", "sqrt", "rsqrt", "neg", "sigmoid", "dropout", "native_dropout", "native_dropout_backward",
    "bernoulli", "where", "masked_fill", "clamp", "clamp_min", "copy", "to", "to_copy", "fill", "zero", "lerp",
    "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_not", "isfinite", "abs", "reciprocal", "maximum", "minimum", "square",
    "erf", "sign", "mul_scalar", "add_scalar",
}  # fmt: skip


def _base_name(name: str) -> str:
    """A kernel's function name without `void`, its namespace's `(anonymous namespace)`, template arguments and
    parameters: "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(...)" ->
    "at::native::vectorized_layer_norm_kernel". Template arguments name the functors, dtypes and libraries a
    kernel was built with (cutlass types in flash attention, Norm ops in a reduction), not what it does."""
    name = name.lower().replace("(anonymous namespace)::", "").removeprefix("void ").strip()
    return re.split(r"[<(]", name, maxsplit=1)[0]


def kernel_category(name: str, cat: str = "kernel") -> str:
    """The category of one trace event: a CUDA kernel by its (demangled) name, a copy or memset by its `cat`,
    a host operator (aten::...) by its name. The first rule that matches wins, in this order: NCCL; the
    optimizer (fused AdamW's multi_tensor_apply, the foreach norm/scale of gradient clipping); inductor's
    kernels by the kind their name starts with (triton_tem_ a template: FlexAttention's kernels,
    triton_tem_fused_flex_attention_0 and ..._backward_2, else a GEMM; triton_red_/triton_per_ a reduction,
    triton_poi_ pointwise; a fused layer norm counts as a norm) rather than the ops they fused;
    attention anywhere in the name (flash attention kernels are cutlass instances); GEMM libraries; norms;
    reductions; elementwise kernels; copies."""
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "copy"
    full, base = name.lower(), _base_name(name)
    op = base[6:].strip("_") if base.startswith("aten::") else None  # a host operator's name
    # by the function's own name: a GEMM's template arguments can name a *Broadcast* epilogue (rowwise fp8); never
    # a host aten:: operator (aten::broadcast_tensors is shapes; the collectives are c10d::, gloo:, nccl:)
    if op is None and any(s in base for s in ("nccl", "c10d::", "gloo", "allreduce", "all_reduce", "all_gather",
                                              "allgather", "reduce_scatter", "broadcast")):  # fmt: skip
        return "communication"
    if any(s in base for s in ("multi_tensor_apply", "adam", "lpnorm", "_foreach_")):
        return "optimizer"
    if base.startswith("triton_"):
        if base.startswith("triton_tem_"):
            return "attention" if "attention" in base else "gemm"
        is_reduction = base.startswith(("triton_red_", "triton_per_")) and not any(s in base for s in _NORM)
        return "reduction" if is_reduction else "norm_elementwise"
    if any(s in full for s in ("flash", "fmha", "attention", "attn", "sdpa")):  # sdpa: cuDNN's kernels
        return "attention"
    if any(s in base for s in _GEMM) or base in _HOST_GEMM:
        return "gemm"
    if any(s in base for s in _NORM):
        return "norm_elementwise"
    if any(s in base for s in _REDUCTION) or op in _HOST_REDUCTION:
        return "reduction"
    if any(s in base for s in _ELEMENTWISE) or op in _HOST_POINTWISE:
        return "norm_elementwise"
    if "memcpy" in base or "memset" in base:
        return "copy"
    return "other"


def kernel_categories(trace: dict, source: str = "") -> dict:
    """categories.json (schema in the module docstring) from a Chrome trace as torch.profiler exports it."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = _traced_steps(events)
    n_steps = max(1, len(steps))
    device = [e for e in events if e.get("cat") in DEVICE_EVENTS]
    if device:
        timed = [(e, float(e["dur"]), kernel_category(e["name"], e["cat"])) for e in device]
        window_us = sum(b - a for a, b in _extent(device))
        busy_us = _union((e["ts"], e["ts"] + e["dur"]) for e in device)
    else:
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        timed, top_level = _self_times(ops)
        windows = [(e["ts"], e["ts"] + e["dur"]) for e in steps] or _extent(ops)
        window_us = sum(b - a for a, b in windows)
        busy_us = _union(filter(None, (_clip(iv, windows) for iv in top_level)))
    step_ms = window_us / 1e3 / n_steps
    table = {c: {"ms": 0.0, "count": 0, "kernels": {}} for c in CATEGORIES}
    for e, dur_us, category in timed:
        entry = table[category]
        entry["ms"] += dur_us / 1e3
        entry["count"] += 1
        ms, count = entry["kernels"].get(e["name"], (0.0, 0))
        entry["kernels"][e["name"]] = (ms + dur_us / 1e3, count + 1)
    categories = {}
    for c, entry in table.items():
        top = sorted(entry["kernels"].items(), key=lambda kv: -kv[1][0])[:5]
        categories[c] = {
            "ms": entry["ms"] / n_steps,
            "pct": _pct(entry["ms"] / n_steps, step_ms),
            "count": entry["count"] / n_steps,
            "top": [{"name": k[:160], "ms": ms / n_steps, "count": n / n_steps} for k, (ms, n) in top],
        }
    idle_ms = max(0.0, window_us - busy_us) / 1e3 / n_steps
    categories["idle"] = {"ms": idle_ms, "pct": _pct(idle_ms, step_ms)}
    return {
        "schema": CATEGORIES_SCHEMA,
        "source": source,
        "timeline": "device" if device else "host",
        "steps": len(steps) or 1,
        "step_ms": step_ms,
        "busy_ms": busy_us / 1e3 / n_steps,
        "categories": categories,
        "idle_gaps": idle_gaps(events, device, steps, PHASES) if device else None,
    }


def phase_times(trace: dict) -> dict[str, float]:
    """ms per traced step in each of PHASES: on the device timeline where the trace has one (kineto's
    gpu_user_annotation spans the kernels a range launched), else on the host."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    n_steps = max(1, len(_traced_steps(events)))
    on_device = [e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"] in PHASES]
    ranges = on_device or [e for e in events if e.get("cat") == "user_annotation" and e["name"] in PHASES]
    totals = {name: 0.0 for name in PHASES if any(e["name"] == name for e in ranges)}
    for e in ranges:
        totals[e["name"]] += e["dur"] / 1e3 / n_steps
    return totals


def _traced_steps(events: list[dict]) -> list[dict]:
    """The trace's ProfilerStep# ranges that ran a step (hold the loop's forward range), where any does: a run that
    stops inside the window closes the profiler after its last step, which left one more range opened."""
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    forwards = [e["ts"] for e in events if e.get("cat") == "user_annotation" and e["name"] == "forward"]
    ran = [s for s in steps if any(s["ts"] <= ts < s["ts"] + s["dur"] for ts in forwards)]
    return ran or steps


def format_categories(report: dict) -> str:
    where = "device time" if report["timeline"] == "device" else "host operator self time (no device in the trace)"
    lines = [f"kernel categories ({where}; {report['step_ms']:.2f} ms per step over {report['steps']} steps):"]
    for name, entry in report["categories"].items():
        lines.append(f"  {LABELS[name]:<20} {entry['ms']:9.2f} ms {entry['pct']:6.1f}%")
    return "\n".join(lines + (format_gaps(report["idle_gaps"]) if report.get("idle_gaps") else []))


def _pct(ms: float, step_ms: float) -> float:
    return 100.0 * ms / step_ms if step_ms > 0 else 0.0


def _self_times(ops: list[dict]):
    """Each host operator with its self time (its duration less its direct children's, per thread) and its
    category, and the intervals of the top-level operators. The operators inside an attention operator count
    as attention (on CPU, SDPA's math path is made of bmm and softmax)."""
    by_thread: dict = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    timed, top_level = [], []
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        self_us = [float(e["dur"]) for e in thread_ops]
        category = [""] * len(thread_ops)
        stack: list[int] = []
        for i, e in enumerate(thread_ops):
            while stack and thread_ops[stack[-1]]["ts"] + thread_ops[stack[-1]]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                self_us[stack[-1]] -= e["dur"]
            else:
                top_level.append((e["ts"], e["ts"] + e["dur"]))
            inside_attention = stack and category[stack[-1]] == "attention"
            category[i] = "attention" if inside_attention else kernel_category(e["name"], "cpu_op")
            stack.append(i)
        timed += [(e, max(0.0, s), c) for e, s, c in zip(thread_ops, self_us, category)]
    return timed, top_level


def _union(intervals) -> float:
    """Total length covered by a set of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _extent(events) -> list[tuple[float, float]]:
    """[(first start, last end)] of some trace events; [] for none."""
    if not events:
        return []
    return [(min(e["ts"] for e in events), max(e["ts"] + e["dur"] for e in events))]


def _clip(interval, windows):
    """`interval` cut to the first window it overlaps (traced steps are back to back; an op never spans two)."""
    a, b = interval
    for lo, hi in windows:
        if a < hi and b > lo:
            return (max(a, lo), min(b, hi))
    return None
