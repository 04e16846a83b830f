"""Where the device waited: the idle gaps of a traced step, each put down to what the host was doing.

torch.profiler's Chrome trace (kineto) links every device event (cat "kernel", "gpu_memcpy", "gpu_memset") to the
host call that issued it by `args.correlation`: a "cuda_runtime" or "cuda_driver" event (cudaLaunchKernel,
cuLaunchKernel for Triton's kernels, cudaMemcpyAsync, cudaGraphLaunch for every kernel of a CUDA graph). For each
gap of at least MIN_GAP_US between the device's busy intervals (all streams together, from the first device event
to the last, as the categories count idle time), the event that ends the gap names the call that launched it,
and so the host thread, the time and the operator that ended the gap. Each gap is one of:

    host blocked  the launching thread came out of a runtime call of at least WAIT_US after the device went idle
                  (or at most SLACK_US before): it waited for the device (cudaStreamSynchronize under aten::item,
                  a copy to pageable memory, cudaFree under the caching allocator, ...), named with its operator
    host late     the next work was launched after the device went idle, and no such call came before it: the
                  host was slower than the device (launch overhead, Python, another thread holding the GIL)
    device wait   the next work was launched before the gap began: it waited on the device (an event, another
                  stream's work)
    graph replay  the same, launched by cudaGraphLaunch: a gap between the kernels of one CUDA graph replay (CUPTI
                  gives every kernel of a replay its launch's correlation), a dependency inside the graph

Gaps are grouped by (kind, the loop's phase at the launch, the operator that launched, the launching call, the
call waited in) and reported per traced step, largest first. `host` is the loop thread's side of the same steps:
its time per step and how much of it went to runtime calls of at least WAIT_US (waiting for the device, or for
room in the launch queue). A step whose host time less that wait is near the device's busy time is bound by the
host. The profiler adds its own cost to every operator, so traced host times run somewhat above an untraced
run's.
"""

from __future__ import annotations

import bisect

MIN_GAP_US = 50.0  # smaller gaps are the launch-to-launch spacing of back-to-back kernels, not a stall
WAIT_US = MIN_GAP_US / 2  # a runtime call this long was waiting; a kernel launch takes a few microseconds
SLACK_US = 10.0  # clock skew between the host and device timelines that a gap's cause may be off by
HOST_CALLS = ("cuda_runtime", "cuda_driver")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
TOP = 6  # causes kept per report


def idle_gaps(events: list[dict], device: list[dict], steps: list[dict], phases: tuple[str, ...]) -> dict:
    """{"min_gap_us", "ms" and "count" per step of all gaps >= MIN_GAP_US, "top": [{"kind", "phase", "op",
    "call", "waited_in", "ms", "count"}] (per step, largest first), "host": {"step_ms", "waiting_ms"} or None}.
    `events`: the trace's complete ("X") events; `device`: those on the device; `steps`: the traced
    ProfilerStep# ranges; `phases`: the loop's range names."""
    n_steps = max(1, len(steps))
    launches = {
        e["args"]["correlation"]: e for e in events if e.get("cat") in HOST_CALLS and "correlation" in e.get("args", {})
    }
    threads = _Threads(events, phases)
    loop = (steps[0].get("pid"), steps[0].get("tid")) if steps else None  # the phases are the loop thread's ranges
    device = sorted((e for e in device if e["dur"] > 0), key=lambda e: e["ts"])  # an instant splits no gap
    causes: dict[tuple, list[float]] = {}
    for gap_start, gap_end, next_event in _gaps(device):
        launch = launches.get(next_event.get("args", {}).get("correlation"))
        if launch is None:
            key = ("unknown", None, None, None, None)
        else:
            thread, at = (launch.get("pid"), launch.get("tid")), launch["ts"]
            waited = threads.wait_before(thread, gap_start - SLACK_US, at)
            if waited:
                kind = "host blocked"
            elif at >= gap_start - SLACK_US:
                kind = "host late"
            else:
                kind = "graph replay" if launch["name"] in GRAPH_LAUNCHES else "device wait"
            waited_in = (
                f"{waited['name']} in {threads.op_at(thread, waited['ts']) or 'no operator'}" if waited else None
            )
            # the phase the loop was in at the launch: autograd launches the backward from its own thread
            phase = threads.phase_at(loop or thread, at)
            key = (kind, phase, threads.op_at(thread, at), launch["name"], waited_in)
        entry = causes.setdefault(key, [0.0, 0])
        entry[0] += gap_end - gap_start
        entry[1] += 1
    top = sorted(causes.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "min_gap_us": MIN_GAP_US,
        "ms": sum(us for us, _ in causes.values()) / 1e3 / n_steps,
        "count": sum(n for _, n in causes.values()) / n_steps,
        "top": [
            {
                "kind": k,
                "phase": p,
                "op": op,
                "call": call,
                "waited_in": w,
                "ms": us / 1e3 / n_steps,
                "count": n / n_steps,
            }
            for (k, p, op, call, w), (us, n) in top
        ],
        "host": _host(steps, threads),
    }


def format_gaps(gaps: dict) -> list[str]:
    """Text lines for a run's log: the gaps' total, then one line per cause."""
    lines = [f"idle gaps of >= {gaps['min_gap_us']:.0f} us: {gaps['ms']:.2f} ms in {gaps['count']:.1f} gaps per step"]
    for c in gaps["top"]:
        lines.append(f"  {c['ms']:7.2f} ms {c['count']:6.1f}x  {describe(c)}")
    host = gaps.get("host")
    if host:
        lines.append(
            f"host (the loop's thread): {host['step_ms']:.2f} ms per step, {host['waiting_ms']:.2f} of them in "
            f"runtime calls of >= {WAIT_US:.0f} us"
        )
    return lines


def describe(cause: dict) -> str:
    """One cause in words: "host late in forward, cudaLaunchKernel from aten::mm"."""
    if cause["kind"] == "unknown":
        return "no launch in the trace for the work after the gap"
    where = f" in {cause['phase']}" if cause["phase"] else " outside the loop's phases"
    text = f"{cause['kind']}{where}, {cause.get('call') or 'launched'} from {cause['op'] or 'no operator'}"
    return text + (f", after waiting in {cause['waited_in']}" if cause["waited_in"] else "")


def _gaps(device: list[dict]):
    """(start, end, the event that ends it) for every gap >= MIN_GAP_US between busy intervals of `device`
    (sorted by start)."""
    end = None
    for e in device:
        if end is not None and e["ts"] - end >= MIN_GAP_US:
            yield end, e["ts"], e
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])


def _host(steps: list[dict], threads: _Threads) -> dict | None:
    """The loop thread's ms per traced step and its ms in runtime calls >= WAIT_US, or None without steps."""
    if not steps:
        return None
    thread = (steps[0].get("pid"), steps[0].get("tid"))
    calls = threads.calls.get(thread, ([], []))[1]
    waiting = 0.0
    for s in steps:
        lo, hi = s["ts"], s["ts"] + s["dur"]
        waiting += sum(
            min(c["ts"] + c["dur"], hi) - max(c["ts"], lo) for c in calls if c["ts"] < hi and c["ts"] + c["dur"] > lo
        )
    return {"step_ms": sum(s["dur"] for s in steps) / 1e3 / len(steps), "waiting_ms": waiting / 1e3 / len(steps)}


class _Threads:
    """Per host thread: its long runtime calls (sorted by end), its operators and the loop's phase ranges."""

    def __init__(self, events: list[dict], phases: tuple[str, ...]):
        self.calls: dict = {}  # thread -> ([end, ...], [call, ...]) of calls >= WAIT_US, by end
        self.ops: dict = {}  # thread -> ([start, ...], [op, ...]), by start
        self.phases: dict = {}  # thread -> [phase range, ...]
        for e in events:
            thread, cat = (e.get("pid"), e.get("tid")), e.get("cat")
            if cat in HOST_CALLS and e["dur"] >= WAIT_US:
                self.calls.setdefault(thread, []).append(e)
            elif cat == "user_annotation" and e["name"] in phases:
                self.phases.setdefault(thread, []).append(e)
            elif cat in ("cpu_op", "user_annotation") and not e["name"].startswith("ProfilerStep#"):
                self.ops.setdefault(thread, []).append(e)
        for thread, calls in self.calls.items():
            calls.sort(key=lambda e: e["ts"] + e["dur"])
            self.calls[thread] = ([e["ts"] + e["dur"] for e in calls], calls)
        for thread, ops in self.ops.items():
            ops.sort(key=lambda e: e["ts"])
            self.ops[thread] = ([e["ts"] for e in ops], ops)

    def wait_before(self, thread, lo: float, hi: float) -> dict | None:
        """The last long runtime call of `thread` that ended in [lo, hi], or None."""
        ends, calls = self.calls.get(thread, ([], []))
        i = bisect.bisect_right(ends, hi) - 1
        return calls[i] if i >= 0 and ends[i] >= lo else None

    def op_at(self, thread, t: float) -> str | None:
        """The innermost operator (or record_function range) of `thread` running at `t`: the last to start of
        those that hold it (a nested operator starts after the one holding it)."""
        starts, ops = self.ops.get(thread, ([], []))
        for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
            if ops[i]["ts"] + ops[i]["dur"] > t:
                return ops[i]["name"][:120]
        return None

    def phase_at(self, thread, t: float) -> str | None:
        return next((e["name"] for e in self.phases.get(thread, []) if e["ts"] <= t < e["ts"] + e["dur"]), None)
