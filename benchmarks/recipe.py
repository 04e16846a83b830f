"""The HF Trainer baseline, the recipe the blog post runs: transformers `Trainer` + `BertForMaskedLM` (sdpa attention) +
`DataCollatorForLanguageModeling` (15% masking, 80/10/10), dynamic padding per batch, bf16 autocast on CUDA
(fp32 on CPU), random sampling (no group_by_length). This is the baseline our trainer is measured against.

Fairness rules, so the comparison says something:
- the same sentence lines, tokenized by the same tokenizer (`AutoTokenizer` on our tokenizer folder);
- stopped after the same number of REAL tokens (sum of attention_mask: [CLS], [SEP] and words; not [PAD]);
- the same model size and config (our `BertConfig.to_hf_dict()`), the same optimizer settings
  (AdamW, lr, betas, eps, weight decay, warmup, linear decay, clipping), the same number of optimizer steps
  (micro-batches of at most `max_micro_batch` sentences, gradient accumulation up to the step size);
- validation loss from one evaluator (`mlm_eval`) on the same held-out sentences with the same masks, for
  both models (ours is loaded into transformers' `BertForMaskedLM` from its checkpoint).

Fully offline: the model is built from a config (no download), `report_to="none"`, nothing saved.
Needs `accelerate` (the Trainer requires it): `mlmtrain bench` refuses the train section without it, before any
work; a direct caller of `run_recipe` gets the ImportError.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch


def _transformers():
    import transformers  # imported on use: `mlmtrain bench --help` and the other sections do not need it

    return transformers


def tokenize_until(tokenizer, lines: list[str], real_tokens: int, max_length: int) -> list[dict]:
    """Tokenize `lines` in order (cycling if needed) until the examples hold at least `real_tokens` real
    tokens; each distinct line is tokenized once (tokenization is deterministic, so repeats reuse it)."""
    if not lines:
        raise ValueError("no sentences to train the recipe on")
    cache: dict[str, dict] = {}
    examples, total, i = [], 0, 0
    while total < real_tokens:
        line = lines[i % len(lines)]
        if line not in cache:
            enc = tokenizer(line, truncation=True, max_length=max_length)
            cache[line] = {k: list(v) for k, v in enc.items()}
        examples.append(cache[line])
        total += sum(cache[line]["attention_mask"])
        i += 1
    return examples


def hf_config(model_config):
    """transformers.BertConfig from our `mlmtrain.model.BertConfig`, with sdpa attention."""
    tf = _transformers()
    return tf.BertConfig(**model_config.to_hf_dict(), attn_implementation="sdpa")


def hf_model(model_config):
    tf = _transformers()
    model = tf.BertForMaskedLM(hf_config(model_config))
    model.config._attn_implementation = "sdpa"  # explicit: some versions only read it from from_pretrained
    return model


def hf_model_from_checkpoint(path: str | Path):
    """Our checkpoint (run folder or one checkpoint) loaded into transformers' BertForMaskedLM, so both
    models are evaluated by the same code. Only the tied aliases may be missing from the file."""
    from mlmtrain.checkpoint import read_latest
    from mlmtrain.model import HF_BUFFER_KEYS, TIED_KEYS, BertConfig

    ckpt, state_dict, config, _ = read_latest(path, log=lambda *_: None)
    model = hf_model(BertConfig.from_dict(config["model"]))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in TIED_KEYS]
    unexpected = [k for k in unexpected if k not in HF_BUFFER_KEYS]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt} does not load into transformers: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    emb, dec = model.bert.embeddings.word_embeddings.weight, model.cls.predictions.decoder.weight
    if emb.data_ptr() != dec.data_ptr() and not torch.equal(emb, dec):
        raise RuntimeError("decoder weight is not tied to the word embeddings after loading")
    return model


def valid_batches(
    tokenizer_dir: str | Path,
    lines: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    mlm_probability: float = 0.15,
    seed: int = 1234,
) -> list[dict]:
    """Held-out sentences masked once by the HF collator with a fixed seed: both models see the very same
    masked inputs and labels."""
    tf = _transformers()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    collator = tf.DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    examples = [
        {k: list(v) for k, v in tokenizer(line, truncation=True, max_length=max_length).items()} for line in lines
    ]
    return [dict(collator(examples[i : i + batch_size])) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def mlm_eval(model, batches: list[dict], device: torch.device) -> dict:
    """Mean MLM cross-entropy and accuracy over every masked token of `batches` (eval mode, bf16 autocast
    on CUDA as in training, fp32 on CPU; the loss itself in fp32)."""
    model = model.to(device).eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits  # (B, L, V)
        keep = labels != -100  # (B, L)
        picked, targets = logits[keep].float(), labels[keep]  # (M, V), (M,)
        loss_sum += float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum"))  # .item() syncs
        correct += int((picked.argmax(-1) == targets).sum())
        count += int(keep.sum())
    loss = loss_sum / count if count and math.isfinite(loss_sum) else None  # no score, or a diverged model's
    return {"valid_loss": loss, "valid_accuracy": correct / count if count else None, "valid_targets": count}


def _step_clock(device: torch.device):
    """A TrainerCallback stamping the start of every optimizer step (device events on CUDA, so no sync
    per step; perf_counter on CPU). Step i lasts from stamp i to stamp i+1, which covers the data loading
    and collation of the next batch too: the recipe pays for its CPU collator."""
    tf = _transformers()

    class StepClock(tf.TrainerCallback):
        def __init__(self):
            self.stamps = []

        def _stamp(self):
            if device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.stamps.append(event)
            else:
                self.stamps.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            self._stamp()

        def on_train_end(self, args, state, control, **kwargs):
            self._stamp()

        def seconds(self) -> list[float]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                return [a.elapsed_time(b) / 1e3 for a, b in zip(self.stamps, self.stamps[1:])]
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepClock()


@dataclasses.dataclass
class RecipeSettings:
    """What both trainers share for the comparison (copied from our run config by bench_train)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    mlm_probability: float = 0.15
    max_length: int = 128
    seed: int = 0


def run_recipe(
    lines: list[str],
    tokenizer_dir: str | Path,
    model_config,
    *,
    real_tokens: int,
    steps: int,
    device: str | torch.device,
    settings: RecipeSettings | None = None,
    max_micro_batch: int = 256,
    warmup_skip: int = 3,
    eval_batches: list[dict] | None = None,
) -> dict:
    """Train the HF Trainer baseline on `lines` until `real_tokens` real tokens in `steps` optimizer steps.

    Returns real_tokens, steps, micro_batch, grad_accum, achieved_tflops / mfu (spread over steps; MFU
    against `mlmtrain.flops`'s datasheet peak, None on CPU), tokens_per_s ({overall: real tokens of the steps
    after `warmup_skip` over their time; min/median/max of the per-step rates}), samples_per_s, step_time_s,
    peak_mem_bytes (CUDA only, else None), wall_s (trainer.train()), hf_reported_train_loss, and valid_* from
    mlm_eval."""
    import accelerate  # noqa: F401  (the Trainer needs it; fail here with a clear ImportError)

    from mlmtrain.config import default_precision
    from mlmtrain.flops import model_flops_per_token, peak_tflops_for
    from mlmtrain.profiling import spread

    settings = settings or RecipeSettings()
    tf = _transformers()
    device = torch.device(device)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    examples = tokenize_until(tokenizer, lines, real_tokens, settings.max_length)
    per_step = math.ceil(len(examples) / steps)  # sentences per optimizer step
    grad_accum = math.ceil(per_step / max_micro_batch)
    micro_batch = math.ceil(per_step / grad_accum)

    collator = tf.DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mlm_probability)
    batch_real_tokens, batch_sentences, batch_flops = [], [], []

    specials = torch.tensor(tokenizer.all_special_ids)

    def counting_collator(features):  # on CPU tensors: counting here costs no device sync
        batch = collator(features)
        lengths = batch["attention_mask"].sum(1)  # (B,) real tokens per sentence
        real = int(lengths.sum())
        batch_real_tokens.append(real)
        batch_sentences.append(len(features))
        # our FLOPs formula (mlmtrain.flops): credit for the work the model needs, not the padding it does; the
        # head on the selected share of the tokens the collator may select (no special id, as ours)
        ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])  # (B, L) before masking
        maskable = int((batch["attention_mask"].bool() & ~torch.isin(ids, specials)).sum())
        head = settings.mlm_probability * maskable / max(real, 1)
        batch_flops.append(model_flops_per_token(model_config, lengths, head) * real)
        return batch

    torch.manual_seed(settings.seed)
    model = hf_model(model_config)
    clock = _step_clock(device)
    with tempfile.TemporaryDirectory(prefix="mlmtrain_recipe_") as tmp:
        wanted = dict(
            output_dir=tmp,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=grad_accum,
            num_train_epochs=1,
            learning_rate=settings.lr,
            adam_beta1=settings.betas[0],
            adam_beta2=settings.betas[1],
            adam_epsilon=settings.eps,
            weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup_steps,
            lr_scheduler_type="linear",
            max_grad_norm=settings.grad_clip,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            seed=settings.seed,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            group_by_length=False,
            train_sampling_strategy="random",
            remove_unused_columns=False,
        )
        # TrainingArguments' fields move between transformers versions (group_by_length became
        # train_sampling_strategy): pass only the ones this version has.
        known = {f.name for f in dataclasses.fields(tf.TrainingArguments)}
        args = tf.TrainingArguments(**{k: v for k, v in wanted.items() if k in known})
        trainer = tf.Trainer(
            model=model, args=args, train_dataset=examples, data_collator=counting_collator, callbacks=[clock]
        )
        trainer.remove_callback(tf.PrinterCallback)  # it prints the run's metrics dict on stdout, --quiet or not
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        output = trainer.train()
        wall_s = time.perf_counter() - t0
    step_seconds = clock.seconds()
    # group micro-batches into optimizer steps (the last step may hold fewer)
    step_tokens = [sum(batch_real_tokens[i : i + grad_accum]) for i in range(0, len(batch_real_tokens), grad_accum)]
    step_samples = [sum(batch_sentences[i : i + grad_accum]) for i in range(0, len(batch_sentences), grad_accum)]
    step_flops = [sum(batch_flops[i : i + grad_accum]) for i in range(0, len(batch_flops), grad_accum)]
    n = min(len(step_seconds), len(step_tokens))
    skip = min(warmup_skip, max(n - 1, 0))
    timed_tokens, timed_samples, timed_s = step_tokens[skip:n], step_samples[skip:n], step_seconds[skip:n]
    rates = spread(t / s for t, s in zip(timed_tokens, timed_s))  # per-step real tokens/s, as ours: median etc.
    tflops = spread(f / s / 1e12 for f, s in zip(step_flops[skip:n], timed_s))
    peak = peak_tflops_for(device, default_precision(device.type))
    result = {
        "real_tokens": sum(batch_real_tokens),
        "sentences": len(examples),
        "steps": len(step_tokens),
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "tokens_per_s": {"overall": sum(timed_tokens) / sum(timed_s), **rates},
        "samples_per_s": sum(timed_samples) / sum(timed_s),
        "achieved_tflops": tflops,
        "mfu": {k: v / peak for k, v in tflops.items()} if peak else None,
        "step_time_s": spread(timed_s),
        "timed_steps": len(timed_s),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "wall_s": wall_s,
        # as transformers reports it: with gradient accumulation, Trainer (5.x) skips its 1/grad_accum for
        # models whose forward takes **kwargs, and BertForMaskedLM's takes them but averages its own loss,
        # so this (and the gradient) is grad_accum x the mean; AdamW is nearly invariant to that scale
        "hf_reported_train_loss": float(output.training_loss),
        "precision": default_precision(device.type),  # bf16: autocast over fp32 weights, as ours
        "settings": dataclasses.asdict(settings),
    }
    if eval_batches is not None:
        result.update(mlm_eval(trainer.model, eval_batches, device))
    return result
