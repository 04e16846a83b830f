"""`mlmtrain train`: the hand-written pretraining loop. One function, `train()`, read top to bottom:

    shards ──Packer (background thread, pinned)──▶ PackedBatch ──mlm_mask (device)──▶ model ──▶ loss
           ──backward──▶ clip ──▶ fused AdamW (skips non-finite steps on the device) ──▶ log / eval / save

Every host-device sync is marked `# sync:`; between log steps the loop issues device work only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mlmtrain import checkpoint as ckpt
from mlmtrain import distributed as dist
from mlmtrain.config import RunConfig, config_from_dict, load_config
from mlmtrain.data import load_split, read_meta
from mlmtrain.errors import UserError
from mlmtrain.flops import peak_tflops_for, train_flops_per_batch
from mlmtrain.kernels.mlm_mask import max_masked_bound, mlm_mask, word_start_table
from mlmtrain.model import BertConfig, BertForMaskedLM, mlm_loss_sum
from mlmtrain.packing import Packer, Prefetcher
from mlmtrain.preflight import check_data_against_model, check_tokenizer_vocab
from mlmtrain.profiling import PhaseTimer, start_profiler
from mlmtrain.tokenizer import MASK_ID, NUM_SPECIAL, read_vocab, tokenizer_fingerprint

EVAL_KEY = 1 << 40  # masking keys of eval batches live far from the training micro-batch indices


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # "cuda" means this rank's GPU
        device = torch.device("cuda", dist.local_rank())
    return device


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """Fused AdamW; no weight decay on biases and LayerNorm weights (every 1-D parameter)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then linear or cosine decay to min_lr_ratio * lr at max_steps."""
    o, max_steps = cfg.optim, cfg.train.max_steps
    warmup = o.warmup_steps or max(1, int(0.06 * max_steps))
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape)


def resolve(cfg: RunConfig, device: torch.device) -> tuple[str, bool, int]:
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if cfg.train.compile not in ("auto", "on", "off"):
        raise UserError(f"train.compile must be auto, on or off, got {cfg.train.compile!r}")
    use_compile = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    tokens_per_batch = cfg.data.tokens_per_batch or (65536 if device.type == "cuda" else 4096)
    return precision, use_compile, tokens_per_batch


def check_inputs(cfg: RunConfig) -> tuple[dict, list[str]]:
    """Everything that can be wrong with the inputs, found before any device work."""
    if not cfg.data.data_dir or not cfg.data.tokenizer_dir or not cfg.out_dir:
        raise UserError("train needs --data DIR (from `mlmtrain prepare`), --tokenizer DIR and --out RUN_DIR")
    meta = read_meta(cfg.data.data_dir)
    vocab = read_vocab(cfg.data.tokenizer_dir)
    check_tokenizer_vocab(len(vocab), meta["vocab_size"])
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(cfg.data.tokenizer_dir):
        raise UserError(
            f"the shards in {cfg.data.data_dir} were made with a different tokenizer than "
            f"{cfg.data.tokenizer_dir}; run `mlmtrain prepare` again with this tokenizer"
        )
    if cfg.data.pack not in ("sentence", "document"):
        raise UserError(f"data.pack must be sentence or document, got {cfg.data.pack!r}")
    if cfg.optim.grad_accum % dist.world_size():
        raise UserError(
            f"optim.grad_accum={cfg.optim.grad_accum} must be a multiple of the number of "
            f"processes ({dist.world_size()}) so every rank gets the same share of the global batch"
        )
    return meta, vocab


def forward_loss(model, input_ids, position_ids, cu_seqlens, max_seqlen: int, masked_positions, masked_labels):
    """Model + summed MLM loss in one function, so torch.compile fuses the loss into the graph."""
    logits = model(input_ids, position_ids, cu_seqlens, max_seqlen, masked_positions)  # (M, V)
    return mlm_loss_sum(logits, masked_labels)


@torch.no_grad()
def evaluate(model, batches, device, mask_kwargs, max_seqlen, autocast) -> dict:
    """MLM loss, masked-token accuracy and perplexity over fixed valid batches (fixed masking keys)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    targets = torch.zeros((), device=device, dtype=torch.int64)
    for i, host_batch in enumerate(batches):
        b = host_batch.to(device)
        m = mlm_mask(b.input_ids, seed=mask_kwargs["seed"], step=EVAL_KEY + i, **mask_kwargs["rest"])
        with autocast:
            logits = model(m.masked_ids, b.position_ids, b.cu_seqlens, max_seqlen, m.masked_positions)
        s, n = mlm_loss_sum(logits, m.masked_labels)
        loss_sum += s.double()
        targets += n
        correct += ((logits.argmax(-1) == m.masked_labels) & (m.masked_labels != -100)).sum()
    model.train(was_training)
    loss = (loss_sum / targets.clamp(min=1)).item()  # sync: once per eval
    return {
        "valid_loss": loss,
        "valid_accuracy": (correct.double() / targets.clamp(min=1)).item(),
        "valid_ppl": math.exp(min(loss, 50.0)),
        "valid_targets": int(targets.item()),
    }


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, save, exit. Second: exit at once."""

    def __init__(self):
        self.requested = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested} received: finishing this step and saving a checkpoint (send it again to exit at once)",
            file=sys.stderr,
        )

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, resume: str | None = None, log=None) -> dict:
    """Pretrain per `cfg`; returns a summary (throughput, MFU, memory, losses). See docs/ARCHITECTURE.md."""
    # ---- inputs, device, precision: every check before any device work ------------------------------
    meta, vocab = check_inputs(cfg)
    device = pick_device(cfg.train.device)
    rank, world = dist.init(device)  # no-op (0, 1) outside torchrun; NCCL for CUDA, gloo for CPU
    precision, use_compile, T = resolve(cfg, device)
    dist.check_shard(cfg.train.shard, precision)
    is_main = rank == 0
    log = log or (lambda msg: tqdm.write(msg) if is_main else None)
    run_dir = Path(cfg.out_dir)
    max_seqlen = int(meta["max_seq_len"])
    bert_cfg = BertConfig.from_size(
        cfg.model.size,
        vocab_size=len(vocab),
        hidden_dropout_prob=cfg.model.dropout,
        attention_probs_dropout_prob=cfg.model.dropout,
        max_position_embeddings=cfg.model.max_position_embeddings,
    )
    check_data_against_model(meta, bert_cfg, max_seqlen)
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.latest_checkpoint(run_dir if resume == "auto" else resume, log=log)
        check_resume_compatible(start_ckpt, cfg, meta, bert_cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    local_accum = cfg.optim.grad_accum // world  # micro-batches per rank per step
    # whole-word masking selects words, which widens the spread of the masked count: widen the bound by
    # E[k^2]/E[k] over word lengths k in pieces, measured on (the first 1M tokens of) the train shard
    spread = pieces_per_word(load_split(cfg.data.data_dir, "train").tokens, vocab) if cfg.mask.whole_word else 1.0
    max_masked = max_masked_bound(T, cfg.mask.mask_prob, pieces_per_word=spread)

    # ---- model, optimizer, state -------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = BertForMaskedLM(bert_cfg).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, cursor, metrics_mode = 0, (0, 0), "w"
    if start_ckpt is not None:
        state_dict, _, state = ckpt.load_checkpoint_model(start_ckpt)
        ckpt.load_model_weights(model, state_dict)  # full weights on every rank; FSDP shards them in wrap
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        dist.restore_rng(start_ckpt, state, device)  # each rank's own streams at the saved world size
        step, cursor, metrics_mode = state["step"], tuple(state["cursor"]), "a"
        log(f"resuming from {start_ckpt} at step {step}")
    model = dist.wrap(model, cfg.train.shard, device, precision)  # DDP / FSDP2 under torchrun, else unchanged
    optimizer = build_optimizer(model, cfg)  # after wrap: FSDP2 replaces the parameters with sharded ones
    if start_ckpt is not None:
        dist.load_optimizer_state(model, optimizer, start_ckpt, state)  # any saved world size
    # dynamic=False: every shape is static by construction; never let dynamo guess dynamic shapes
    step_fn = torch.compile(forward_loss, dynamic=False) if use_compile else forward_loss
    autocast = torch.autocast(
        device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision), enabled=precision != "fp32"
    )
    mask_rest = dict(
        vocab_size=len(vocab),
        mask_id=MASK_ID,
        num_special=NUM_SPECIAL,
        mask_prob=cfg.mask.mask_prob,
        mask_frac=cfg.mask.mask_frac,
        random_frac=cfg.mask.random_frac,
        max_masked=max_masked,
        word_start=word_start_table(vocab).to(device) if cfg.mask.whole_word else None,
        # Triton on CUDA; on CPU the torch path, bit-identical to the kernel (the Triton
        # interpreter, which tests use, is far slower)
        backend="auto" if device.type == "cuda" else "torch",
    )
    mask_kwargs = {"seed": cfg.train.seed, "rest": mask_rest}

    # ---- data: this rank's micro-batches, built ahead on a thread -----------------------------------
    static = use_compile or device.type == "cuda"  # eager CPU: no padding of cu_seqlens to a fixed capacity
    train_packer = Packer(
        load_split(cfg.data.data_dir, "train"),
        T,
        max_seqlen,
        cfg.train.seed,
        cfg.data.pack,
        rank=rank,
        world_size=world,
        static_shapes=static,
    )
    prefetch = Prefetcher(
        train_packer.batches(cursor, step * cfg.optim.grad_accum, cfg.optim.grad_accum),
        depth=cfg.data.prefetch,
        pin=device.type == "cuda",
    )
    valid_packer = Packer(
        load_split(cfg.data.data_dir, "valid"),
        T,
        max_seqlen,
        cfg.train.seed,
        "sentence",
        loop=False,
        static_shapes=static,
    )
    valid_batches = [b for _, b in zip(range(cfg.train.eval_batches), valid_packer.batches())]

    resolved = cfg.to_dict()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
        log(f"config: {json.dumps(resolved, ensure_ascii=False)}")
        log(
            f"device {device} x{world}, precision {precision}, compile {use_compile}, {T} tokens/micro-batch, "
            f"{cfg.optim.grad_accum} micro-batches/step, model {cfg.model.size} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {max_masked} masked slots/batch"
        )
    metrics = open(run_dir / "metrics.jsonl", metrics_mode, encoding="utf-8") if is_main else None
    peak_tflops = cfg.train.peak_tflops or peak_tflops_for(device, precision)
    stopper = StopSignal()
    nan_steps = {int(x) for x in os.environ.get("MLMTRAIN_TEST_NAN_STEPS", "").split(",") if x.strip()}
    profiler, phase_ms = start_profiler(cfg.train.profile_steps if is_main else "", run_dir), {}

    # ---- the loop ----------------------------------------------------------------------------------
    model.train()
    bad_flags = torch.zeros(cfg.train.log_every, device=device, dtype=torch.bool)  # non-finite steps of the window
    bad_streak = torch.zeros((), device=device, dtype=torch.int64)
    max_streak = torch.zeros((), device=device, dtype=torch.int64)
    loss_window = torch.zeros((), device=device, dtype=torch.float64)
    window_tokens, window_segments, window_flops, window_steps = 0, 0, 0.0, 0
    step_times, history, last_eval, summary_losses = [], [], {}, []
    last_save, t_window, wait_window = time.time(), time.perf_counter(), prefetch.wait_s
    real_tokens_total, steps_done = 0, 0
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    stop_reason = None
    try:
        while step < cfg.train.max_steps:
            dist.test_crash_hook(step + 1)  # test hook (MLMTRAIN_TEST_CRASH_RANK/_STEP): one rank fails
            phase = PhaseTimer(device, enabled=profiler is not None and profiler.active(step))
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []
            for _ in range(local_accum):  # mask every micro-batch first: the loss divides by the step's total
                host_batch = prefetch.get()
                b = host_batch.to(device)  # async copy from pinned memory
                # key = (seed, optimizer step, global token index within the step): the same tokens get the
                # same mask for any world size or micro-batch split, after a resume, on any rank
                offset = (host_batch.index - step * cfg.optim.grad_accum) * T
                m = mlm_mask(b.input_ids, seed=cfg.train.seed, step=step, offset=offset, **mask_rest)
                # static shapes (CUDA, compile): the fixed cap; eager CPU: this batch's longest segment,
                # which shrinks the reference attention's padded grid
                micro.append((b, m, max_seqlen if static else host_batch.max_segment_len))
                cursor = host_batch.cursor_after
                window_tokens += host_batch.num_real_tokens
                window_segments += host_batch.num_segments
                window_flops += train_flops_per_batch(bert_cfg, host_batch, cfg.mask.mask_prob)
            phase.mark("data")
            targets = sum((m.masked_labels != -100).sum() for _, m, _ in micro)  # device scalar, no sync
            targets = dist.all_reduce_sum(targets).clamp(min=1)  # same denominator on every rank
            step_loss = torch.zeros((), device=device, dtype=torch.float32)
            for j, (b, m, batch_seqlen) in enumerate(micro):
                with dist.no_sync(model, last=j == local_accum - 1), autocast:
                    loss_sum, _ = step_fn(
                        model,
                        m.masked_ids,
                        b.position_ids,
                        b.cu_seqlens,
                        batch_seqlen,
                        m.masked_positions,
                        m.masked_labels,
                    )
                    loss = loss_sum * world / targets  # DDP averages over ranks: * world restores the sum
                    if step + 1 in nan_steps:  # test hook (MLMTRAIN_TEST_NAN_STEPS): a numeric fault
                        loss = loss * float("nan")
                phase.mark("forward")
                scaler.scale(loss).backward()
                phase.mark("backward")
                step_loss += loss.detach().float() / world
            step_loss = dist.all_reduce_sum(step_loss)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            grad_norm = dist.full_tensor(grad_norm)  # FSDP: a replicated DTensor
            bad = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
            if precision != "fp16":  # fused AdamW skips the update on the device when found_inf is 1
                optimizer.found_inf = bad.float()
            scaler.step(optimizer)  # fp16: the GradScaler skips non-finite steps and lowers the scale
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            phase.mark("optimizer")
            bad_flags[step % cfg.train.log_every] = bad
            bad_streak = (bad_streak + 1) * bad
            max_streak = torch.maximum(max_streak, bad_streak)
            loss_window += torch.where(bad, 0.0, step_loss.double())
            step += 1
            steps_done += 1
            window_steps += 1
            bar.update(1)
            if profiler is not None:
                profiler.step(step, phase, phase_ms)

            # ---- log, eval, checkpoint: the only places the host waits for the device ----------------
            last = step == cfg.train.max_steps
            # every rank must take the same stop/save decisions: with several processes they are taken at
            # log steps only, from the requests all-reduced there (one process: at any step)
            stop_now = stopper.requested if world == 1 else None
            time_due = world == 1 and time.time() - last_save > cfg.train.checkpoint_minutes * 60
            if step % cfg.train.log_every == 0 or last or stop_now:
                n_bad = int(bad_flags[:window_steps].sum().item())  # sync: once per log window
                # sync (several processes): job totals of the window, and whether any rank got a signal
                # or thinks a timed checkpoint is due
                totals = dist.sum_over_ranks(
                    device,
                    window_tokens,
                    window_segments,
                    window_flops,
                    stopper.requested is not None,
                    time.time() - last_save > cfg.train.checkpoint_minutes * 60,
                )
                window_tokens, window_segments, window_flops = int(totals[0]), int(totals[1]), totals[2]
                if totals[3] and not stopper.requested:
                    stopper.requested = "a signal to another rank"
                stop_now, time_due = stopper.requested, totals[4] > 0
                elapsed = time.perf_counter() - t_window
                good = window_steps - n_bad
                row = {
                    "step": step,
                    "loss": (loss_window / good).item() if good else None,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": window_tokens / elapsed,  # the job's: all ranks
                    "tokens_per_s_per_gpu": window_tokens / elapsed / world,
                    "samples_per_s": window_segments / elapsed,
                    "tflops": window_flops / elapsed / 1e12,  # the job's
                    "tflops_per_gpu": window_flops / elapsed / 1e12 / world,
                    "mfu": (window_flops / elapsed / 1e12 / (peak_tflops * world)) if peak_tflops else None,
                    "data_wait_s": prefetch.wait_s - wait_window,
                    "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    "bad_steps": n_bad,
                    "time": time.time(),
                }
                if n_bad:
                    flags = bad_flags[:window_steps].tolist()  # one transfer, not one per step of the window
                    bad_steps = [step - window_steps + i + 1 for i, bad_i in enumerate(flags) if bad_i]
                    log(f"step {step}: non-finite loss or gradient norm at steps {bad_steps}: update skipped")
                    if cfg.train.nan_policy == "stop" or int(max_streak.item()) >= cfg.train.max_bad_steps:
                        stop_reason = (
                            f"stopping: {int(max_streak.item())} consecutive non-finite steps "
                            f"(policy {cfg.train.nan_policy}, max_bad_steps {cfg.train.max_bad_steps})"
                        )
                if window_steps >= 2 or last:
                    step_times.append(elapsed / window_steps)
                history.append(row)
                summary_losses.append(row["loss"])
                real_tokens_total += window_tokens
                write_metrics(metrics, row)
                bar.set_postfix(
                    loss="nan" if row["loss"] is None else f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.3g}"
                )
                if is_main and (step % (cfg.train.log_every * 10) == 0 or last):
                    log(
                        f"step {step}: loss {row['loss'] or float('nan'):.4f} lr {lr:.2e} "
                        f"grad_norm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s "
                        f"mfu {row['mfu'] if row['mfu'] is None else round(row['mfu'], 3)}"
                    )
                window_tokens, window_segments, window_flops, window_steps = 0, 0, 0.0, 0
                loss_window.zero_()
                bad_flags.zero_()
                t_window, wait_window = time.perf_counter(), prefetch.wait_s
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last or stop_reason:
                last_eval = evaluate(model, valid_batches, device, mask_kwargs, max_seqlen, autocast)
                write_metrics(metrics, {"step": step, **last_eval})
                log(f"step {step}: valid loss {last_eval['valid_loss']:.4f} accuracy {last_eval['valid_accuracy']:.3f}")
                t_window = time.perf_counter()  # eval time is not training throughput
            due = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or time_due
            if due or (last and cfg.train.checkpoint_at_end) or stop_now or stop_reason:
                state = {
                    "cursor": list(cursor),
                    "metrics": last_eval,
                    "command": " ".join(sys.argv),
                    "data_fingerprint": data_fingerprint(meta),
                    "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
                    "valid_loss": last_eval.get("valid_loss"),
                    "real_tokens": real_tokens_total,
                }
                dist.save_checkpoint(
                    run_dir,
                    step,
                    model,
                    resolved,
                    state,
                    optimizer,
                    scaler.state_dict() if precision == "fp16" else None,
                    cfg.train.keep_checkpoints,
                )
                last_save = time.time()
                t_window = time.perf_counter()
            if stop_reason:
                log(stop_reason)
                break
            if stop_now:
                log(
                    f"stopped by {stop_now} after step {step}; checkpoint saved. Resume with: "
                    f"mlmtrain train --config {run_dir / 'config.json'} --resume"
                )
                break
    finally:
        bar.close()
        prefetch.close()
        stopper.restore()
        if metrics:
            metrics.close()
        if profiler is not None:
            profiler.close(phase_ms)
    steady = step_times[1:] or step_times
    tokens_per_s = [r["tokens_per_s"] for r in history[1:]] or [r["tokens_per_s"] for r in history]
    summary = {
        "steps": step,
        "steps_this_run": steps_done,
        "real_tokens": real_tokens_total,
        "tokens_per_s": sorted(tokens_per_s)[len(tokens_per_s) // 2] if tokens_per_s else None,  # job total
        "tokens_per_s_per_gpu": sorted(tokens_per_s)[len(tokens_per_s) // 2] / world if tokens_per_s else None,
        "achieved_tflops": history[-1]["tflops"] if history else None,
        "mfu": history[-1]["mfu"] if history else None,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "final_loss": summary_losses[-1] if summary_losses else None,
        "valid_loss": last_eval.get("valid_loss"),
        "valid_accuracy": last_eval.get("valid_accuracy"),
        "step_time_s": {"min": min(steady), "median": sorted(steady)[len(steady) // 2], "max": max(steady)}
        if steady
        else None,
        "data_wait_s": prefetch.wait_s,
        "phase_ms": phase_ms,
        "stopped_by": stopper.requested or stop_reason,
        "precision": precision,
        "compile": use_compile,
        "tokens_per_batch": T,
        "world_size": world,
        "losses": [(r["step"], r["loss"]) for r in history],
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    dist.barrier()
    return summary


def pieces_per_word(tokens, vocab: list[str], sample: int = 1 << 20) -> float:
    """E[k^2]/E[k] of word lengths k (in WordPiece pieces) over a prefix of the shard."""
    import numpy as np

    is_start = word_start_table(vocab).numpy()[np.asarray(tokens[:sample], dtype=np.int64)]
    k = np.diff(np.flatnonzero(is_start)).astype(np.float64)
    return max(1.0, float((k * k).mean() / k.mean())) if k.size else 1.0


def data_fingerprint(meta: dict) -> str:
    keys = ("vocab_size", "tokenizer_fingerprint", "max_seq_len", "seed", "valid_fraction")
    body = json.dumps(
        {k: meta.get(k) for k in keys} | {"train": meta.get("train"), "valid": meta.get("valid")}, sort_keys=True
    )
    import hashlib

    return hashlib.sha256(body.encode()).hexdigest()[:16]


def check_resume_compatible(start: Path, cfg: RunConfig, meta: dict, bert_cfg: BertConfig) -> None:
    """Refuse to resume on other data, another tokenizer or another model shape."""
    _, saved_config, state = ckpt.load_checkpoint_model(start)
    problems = []
    if state.get("data_fingerprint") != data_fingerprint(meta):
        problems.append(f"the data shards differ from those it was trained on ({cfg.data.data_dir})")
    if state.get("tokenizer_fingerprint") != meta["tokenizer_fingerprint"]:
        problems.append("the tokenizer differs")
    saved_model = saved_config.get("model", {})
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        if saved_model.get(key) != getattr(bert_cfg, key):
            problems.append(f"model {key} is {getattr(bert_cfg, key)} but the checkpoint has {saved_model.get(key)}")
    saved_run = config_from_dict(saved_config.get("run", {}))
    if (saved_run.data.tokens_per_batch, saved_run.optim.grad_accum) != (
        cfg.data.tokens_per_batch,
        cfg.optim.grad_accum,
    ):
        problems.append("tokens_per_batch or grad_accum differ (the data cursor would not line up)")
    if problems:
        raise UserError(f"cannot resume from {start}: " + "; ".join(problems))


def write_metrics(f, row: dict) -> None:
    if f is not None:
        f.write(json.dumps(row) + "\n")
        f.flush()


# ---- command line -----------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument("--data", help="token shards from `mlmtrain prepare` (data.data_dir)")
    p.add_argument("--tokenizer", help="tokenizer folder the shards were made with (data.tokenizer_dir)")
    p.add_argument("--out", help="run folder: metrics.jsonl, checkpoints/, config.json (out_dir)")
    p.add_argument("--model", choices=["tiny", "mini", "small", "base", "large"], help="model size (model.size)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument(
        "--tokens-per-batch", type=int, help="tokens per micro-batch per process (default 65536 on CUDA, 4096 on CPU)"
    )
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and masking (train.seed)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="bf16 (CUDA default), fp16 with loss scaling, fp32 (CPU default)",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="do not torch.compile the model (compile is on by default on CUDA)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile also on CPU")
    p.add_argument("--whole-word-mask", action="store_true", help="mask all WordPiece pieces of a word together")
    p.add_argument(
        "--pack",
        choices=["sentence", "document"],
        help="segments of one sentence, or document neighbours up to max_seq_len",
    )
    p.add_argument(
        "--profile-steps", metavar="A:B", help="trace steps A..B-1 with torch.profiler and print a per-phase table"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from the newest complete checkpoint in --out (or from PATH)",
    )
    p.add_argument("--nproc", type=int, help="processes on this machine: re-runs itself under torchrun")
    p.add_argument("--config", help="TOML run config (see trainer/configs/); flags and --set override it")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. optim.lr=3e-4"
    )


def config_from_args(args) -> RunConfig:
    overrides = {
        "data.data_dir": args.data,
        "data.tokenizer_dir": args.tokenizer,
        "out_dir": args.out,
        "model.size": args.model,
        "train.max_steps": args.max_steps,
        "data.tokens_per_batch": args.tokens_per_batch,
        "train.seed": args.seed,
        "train.precision": args.precision,
        "train.compile": "off" if args.no_compile else ("on" if args.compile else None),
        "mask.whole_word": True if args.whole_word_mask else None,
        "data.pack": args.pack,
        "train.profile_steps": args.profile_steps,
    }
    return load_config(args.config, overrides, args.set)


def main(args) -> int:
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return dist.exec_torchrun(args.nproc)
    cfg = config_from_args(args)
    with dist.name_failing_rank():
        summary = train(cfg, resume=args.resume)
    if dist.rank() == 0:
        print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "valid_loss", "tokens_per_s", "mfu")}))
    dist.shutdown()
    return 0
