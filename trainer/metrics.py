"""What a run reports: the numbers of each log window (one device-to-host transfer per window), the
metrics.jsonl lines (the record of the run), their copies to TensorBoard or Weights & Biases (`--report-to`),
the progress line, and the summary of the run."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlmtrain import __version__, parallel, provenance
from mlmtrain.checkpoint import checkpoint_step, complete_checkpoints, train_command
from mlmtrain.errors import missing_extra
from mlmtrain.files import json_text
from mlmtrain.profiling import spread


class MetricsLog:
    """RUN/metrics.jsonl, one JSON object per line, flushed per line; appended to when a run resumes. Only
    rank 0 writes (`path` None elsewhere). Every line also goes to the `report_to` trackers (scalars under
    train/ or eval/), which get the resolved config at the start and the summary at the end (`finish`);
    metrics.jsonl stays the record: a tracker only mirrors it."""

    def __init__(self, path: Path | None, append: bool, resumed_at: int | None = None):
        # a resumed run redoes the steps after its checkpoint: their lines go first (`dropped` of them)
        self.dropped = truncate_metrics(path, resumed_at) if path is not None and resumed_at is not None else 0
        self.file = open(path, "a" if append else "w", encoding="utf-8") if path is not None else None
        self.path, self.append, self.trackers = path, append, []

    def open_trackers(self, names, config: dict, first_step: int) -> None:
        """Start the `--report-to` trackers (checked by `check_report_to` before any device work)."""
        if self.path is not None:
            self.trackers = [TRACKERS[name](self.path.parent, config, self.append, first_step) for name in names]

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json_text(row) + "\n")
            self.file.flush()
        if self.trackers:
            prefix = "eval" if any(k.startswith("valid_") for k in row) else "train"
            scalars = {
                f"{prefix}/{k}": float(v)
                for k, v in row.items()
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            for tracker in self.trackers:
                tracker.log(scalars, row["step"])

    def close(self) -> None:
        """Close metrics.jsonl. The trackers stay open for `finish` (after an error, their own exit handling
        closes them: TensorBoard's file is flushed at every line, W&B marks the run failed)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self, summary: dict) -> None:
        """Give the trackers the run's summary and close them."""
        scalars = {k: float(v) for k, v in _flat(summary).items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.finish(scalars, summary)
        self.trackers = []


def check_report_to(names) -> None:
    """Refuse a tracker whose package is missing, before any device work."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise missing_extra(f"--report-to {name}", f"the {name} package", name)


class TensorBoardTracker:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`), written by torch's
    SummaryWriter. A resumed run hides what the stopped one logged after its checkpoint (`purge_step`)."""

    def __init__(self, run_dir: Path, config: dict, append: bool, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step + 1 if append else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```", first_step)
        self.writer.flush()

    def log(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # log steps only: a crash loses nothing metrics.jsonl has

    def finish(self, scalars: dict, summary: dict) -> None:
        step = int(summary.get("steps") or 0)
        for tag, value in scalars.items():
            self.writer.add_scalar(f"summary/{tag}", value, step)
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run named after the run folder, in project $WANDB_PROJECT (default mlmtrain), files
    under RUN/wandb. W&B's own settings apply (WANDB_MODE=offline keeps everything local; `wandb sync` uploads
    later). A resumed run continues the same W&B run (its id is kept in RUN/wandb/mlmtrain_run_id); W&B drops
    the rows of steps it already has."""

    def __init__(self, run_dir: Path, config: dict, append: bool, first_step: int):
        import wandb

        id_file = run_dir / "wandb" / "mlmtrain_run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text(encoding="utf-8").strip() if append and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mlmtrain"),
            name=run_dir.resolve().name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off"),  # never wrap this process's stdout/stderr
        )
        id_file.write_text(self.run.id, encoding="utf-8")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, scalars: dict, summary: dict) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in scalars.items()})
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def memory_stats(device: torch.device) -> dict:
    """The caching allocator's peaks and trouble counts (host-side counters: no device sync); None on CPU.
    `alloc_retries` counts allocations that had to free cached blocks and retry (fragmentation or a tight
    fit, each one a synchronizing cudaFree); `oom_count` the out-of-memory errors raised (and caught)."""
    if device.type != "cuda":
        return {"peak_mem_bytes": None, "peak_reserved_bytes": None, "alloc_retries": None, "oom_count": None}
    stats = torch.cuda.memory_stats(device)
    return {
        "peak_mem_bytes": stats.get("allocated_bytes.all.peak", 0),
        "peak_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "oom_count": stats.get("num_ooms", 0),
    }


def truncate_metrics(path: Path, step: int) -> int:
    """Cut metrics.jsonl back to its rows of steps up to `step`, so that a run resumed from checkpoint `step`
    logs the steps it redoes once (a line torn by a kill goes too). One truncate call: the file is never half
    rewritten. Returns the number of lines dropped."""
    if not Path(path).is_file():
        return 0
    lines = Path(path).read_bytes().splitlines(keepends=True)
    kept = 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not line.endswith(b"\n") or not isinstance(row, dict) or row.get("step", 0) > step:
            break
        kept += 1
    os.truncate(path, sum(map(len, lines[:kept])))
    return len(lines) - kept


class WindowStats:
    """The numbers of one log window. Device-side ones (loss, non-finite flags, the bad-step streak) accumulate
    without a sync and reach the host in one transfer when the window closes; host-side ones (tokens, segments,
    FLOPs) are summed over ranks there, on the host (stop and timed-save requests are agreed at every step, in
    `parallel.agree_stop`).

    `deferred` (train.async_log_reads): that transfer is a non-blocking copy into pinned memory, read when the
    next window closes (or at `flush`). Reading at once makes the host wait until the device has run every step
    it was given, then the device idles while the host logs and launches the next step; a copy read one window
    later has long landed, so the queue never drains. The rows are the same; each is written a window later.
    A window's time is then the device's, between two CUDA events (the host's clock stops when it has queued the
    steps, not when they ran: after an eval or a save nothing in flight holds it back); read at once, the
    host's, stopped after the sync."""

    def __init__(self, device, log_every: int, world: int, peak_tflops: float, prefetch, deferred: bool = False):
        self.device, self.world, self.peak_tflops, self.prefetch = device, world, peak_tflops, prefetch
        self.bad_flags = torch.zeros(log_every, device=device, dtype=torch.bool)  # per window step
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # over the window's good steps
        self.bad_streak = torch.zeros((), device=device, dtype=torch.int64)
        self.max_streak = torch.zeros((), device=device, dtype=torch.int64)  # over this process's steps
        self.grad_norm = torch.zeros((), device=device)
        self.steps, self.tokens, self.segments, self.flops = 0, 0, 0, 0.0
        self.deferred, self.pending = deferred, None  # pending: a closed window whose device numbers are in flight
        self.device_clock = deferred and device.type == "cuda"  # the window's time from events (class docstring)
        self.landing = torch.empty(log_every + 3, dtype=torch.float64, pin_memory=device.type == "cuda")
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0, self.wait0, self.excluded = time.perf_counter(), self.prefetch.wait_s, 0.0
        self.start_event = self.record_event()

    def record_event(self):
        """A timing event recorded on the device's stream now (on the device clock), else None."""
        if not self.device_clock:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add_batch(self, batch, flops: float) -> None:
        self.tokens += batch.num_real_tokens
        self.segments += batch.num_segments
        self.flops += flops

    def add_step(self, step_loss, bad, grad_norm) -> None:
        self.bad_flags[self.steps] = bad
        self.bad_streak = (self.bad_streak + 1) * bad
        self.max_streak = torch.maximum(self.max_streak, self.bad_streak)
        self.loss_sum += torch.where(bad, 0.0, step_loss.double())
        self.grad_norm = grad_norm
        self.steps += 1

    def close(self, step: int, lr: float, last: bool) -> list[Window]:
        """The windows ready to log (this one; deferred: the one before, this one's numbers being in flight)."""
        n = self.steps
        scalars = torch.stack([self.loss_sum, self.max_streak.double(), self.grad_norm.double()])
        device_values = torch.cat([self.bad_flags[:n].double(), scalars])  # (n + 3,)
        end_event = self.record_event()  # after the window's steps, before anything the host adds
        t_sync = time.perf_counter()
        ready = self.flush()  # before the landing buffer takes this window's numbers
        # sync: once per log window, before the clock stops, so the window's time is the device's: the host runs
        # ahead of it (by whole steps with CUDA graphs), and work still queued here would count in no window.
        # Deferred (async_log_reads): no wait here; flush() above waited on the previous window's copy
        values = None if self.deferred else device_values.tolist()
        device_wait_s = time.perf_counter() - t_sync  # how far the host ran ahead; ~0: the device waited for it
        # several processes: the window's job totals, summed on the host (every rank meets here, no device waits)
        tokens, segments, flops = parallel.sum_over_ranks(self.tokens, self.segments, self.flops)
        closed = {
            "step": step, "lr": lr, "last": last, "n": n, "tokens": int(tokens), "segments": segments,
            "flops": flops, "elapsed": time.perf_counter() - self.t0, "wall_time": time.time(),
            "data_wait_s": self.prefetch.wait_s - self.wait0, "device_wait_s": device_wait_s,
            "memory": memory_stats(self.device),
        }  # fmt: skip
        if self.deferred:
            landing = self.landing[: n + 3]
            landing.copy_(device_values, non_blocking=True)
            landed = None
            if self.device.type == "cuda":
                landed = torch.cuda.Event()
                landed.record()
            self.pending = (closed, landing, landed, self.start_event, end_event, self.excluded)
        else:
            ready.append(self._window(closed, values))
        self.bad_flags.zero_()
        self.loss_sum.zero_()
        self.steps, self.tokens, self.segments, self.flops = 0, 0, 0, 0.0
        self.restart_clock()
        return ready

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of host work out of the open window's time (its steps and tokens stay)."""
        self.t0 += seconds
        self.excluded += seconds

    def flush(self) -> list[Window]:
        """The window whose device numbers are in flight (deferred), read now; [] when there is none."""
        if self.pending is None:
            return []
        closed, landing, landed, start_event, end_event, excluded = self.pending
        self.pending = None
        if landed is not None:
            landed.synchronize()  # sync: on a copy enqueued a window ago (at eval, checkpoint and the end: this one)
        if start_event is not None:  # the device's time from the window's first step to its last
            closed["elapsed"] = start_event.elapsed_time(end_event) / 1e3 - excluded
        return [self._window(closed, landing.tolist())]

    def _window(self, closed: dict, values: list[float]) -> Window:
        step, n, elapsed, tokens, flops = (closed[k] for k in ("step", "n", "elapsed", "tokens", "flops"))
        world = self.world
        flags, (loss_sum, max_streak, grad_norm) = values[:n], values[n:]
        bad = [step - n + i + 1 for i, f in enumerate(flags) if f]
        row = {
            "step": step,
            "loss": loss_sum / (n - len(bad)) if n > len(bad) else None,
            "lr": closed["lr"],
            "grad_norm": grad_norm,
            "elapsed_s": elapsed,  # the window's training time (evals, saves, a trace's export left out)
            "tokens_per_s": tokens / elapsed,  # the job's: all ranks
            "tokens_per_s_per_gpu": tokens / elapsed / world,
            "samples_per_s": closed["segments"] / elapsed,
            "tflops": flops / elapsed / 1e12,  # the job's
            "tflops_per_gpu": flops / elapsed / 1e12 / world,
            "mfu": (flops / elapsed / 1e12 / (self.peak_tflops * world)) if self.peak_tflops else None,
            "data_wait_s": closed["data_wait_s"],
            "device_wait_s": closed["device_wait_s"],
            **closed["memory"],
            "bad_steps": len(bad),
            "time": closed["wall_time"],
        }
        return Window(row, tokens, n, elapsed, closed["last"], int(max_streak), bad)


@dataclass
class Window:
    """One closed log window."""

    row: dict  # its metrics.jsonl line
    real_tokens: int  # the job's
    steps: int
    elapsed_s: float
    last: bool  # closed at max_steps
    max_bad_streak: int  # the longest run of consecutive non-finite steps so far
    bad_steps: list[int]  # the window's non-finite steps


def record_window(run, w: Window, history: list, bar) -> str | None:
    """Log one closed window (metrics.jsonl, the progress bar or line); the reason to stop, if its non-finite
    steps give one."""
    t = run.cfg.train
    history.append(w)
    run.metrics.write(w.row)
    step = w.row["step"]
    bar.window(progress_line(w.row), progress_line(w.row, short=True), step % (t.log_every * 10) == 0 or w.last)
    if not w.bad_steps:
        return None
    run.log(f"step {step}: non-finite loss or gradient norm at steps {w.bad_steps}: update skipped")
    if t.nan_policy == "stop" or w.max_bad_streak >= t.max_bad_steps:
        return (
            f"stopping: {w.max_bad_streak} consecutive non-finite steps "
            f"(policy {t.nan_policy}, max_bad_steps {t.max_bad_steps})"
        )
    return None


def progress_line(row: dict, short: bool = False) -> str:
    loss = "nan" if row["loss"] is None else f"{row['loss']:.4f}"
    if short:
        return f"loss={loss}, tok_s={row['tokens_per_s']:.3g}"
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.3f}"
    return (
        f"step {row['step']}: loss {loss} lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} "
        f"{row['tokens_per_s']:.0f} tok/s mfu {mfu}"
    )


SUMMARY_SCHEMA = "mlmtrain.summary/3"  # summary.json's keys (README, `mlmtrain train`): a change of meaning bumps it


def summarize(run, windows: list[Window], step: int, last_eval: dict, phase_ms: dict, stopped_by) -> dict:
    """Throughput (median over the log windows after the first, which holds the compile), MFU, memory, losses."""
    history = [w.row for w in windows]
    timed = history[1:] or history  # the first window holds the compile
    tokens_per_s, tflops = (spread([r[key] for r in timed]) for key in ("tokens_per_s", "tflops"))
    mfu = spread([r["mfu"] for r in timed])  # None where the peak is not known
    step_times = [w.elapsed_s / w.steps for w in windows if w.steps]
    return {
        "schema": SUMMARY_SCHEMA,
        "mlmtrain_version": __version__,
        "steps": step,
        "steps_this_run": step - run.step,
        "real_tokens": run.tokens_before + sum(w.real_tokens for w in windows),  # the weights', as state.json's
        "real_tokens_this_run": sum(w.real_tokens for w in windows),
        "tokens_per_s": tokens_per_s and tokens_per_s["median"],  # the job's total
        "tokens_per_s_per_gpu": tokens_per_s and tokens_per_s["median"] / run.world,
        "achieved_tflops": tflops and tflops["median"],  # the same windows' medians: one measurement
        "mfu": mfu and mfu["median"],
        **memory_stats(run.device),
        "final_loss": history[-1]["loss"] if history else None,
        "bad_steps": sum(len(w.bad_steps) for w in windows),  # non-finite steps of this process's windows
        "valid_loss": last_eval.get("valid_loss"),
        "valid_accuracy": last_eval.get("valid_accuracy"),
        "step_time_s": spread(step_times[1:] or step_times),
        "data_wait_s": run.prefetch.wait_s,
        "device_wait_s": sum(r["device_wait_s"] for r in history),
        "phase_ms": phase_ms,
        "stopped_by": stopped_by,
        "precision": run.plan.precision,
        "attention_dropout": run.attention_dropout,  # the fast attention kernels apply none
        "compile": run.plan.compile,
        "tokens_per_batch": run.plan.tokens_per_batch,
        "world_size": run.world,
        "environment": {k: v for k, v in provenance.environment(run.device).items() if k != "command"},
        "losses": [(r["step"], r["loss"]) for r in history],
    }


def eval_line(step: int, result: dict) -> str:
    """The line an evaluation during training logs."""
    if result["valid_loss"] is None:
        return f"step {step}: validation masked no token (the valid split holds too few): no valid loss"
    return f"step {step}: valid loss {result['valid_loss']:.4f} accuracy {result['valid_accuracy']:.3f}"


def closing_lines(run_dir: Path, summary: dict) -> str:
    """What a finished (or stopped) run says last: its numbers, where the checkpoint and summary.json are, and
    the command to run next."""
    loss, valid = summary["final_loss"], summary["valid_loss"]
    numbers = f"{summary['steps']} steps" + (f", loss {loss:.4f}" if loss is not None else "")
    numbers += f", valid loss {valid:.4f}" if valid is not None else ""
    numbers += f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
    saved = [p for p in complete_checkpoints(run_dir) if checkpoint_step(p) <= summary["steps"]]  # this run's
    where = f"checkpoint {saved[-1]}" if saved else "no checkpoint saved (train.checkpoint_at_end is off)"
    lines = [
        f"{'stopped' if summary['stopped_by'] else 'done'}: {numbers}; {where}; summary {run_dir / 'summary.json'}"
    ]
    q = shlex.quote  # the next command is copied into a shell: a path with a space must stay one argument
    if summary["stopped_by"]:
        lines.append(f"next: {train_command(run_dir)}")
    elif saved:
        export = run_dir.parent / (run_dir.name + "-export")
        lines.append(f"next: mlmtrain export --checkpoint {q(str(saved[-1]))} --out {q(str(export))}")
    return "\n".join(lines)
