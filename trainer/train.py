"""`mlmtrain train`: the hand-written pretraining loop. `setup()` checks every input and builds the run;
`train()` is the loop, read top to bottom:

    shards ─Packer (prefetch thread or process, pinned)─▶ PackedBatch ─mlm_mask (device)─▶ model ─▶ summed CE / targets
           ─backward─▶ clip ─▶ fused AdamW (skips non-finite steps on the device) ─▶ log / eval / save

Every host-device sync is marked `# sync:`; between log steps the loop issues device work only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mlmtrain import checkpoint, parallel, run_folder
from mlmtrain.attention import choose_impl, dropout_note, has_dropout
from mlmtrain.config import RunConfig, auto_warmup, format_config, report_targets, torch_dtype
from mlmtrain.evaluate import masker, score
from mlmtrain.fast_paths import FastPaths, compile_kwargs, cpu_note, fused_ops_note
from mlmtrain.files import write_json
from mlmtrain.flops import peak_tflops_for, train_flops_per_batch
from mlmtrain.fp8 import convert_to_fp8
from mlmtrain.kernels.mlm_mask import IGNORE_INDEX, max_masked_bound, pieces_per_word, word_start_table
from mlmtrain.metrics import (
    MetricsLog,
    WindowStats,
    eval_line,
    record_window,
    summarize,
)
from mlmtrain.model import BertForMaskedLM, mlm_loss_sum
from mlmtrain.packing import BatchStream, PackedBatch, Packer, RowPacker
from mlmtrain.plan import Plan, check_inputs, plan_run, start_check
from mlmtrain.prefetch import Prefetcher, ProcessPrefetcher
from mlmtrain.prepare import load_split, shard_specials
from mlmtrain.pretrained import hub_id
from mlmtrain.profiling import no_phase, start_profiler
from mlmtrain.progress import StepProgress, quiet
from mlmtrain.stop import StopSignal, exit_code


def train(cfg: RunConfig, resume: str | None = None, log=None, change_max_steps: bool = False) -> dict:
    """Pretrain per `cfg`; returns a summary (throughput, MFU, memory, losses, the CLI's exit code). See
    docs/ARCHITECTURE.md. A run asked to resume that has reached max_steps is left as it is."""
    try:
        run = setup(cfg, resume, log, change_max_steps)
    except run_folder.RunFinished as done:
        if parallel.rank() == 0:
            (log or print)(str(done))
        return done.summary
    t, model, world = cfg.train, run.model, run.world
    window = WindowStats(run.device, t.log_every, world, run.peak_tflops, run.prefetch, deferred=t.async_log_reads)
    stopper = StopSignal()
    profiler = start_profiler(t, run.step, run.dir / "profile", run.device, run.rank, world, run.log)
    phase = profiler.phase if profiler is not None else no_phase  # record_function ranges, only when profiling
    step, cursor, history, last_eval, stop_reason, phase_ms = run.step, run.cursor, [], {}, None, {}
    last_save = time.time()
    bar = StepProgress(t.max_steps, step, run.is_main, run.log)  # a bar on a terminal, plain lines elsewhere
    try:
        while step < t.max_steps:
            lr = lr_at(step, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # ---- one optimizer step: mask every micro-batch first, since the loss divides by the step's targets
            micro = []
            for _ in range(run.local_accum):
                phase("data")
                host_batch = run.prefetch.get()
                b = host_batch.to(run.device)  # async copy from pinned memory
                # key = (seed, optimizer step, global token index within the step): the same tokens get the same
                # mask at any world size (the same global micro-batches dealt to other ranks), after a resume
                offset = (host_batch.index - step * cfg.optim.grad_accum) * run.plan.tokens_per_batch
                phase("mask")
                m = run.mask(b.input_ids, step=step, offset=offset)
                micro.append((b, m, run.plan.max_seqlen if run.static else host_batch.max_segment_len))
                cursor = host_batch.cursor_after
                window.add_batch(
                    host_batch, train_flops_per_batch(run.plan.model_config, host_batch, cfg.mask.mask_prob)
                )
            targets = sum((m.masked_labels != IGNORE_INDEX).sum() for _, m, _ in micro)  # device scalar, no sync
            targets = parallel.all_reduce_sum(targets).clamp(min=1)  # the same denominator on every rank
            step_loss = torch.zeros((), device=run.device, dtype=torch.float32)
            for j, (b, m, seqlen) in enumerate(micro):
                phase("forward")
                if t.cuda_graphs:  # a new replay may overwrite the last one's outputs: they were used above
                    torch.compiler.cudagraph_mark_step_begin()
                # backward inside no_sync too: FSDP2 reads it in its post-backward hook (DDP in the forward)
                with parallel.no_sync(model, last=j == run.local_accum - 1):
                    with run.autocast:
                        args = (m.masked_ids, b.position_ids, b.cu_seqlens, seqlen, m.masked_positions, m.masked_labels)
                        loss = run.step_fn(model, *args, b.segment_ids)[0] * world / targets  # DDP averages: * world
                    phase("backward")
                    run.scaler.scale(loss).backward()
                step_loss += loss.detach().float() / world
            phase("optimizer")
            step_loss = parallel.all_reduce_sum(step_loss)
            run.scaler.unscale_(run.optimizer)
            grad_norm = parallel.full_tensor(clip_gradients(model, cfg.optim.grad_clip))  # FSDP: a replicated DTensor
            bad = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
            if run.plan.precision != "fp16":  # fused AdamW skips the update on the device when found_inf is 1
                run.optimizer.found_inf = bad.float()
            run.scaler.step(run.optimizer)  # fp16: the GradScaler skips non-finite steps and lowers the scale
            run.scaler.update()
            if run.plan.precision == "fp16":  # an overflow the scaler backed off from is routine, until it is below 1
                bad = ~torch.isfinite(step_loss) | (bad & (run.scaler._get_scale_async() < 1))
            run.optimizer.zero_grad(set_to_none=True)
            window.add_step(step_loss, bad, grad_norm)
            step += 1
            bar.update()
            if profiler is not None:  # the trace's export, after its last step, is no training time
                window.exclude(profiler.step())  # sync: with --profile-steps, twice per run (Profiler._drain)

            # ---- log, eval, checkpoint: the only places the host waits for the device
            last = step == t.max_steps
            timed = time.time() - last_save > t.checkpoint_minutes * 60
            # stop and timed-save decisions, taken at every step by every rank together (a host-side all-reduce)
            stop_now, time_due = parallel.agree_stop(stopper.requested, timed)
            stopper.join(stop_now)  # every rank exits with the code of the signal the job got
            eval_cadence = t.eval_every and step % t.eval_every == 0
            save_every = t.checkpoint_every and step % t.checkpoint_every == 0
            # windows close at log steps and before evals and saves: those are in no window, a resume redoes whole ones
            if step % t.log_every == 0 or last or stop_now or eval_cadence or save_every or time_due:
                # sync: the window's device numbers in one transfer (and, with several processes, one all-reduce);
                # with train.async_log_reads the transfer is read one window later (the window before is logged)
                for w in window.close(step, lr, last):
                    stop_reason = record_window(run, w, history, bar) or stop_reason
            save_cadence = save_every or time_due
            if last or stop_now or stop_reason or eval_cadence or save_cadence:  # the device will be waited for
                for w in window.flush():  # sync: with async_log_reads, the window still in flight
                    stop_reason = record_window(run, w, history, bar) or stop_reason
            if profiler is not None and (last or stop_now or stop_reason):  # the final eval and save are no step
                phase_ms = profiler.close()
            if eval_cadence or last or stop_reason:
                last_eval = {"step": step, **evaluate(run)}  # sync: once per eval; a checkpoint records its step
                run.metrics.write(last_eval)
                run.log(eval_line(step, last_eval))
                window.restart_clock()  # eval time is not training throughput
            if save_cadence or (last and t.checkpoint_at_end) or stop_now or stop_reason:
                seen = run.tokens_before + sum(w.real_tokens for w in history)  # a save closed its window above
                run.save(step, cursor, last_eval, seen)  # sync: state to the host
                last_save = time.time()
                window.restart_clock()
            if stop_reason or (stop_now and not last):  # a stop at the last step stops nothing: the run is done
                run.log(
                    stop_reason
                    or f"stopped by {stop_now} after step {step}; checkpoint saved. Resume with: "
                    f"{checkpoint.train_command(run.dir)}"
                )
                break
    except BaseException:
        run.close()
        raise
    finally:
        bar.close()
        run.prefetch.close()  # the packer (thread or process) ends with the loop, however the loop ends
        stopper.restore()
        if profiler is not None:
            phase_ms = profiler.close()
    stopped_by = stopper.stop if step < t.max_steps else None  # the agreed stop; one after the last step is none
    summary = summarize(run, history, step, last_eval, phase_ms, stopped_by or stop_reason)
    summary["exit_code"] = exit_code(stopped_by, stop_reason)
    if run.is_main:
        write_json(run.dir / "summary.json", {**summary, "config": {**run.cfg.to_dict(), "resolved": run.resolved}})
    run.metrics.finish(summary)
    run.close()  # the run folder's lock goes last: summary.json is this run's
    parallel.barrier()
    return summary


# ---------------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything `setup` builds for the loop: where it runs, the model and its optimizer, the data, the masking."""

    cfg: RunConfig
    plan: Plan  # precision, compile, tokens per batch, max segment length, model shape: resolved before device work
    dir: Path
    device: torch.device
    rank: int
    world: int
    static: bool  # fixed shapes (CUDA or compile): cu_seqlens padded to a fixed capacity, max_seqlen fixed
    local_accum: int  # micro-batches per optimizer step on this rank
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step_fn: object  # forward_loss, compiled or not
    autocast: torch.autocast
    mask: functools.partial  # mlm_mask with every setting but the per-call (step, offset) key
    prefetch: Prefetcher | ProcessPrefetcher
    valid_batches: list
    meta: dict
    step: int  # the first step this process runs (a resumed run's saved step)
    cursor: tuple[int, int]
    metrics: MetricsLog
    peak_tflops: float
    log: object
    folder: run_folder.RunFolder | None = None  # the run folder's lock (rank 0)
    tokens_before: int = 0  # real tokens the resumed checkpoint's weights had seen (the job's)
    commands_before: tuple[str, ...] = ()  # the command lines that trained the resumed checkpoint, in order

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def attention_dropout(self) -> float:
        """The dropout on attention probabilities the training forward applies (the fast kernels have none)."""
        return self.cfg.model.dropout if has_dropout(self.attention) else 0.0

    @property
    def attention(self) -> str:
        """The attention the training forward runs (`attention.choose_impl` on this run's settings)."""
        rows = self.cfg.data.layout == "rows"
        return choose_impl(
            self.cfg.model.attention, self.device, torch_dtype(self.plan.precision), rows, self.plan.compile
        )

    @property
    def resolved(self) -> dict:
        """What the settings that can say `auto` (or 0 = auto) came to on this run, by dotted config key."""
        return {
            "train.device": str(self.device),
            "train.precision": self.plan.precision,
            "train.compile": "on" if self.plan.compile else "off",
            "data.tokens_per_batch": self.plan.tokens_per_batch,
            "optim.warmup_steps": warmup_steps(self.cfg),
            "train.peak_tflops": self.peak_tflops,
            "model.attention": self.attention,  # the training forward's (the card says whether it has dropout)
        }

    def save(self, step: int, cursor, last_eval: dict, real_tokens: int) -> None:
        state = {
            "cursor": list(cursor),
            "metrics": last_eval,
            "command": parallel.command_line(),
            "commands": [*self.commands_before, parallel.command_line()],  # every command these weights went through
            "data_fingerprint": checkpoint.data_fingerprint(self.meta),
            "tokenizer_fingerprint": self.meta["tokenizer_fingerprint"],
            "valid_loss": last_eval.get("valid_loss"),
            "real_tokens": real_tokens,
            "init_from": self.cfg.model.init_from or None,
            "base_model": hub_id(self.cfg.model.init_from) if self.cfg.model.init_from else None,
            "resolved": self.resolved,
            "attention_dropout": self.attention_dropout,
        }
        scaler_state = self.scaler.state_dict() if self.plan.precision == "fp16" else None
        checkpoint.save_checkpoint(
            self.dir,
            step,
            self.model,
            self.optimizer,
            self.cfg.to_dict(),
            state,
            scaler_state,
            self.cfg.train.keep_checkpoints,
        )

    def close(self) -> None:
        self.prefetch.close()
        self.metrics.close()
        if self.folder is not None:
            self.folder.close()


def setup(cfg: RunConfig, resume: str | None = None, log=None, change_max_steps: bool = False) -> Run:
    """Check every input and take the run folder before any device work, then build the model, optimizer,
    data and masking."""
    meta, vocab = check_inputs(cfg)
    log = log or (lambda msg: tqdm.write(msg) if parallel.rank() == 0 else None)
    main = parallel.rank() == 0
    check_start = start_check(cfg, meta, vocab)
    folder = run_folder.open_run_folder(
        cfg, resume, main=main, log=log, change_max_steps=change_max_steps, lr_at=lr_at, check_start=check_start
    )
    try:
        return _build(cfg, folder, meta, vocab, log)
    except BaseException:
        folder.close(failed=True)
        raise


def _build(cfg: RunConfig, folder: run_folder.RunFolder, meta: dict, vocab: list[str], log) -> Run:
    start, run_dir, specials = folder.start, Path(cfg.out_dir), shard_specials(meta)
    device = parallel.rank_device(cfg.train.device)
    rank, world = parallel.init(device)  # no-op (0, 1) outside torchrun; NCCL for CUDA, gloo for CPU
    plan = plan_run(cfg, meta, vocab, start, device, world)
    precision, use_compile, T, max_seqlen = plan.precision, plan.compile, plan.tokens_per_batch, plan.max_seqlen
    model_config, pretrained = plan.model_config, plan.pretrained
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32

    # ---- model, optimizer, state
    torch.manual_seed(cfg.train.seed)
    fast = FastPaths(residual_dtype=cfg.model.residual_dtype, fused_ops=cfg.model.fused_ops)
    model = BertForMaskedLM(model_config, attn_impl=cfg.model.attention, fast=fast)
    if pretrained is not None:  # a fresh optimizer and data cursor: only the weights carry over
        pretrained.load_into(model)
        log(f"initialised from {cfg.model.init_from}: {pretrained.describe()}")
        plan = dataclasses.replace(plan, pretrained=None)  # its weights are the model's now: the Run keeps no copy
    model = model.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, cursor, tokens_before, own_streams, commands_before = 0, (0, 0), 0, rank == 0, ()
    if start is not None:
        weights, _, state = checkpoint.read_checkpoint(start)
        model.load_hf_state_dict(weights)  # full weights on every rank; FSDP shards them in wrap
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        own_streams = checkpoint.restore_rng(start, state, device) or rank == 0  # each rank's, at the saved world
        step, cursor, tokens_before = folder.step, tuple(state["cursor"]), state.get("real_tokens") or 0
        commands_before = tuple(state.get("commands") or ([state["command"]] if state.get("command") else []))
        log(f"resuming from {start} at step {step}")
    if not own_streams:  # dropout masks of this rank's own (one seed gave every replica the same masks); the
        torch.manual_seed((cfg.train.seed + 1_000_003 * rank) % 2**64)  # weights were made before, alike on all ranks
    if cfg.train.fp8 != "off":  # after loading: the converted layers keep the parameters (and their names)
        log(f"fp8 ({cfg.train.fp8}): {len(convert_to_fp8(model, cfg.train.fp8))} linear layers converted")
    model = parallel.wrap(model, cfg.train.shard, device, precision)  # DDP / FSDP2 under torchrun
    optimizer = build_optimizer(model, cfg)  # after wrap: FSDP2 replaces the parameters with sharded ones
    if start is not None:
        checkpoint.load_optimizer_state(model, optimizer, start, state)  # any saved world size
    # dynamic=False: every shape is static by construction; never let dynamo guess dynamic shapes.
    settings = compile_kwargs(cfg.train)  # CUDA graphs and/or autotuning
    step_fn = torch.compile(forward_loss, dynamic=False, **settings) if use_compile else forward_loss
    dtype = torch_dtype(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

    # ---- masking: whole-word masking selects words, which widens the spread of the masked count, so the
    # bound on masked slots grows by E[k^2]/E[k] over word lengths k (in pieces) measured on the train shard
    spread_factor = (
        pieces_per_word(load_split(cfg.data.data_dir, "train", check=False).tokens, vocab)
        if cfg.mask.whole_word
        else 1.0
    )
    mask = masker(
        specials,
        len(vocab),
        cfg.mask,
        cfg.train.seed,
        max_masked_bound(T, cfg.mask.mask_prob, pieces_per_word=spread_factor),
        device,
        word_start=word_start_table(vocab).to(device) if cfg.mask.whole_word else None,
    )

    # ---- data: this rank's micro-batches, built ahead on a thread (started last: nothing before it may leak it)
    static = use_compile or device.type == "cuda"  # eager CPU: cu_seqlens holds only the segments used
    packer = RowPacker if cfg.data.layout == "rows" else Packer
    valid_packer = packer(load_split(cfg.data.data_dir, "valid", check=False), T, max_seqlen, cfg.train.seed,
                          cfg.data.pack, loop=False, static_shapes=static, specials=specials)  # fmt: skip
    valid_batches = [b for _, b in zip(range(cfg.train.eval_batches), valid_packer.batches())]
    if rank == 0:
        write_json(run_dir / "config.json", cfg.to_dict())
    resumed_at = step if start is not None else None
    metrics = MetricsLog(run_dir / "metrics.jsonl" if rank == 0 else None, start is not None, resumed_at)
    if metrics.dropped:
        log(f"metrics.jsonl: dropped {metrics.dropped} lines of steps after {step}, which this run redoes")
    stream = BatchStream(cfg.data.data_dir, cfg.data.layout == "rows", T, max_seqlen, cfg.train.seed, cfg.data.pack,
                         rank, world, static, specials, cursor, step * cfg.optim.grad_accum, cfg.optim.grad_accum,
                         len(vocab))  # fmt: skip
    pin = PackedBatch.pin_memory if device.type == "cuda" else None  # page-locked in the process that copies
    if cfg.data.packer == "process":
        prefetch = ProcessPrefetcher(stream, stream.batch_bytes(), cfg.data.prefetch, then=pin, name="packer")
    else:
        prefetch = Prefetcher(stream, depth=cfg.data.prefetch, transform=pin, name="packer")
    run = Run(
        cfg=cfg,
        plan=plan,
        dir=run_dir,
        device=device,
        rank=rank,
        world=world,
        static=static,
        local_accum=cfg.optim.grad_accum // world,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        step_fn=step_fn,
        autocast=autocast,
        mask=mask,
        prefetch=prefetch,
        valid_batches=valid_batches,
        meta=meta,
        step=step,
        cursor=cursor,
        metrics=metrics,
        peak_tflops=cfg.train.peak_tflops or peak_tflops_for(device, precision),
        log=log,
        folder=folder,
        tokens_before=tokens_before,
        commands_before=commands_before,
    )
    if rank == 0:
        if not quiet():
            params, name = sum(p.numel() for p in model.parameters()) / 1e6, cfg.model.init_from or cfg.model.size
            log(format_config(cfg, run.resolved))
            log(f"device {device} x{world}, precision {precision}, compile {use_compile}, {T} token slots/micro-batch "
                f"([PAD] included), {cfg.optim.grad_accum} micro-batches/step, model {name} ({params:.1f}M params), "
                f"{mask.keywords['max_masked']} masked slots/batch")  # fmt: skip
        notes = (dropout_note(run.attention, cfg.model.dropout), fused_ops_note(cfg.model.fused_ops, device),
                 warmup_note(cfg), cpu_note(device, precision, use_compile))  # fmt: skip
        for note in notes:
            if note:
                log(note)
        metrics.open_trackers(report_targets(cfg.train.report_to), {**cfg.to_dict(), "resolved": run.resolved}, step)
    return run


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """Fused AdamW; no weight decay on biases and LayerNorm weights (every 1-D parameter)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


# ---------------------------------------------------------------------------------------------------- the step


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The gradients' total norm (a device scalar), after scaling them to `max_norm` when it is > 0 (0: no
    clipping, and no pass over the gradients to multiply them by 1)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then linear or cosine decay to min_lr_ratio * lr at max_steps."""
    o, max_steps = cfg.optim, cfg.train.max_steps
    warmup = warmup_steps(cfg)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape)


def warmup_steps(cfg: RunConfig) -> int:
    """optim.warmup_steps, or 6% of max_steps when it is 0 (auto)."""
    return cfg.optim.warmup_steps or auto_warmup(cfg.train.max_steps)


def warmup_note(cfg: RunConfig) -> str | None:
    """One line for a warm-up as long as the run or longer: the learning rate never reaches optim.lr."""
    if cfg.optim.warmup_steps < cfg.train.max_steps:
        return None
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    return (f"optim.warmup_steps {warmup} >= train.max_steps {steps}: the learning rate never reaches its peak "
            f"{cfg.optim.lr} (optim.warmup_steps = 0 warms up over 6% of the steps)")  # fmt: skip


def forward_loss(
    model, input_ids, position_ids, cu_seqlens, max_seqlen: int, masked_positions, masked_labels, segment_ids=None
):
    """Model + summed MLM loss in one function, so torch.compile fuses the loss into the graph."""
    logits = model(input_ids, position_ids, cu_seqlens, max_seqlen, masked_positions, segment_ids)  # (M, V)
    return mlm_loss_sum(logits, masked_labels)


def evaluate(run: Run) -> dict:
    """MLM loss, masked-token accuracy and perplexity over fixed valid batches (fixed masking keys)."""
    result = score([run.model], run.valid_batches, run.mask, run.device, run.autocast, run.plan.max_seqlen)[0]
    return {f"valid_{key}": result[key] for key in ("loss", "accuracy", "ppl", "targets")}
