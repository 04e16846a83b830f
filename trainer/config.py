"""Run configuration: one dataclass per concern and the one place every value is checked (`validate`). Where the
values come from (a TOML file, a run's config.json, flags, `--set`) is config_load.py. The resolved config is
logged at start and saved with every checkpoint. No torch import.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from mlmtrain.errors import UserError

# Named model sizes: tiny/mini/small are Google's BERT miniatures (Turc et al. 2019), base/large are BERT's.
MODEL_SIZES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # name -> torch dtype attribute
ATTENTION_IMPLS = ("auto", "varlen", "sdpa", "flex", "triton")  # model.attention (attention.py); flex, triton: rows
RESIDUAL_DTYPES = ("fp32", "compute")  # model.residual_dtype (fast_paths.py)
FUSED_OPS = ("torch", "triton")  # model.fused_ops (fast_paths.py)


def default_precision(device_type: str) -> str:
    """train.precision "auto": bf16 autocast on CUDA, fp32 elsewhere."""
    return "bf16" if device_type == "cuda" else "fp32"


def auto_warmup(max_steps: int) -> int:
    """optim.warmup_steps 0 (auto): 6% of the steps, at least one."""
    return max(1, int(0.06 * max_steps))


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed (numpy's generators any integer >= 0)
# int32 ids cap a micro-batch at 2**31; 2**24 (16.8M, 64x the largest benchmark micro-batch, activations no GPU
MAX_TOKENS_PER_BATCH = 1 << 24  # holds even at tiny) is a typo's mark: refused before numpy allocates it


def torch_dtype(precision: str):
    """The torch dtype of a precision name (fp32, bf16, fp16); torch is imported only when this is called."""
    import torch

    return getattr(torch, PRECISIONS[precision])


@dataclass
class ModelSpec:
    # a preset of hidden_size, num_hidden_layers, num_attention_heads and intermediate_size:
    size: str = "tiny"  # tiny | mini | small | base | large
    dropout: float = 0.1  # hidden and attention-probability dropout (flash varlen, flex, triton: hidden only); 0: off
    max_position_embeddings: int = 512  # learned positions: at least the shards' max_seq_len
    hidden_size: int = 0  # each of these four, when not 0, replaces the preset's value
    num_hidden_layers: int = 0  # encoder layers (0 = the preset's)
    num_attention_heads: int = 0  # must divide hidden_size (0 = the preset's)
    intermediate_size: int = 0  # the MLP's width (0 = the preset's)
    type_vocab_size: int = 2  # token types (only type 0 is trained: no sentence pairs)
    layer_norm_eps: float = 1e-12  # BERT's
    initializer_range: float = 0.02  # std of the normal initialisation
    init_from: str = ""  # continue pretraining a transformers BERT (folder or Hub id): its weights, shape, tokenizer
    # auto (flash varlen on CUDA; FlexAttention per row with data.layout = rows when compiled) | varlen | sdpa
    # (the reference) | flex (rows, on CUDA: FlexAttention has no CPU backward) | triton (rows of <= 128 tokens)
    attention: str = "auto"
    residual_dtype: str = "fp32"  # fp32 (autocast's default) | compute: LayerNorm outputs in the autocast dtype
    fused_ops: str = "torch"  # torch (inductor fuses them) | triton: the fused residual+LayerNorm, bias+GELU kernels

    def dims(self) -> dict:
        """The four preset dimensions after the overrides, with transformers' names."""
        preset = MODEL_SIZES.get(self.size, MODEL_SIZES["tiny"])
        return {k: getattr(self, k) or v for k, v in preset.items()}


# The dimensions that, with the tokenizer's vocab_size, fix the weights' shapes (transformers' names).
SHAPE_DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size")  # fmt: skip
# What `model.init_from` decides: setting one of these as well would be silently ignored, so it is refused.
INIT_FROM_KEYS = (*SHAPE_DIMS, "layer_norm_eps", "initializer_range")


@dataclass
class DataSpec:
    data_dir: str = ""  # token shards from `mlmtrain prepare`
    tokenizer_dir: str = ""  # the tokenizer the shards were made with
    tokens_per_batch: int = 0  # per micro-batch, per rank; 0 = auto (65536 on CUDA, 4096 on CPU)
    pack: str = "sentence"  # sentence: one sentence per segment | document: neighbours joined up to max_seq_len
    # flat: segments back to back in one [T] stream | rows: whole segments bin-packed into rows of max_seq_len
    # (tokens_per_batch must be a multiple of it), attention per row
    layout: str = "flat"
    prefetch: int = 4  # batches built ahead
    packer: str = "thread"  # where they are built: thread | process (its Python holds another process's GIL)


@dataclass
class MaskSpec:
    mask_prob: float = 0.15  # share of the non-special tokens selected
    mask_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_frac: float = 0.1  # of the selected: replaced by a random non-special id (the rest stay)
    whole_word: bool = False  # select whole words: a start piece with its ## continuations


@dataclass
class OptimSpec:
    lr: float = 5e-4  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's, e.g. [0.9, 0.98]
    eps: float = 1e-6  # AdamW's
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: int = 0  # linear warm-up steps; 0 = auto: 6% of max_steps
    schedule: str = "linear"  # linear | cosine decay to min_lr_ratio * lr after warmup
    min_lr_ratio: float = 0.0  # the decay ends at this share of lr
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks together


@dataclass
class TrainSpec:
    max_steps: int = 200  # optimizer steps
    seed: int = 0  # the seed of initialisation, data order, masking and dropout
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: str = "auto"  # auto (on for CUDA) | on | off
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps per metrics.jsonl line (the host reads the device only then)
    eval_every: int = 100  # steps between evaluations; 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation (fixed masks)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end (and on a signal)
    checkpoint_minutes: float = 30.0  # also save when this much wall time passed since the last save
    keep_checkpoints: int = 3  # 0 = keep all
    checkpoint_at_end: bool = True  # benchmarks turn it off (a base checkpoint is ~1.3 GB)
    peak_tflops: float = 0.0  # device peak for MFU; 0 = from the built-in table (trainer/flops.py)
    profile_steps: str = ""  # "A:B" records a torch.profiler trace of steps A..B-1
    profile_warmup: int = 1  # profiler warm-up steps before A (its start-up cost lands there, not in the trace)
    profile_memory: bool = False  # with profile_steps: a CUDA memory snapshot of those steps (memory_viz)
    report_to: str = ""  # also log metrics to: tensorboard, wandb, or both comma-separated ("" or none: off)
    nan_policy: str = "skip"  # skip: skip the update | stop: final checkpoint and stop
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps
    shard: str = "ddp"  # ddp | fsdp (used under torchrun, one process included)
    cuda_graphs: bool = False  # replay the compiled step as CUDA graphs (torch.compile mode="reduce-overhead")
    # time kernel choices at the first compile (inductor's max_autotune, without mode="max-autotune"'s coordinate
    # descent): GEMMs against inductor's Triton templates, whose epilogues can take the bias and GELU
    # (model.fused_ops = torch), FlexAttention's tiles, the other kernels' launches; the first compile takes minutes
    autotune: bool = False
    async_log_reads: bool = False  # read a log window's device numbers one window later: no wait for the queue
    # off | tensorwise | rowwise | rowwise_with_gw_hp: torchao float8 linear layers (compute capability 8.9+, bf16)
    fp8: str = "off"


@dataclass
class RunConfig:
    out_dir: str = ""  # the run folder: config.json, metrics.jsonl, checkpoints/
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict:  # with init_from, no preset or dimensions: its config.json's decide (not these)
        d = dataclasses.asdict(self)
        for key in ("size", *INIT_FROM_KEYS) if self.model.init_from else ():
            del d["model"][key]
        return d


SECTIONS = ("model", "data", "mask", "optim", "train")


def field_docs() -> dict[str, tuple[object, str]]:
    """Every config key (dotted) -> (its default, its meaning): the comment written beside (or above) the field
    in this file, the one place each key is described (`mlmtrain train --help-config` and the flags' help)."""
    import inspect
    import re

    docs = {"out_dir": (RunConfig.out_dir, _comment(inspect.getsource(RunConfig), "out_dir"))}
    for section in SECTIONS:
        spec = type(getattr(RunConfig(), section))
        source, above = inspect.getsource(spec).splitlines()[1:], []
        for line in source:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# "))
                continue
            match = re.match(r"(\w+): [^=]+= (.*)", text)
            if match:
                beside = match.group(2).split("  # ", 1)[1] if "  # " in match.group(2) else ""
                default = getattr(spec(), match.group(1))
                docs[f"{section}.{match.group(1)}"] = (default, " ".join([*above, beside]).strip())
            above = []
    return docs


def _comment(source: str, name: str) -> str:
    line = next(line for line in source.splitlines() if line.strip().startswith(f"{name}:"))
    return line.split("  # ", 1)[1] if "  # " in line else ""


# ---------------------------------------------------------------------------------------------------- validation


def check_rows_fit(tokens_per_batch: int, max_seq_len: int, name: str = "data.tokens_per_batch") -> None:
    """The rows layout's rule: a batch is whole rows of max_seq_len tokens. `name` is what the user set the batch
    size with (a config key, a flag), for the one sentence that refuses it."""
    T, L = tokens_per_batch, max_seq_len
    if T % L:
        raise UserError(
            f"the rows layout cuts each batch into rows of max_seq_len = {L} tokens: {name} = {T} must be a "
            f"multiple of it (e.g. {max(L, T // L * L)})"
        )


def validate(cfg: RunConfig, given: dict[str, str] | None = None) -> RunConfig:
    """Every value checked once, here: one sentence naming the key, the value and what is allowed. `given`: the
    dotted keys a file, flag or --set gave, and which (config_load.load_config): one given at its default counts."""
    m, d, k, o, t = cfg.model, cfg.data, cfg.mask, cfg.optim, cfg.train
    _one_of("model.size", m.size, MODEL_SIZES)
    _within("model.dropout", m.dropout, 0.0, 1.0, "in [0, 1)", high_open=True)
    _at_least("model.max_position_embeddings", m.max_position_embeddings, 3)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _at_least(f"model.{key}", getattr(m, key), 0, "(0 = the preset's)")
    _at_least("model.type_vocab_size", m.type_vocab_size, 1)
    _within("model.layer_norm_eps", m.layer_norm_eps, 0.0, 1.0, "in (0, 1)", low_open=True, high_open=True)
    _within("model.initializer_range", m.initializer_range, 0.0, math.inf, "a positive number", low_open=True)
    dims = m.dims()
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise UserError(
            f"model.hidden_size {dims['hidden_size']} is not divisible by model.num_attention_heads "
            f"{dims['num_attention_heads']}: pick a head count that divides it"
        )
    for key in ("size", *INIT_FROM_KEYS) if m.init_from else ():
        source = (given or {}).get(f"model.{key}", "")
        if source or getattr(m, key) != getattr(ModelSpec, key):
            named = f"model.{key}={getattr(m, key)}" + (" (--model)" if key == "size" else "")
            raise UserError(
                f"{named}{f', from {source},' if source else ''} cannot be combined with model.init_from "
                "(--init-from): the model's shape comes from its config.json"
            )
    _one_of("model.attention", m.attention, ATTENTION_IMPLS)
    _one_of("model.residual_dtype", m.residual_dtype, RESIDUAL_DTYPES)
    _one_of("model.fused_ops", m.fused_ops, FUSED_OPS)
    if not 0 <= d.tokens_per_batch <= MAX_TOKENS_PER_BATCH:
        raise UserError(
            f"data.tokens_per_batch must be from 0 (auto) to {MAX_TOKENS_PER_BATCH:,}, got {d.tokens_per_batch}"
        )
    _one_of("data.pack", d.pack, ("sentence", "document"))
    _at_least("data.prefetch", d.prefetch, 1)
    _one_of("data.packer", d.packer, ("thread", "process"))
    _one_of("data.layout", d.layout, ("flat", "rows"))
    if m.attention in ("flex", "triton") and d.layout != "rows":
        raise UserError(f"model.attention = {m.attention} attends per row: it needs data.layout = rows")
    _within("mask.mask_prob", k.mask_prob, 0.0, 1.0, "in (0, 1)", low_open=True, high_open=True)
    _within("mask.mask_frac", k.mask_frac, 0.0, 1.0, "in [0, 1]")
    _within("mask.random_frac", k.random_frac, 0.0, 1.0, "in [0, 1]")
    if k.mask_frac + k.random_frac > 1.0:
        raise UserError(f"mask.mask_frac + mask.random_frac must be at most 1, got {k.mask_frac + k.random_frac:g}")
    _within("optim.lr", o.lr, 0.0, math.inf, "a positive number", low_open=True, high_open=True)
    for i, beta in enumerate(o.betas):
        _within(f"optim.betas[{i}]", beta, 0.0, 1.0, "in [0, 1)", high_open=True)
    if len(o.betas) != 2:
        raise UserError(f"optim.betas must be two numbers like [0.9, 0.98], got {list(o.betas)}")
    _within("optim.eps", o.eps, 0.0, math.inf, "a positive number", low_open=True, high_open=True)
    _within("optim.weight_decay", o.weight_decay, 0.0, math.inf, "at least 0", high_open=True)
    _at_least("optim.warmup_steps", o.warmup_steps, 0, "(0 = auto)")
    _one_of("optim.schedule", o.schedule, ("linear", "cosine"))
    _within("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0, "in [0, 1]")
    _within("optim.grad_clip", o.grad_clip, 0.0, math.inf, "at least 0 (0 = off)", high_open=True)
    _at_least("optim.grad_accum", o.grad_accum, 1)
    _at_least("train.max_steps", t.max_steps, 1)
    check_seed("train.seed", t.seed)
    _one_of("train.precision", t.precision, ("auto", *PRECISIONS))
    _one_of("train.compile", t.compile, ("auto", "on", "off"))
    check_device_name("train.device", t.device)
    _within("train.log_every", t.log_every, 1, 1 << 16, "from 1 to 65536 (a window keeps a row per step)")
    _at_least("train.eval_every", t.eval_every, 0, "(0 = only at the end)")
    _at_least("train.eval_batches", t.eval_batches, 1)
    _at_least("train.checkpoint_every", t.checkpoint_every, 0, "(0 = only at the end)")
    _within("train.checkpoint_minutes", t.checkpoint_minutes, 0.0, math.inf, "a positive number", low_open=True)
    _at_least("train.keep_checkpoints", t.keep_checkpoints, 0, "(0 = keep all)")
    _within("train.peak_tflops", t.peak_tflops, 0.0, math.inf, "at least 0 (0 = from the table)", high_open=True)
    profile_range(t.profile_steps)
    _at_least("train.profile_warmup", t.profile_warmup, 0)
    if t.profile_memory and not t.profile_steps:
        raise UserError("--profile-memory records the steps --profile-steps A:B traces: give both")
    report_targets(t.report_to)
    _one_of("train.nan_policy", t.nan_policy, ("skip", "stop"))
    _at_least("train.max_bad_steps", t.max_bad_steps, 1)
    _one_of("train.shard", t.shard, ("ddp", "fsdp"))
    _one_of("train.fp8", t.fp8, ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp"))
    return cfg


def check_seed(name: str, seed: int) -> None:
    """A seed of any command (train.seed, prepare's and eval's --seed): what numpy and torch both take."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be from 0 to 2**64 - 1, got {seed}")


def check_device_name(name: str, device: str) -> None:
    """A device setting (train.device, eval's --device): auto, cpu, cuda or cuda:N."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"{name} must be auto, cpu, cuda or cuda:N, got {device!r}")


def profile_range(spec: str) -> tuple[int, int] | None:
    """`train.profile_steps` "A:B" as (A, B), or None when empty."""
    if not spec:
        return None
    match = re.fullmatch(r"([0-9]+):([0-9]+)", spec)  # plain digits: int() would also take " 2", "+2", "2_0"
    if match is None:
        raise UserError(f"--profile-steps takes A:B (e.g. 10:15), got {spec!r}")
    first, end = int(match[1]), int(match[2])
    if not 0 <= first < end:
        raise UserError(f"--profile-steps A:B needs 0 <= A < B, got {spec!r}")
    return first, end


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(spec: str) -> list[str]:
    """`train.report_to` ("tensorboard,wandb", "none" or "") as a list of target names."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in REPORT_TARGETS:
            raise UserError(f"--report-to takes {', '.join(REPORT_TARGETS)} or none (comma-separated), got {name!r}")
    return list(dict.fromkeys(names))


def format_config(cfg: RunConfig, resolved: dict) -> str:
    """The config as a few readable lines, one per section, with `resolved` ({dotted key: value}) in place of
    the `auto` (or 0 = auto) settings; those are marked `(auto)`."""
    lines = ["config (resolved):", f"  out_dir: {cfg.out_dir}"]
    for section in SECTIONS:
        items = []
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            dotted = f"{section}.{key}"
            if dotted in resolved and value != resolved[dotted]:
                value = f"{_text(resolved[dotted])} (auto)" if value in ("auto", 0, 0.0) else _text(value)
            else:
                value = _text(value)
            items.append(f"{key}={value}")
        lines += textwrap.wrap(
            " ".join(items), 116, initial_indent=f"  {section}: ", subsequent_indent=" " * (len(section) + 4)
        )
    return "\n".join(lines)


def _text(value) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: int, low: int, note: str = "") -> None:
    if value < low:
        raise UserError(f"{name} must be at least {low}{' ' + note if note else ''}, got {value}")


def _within(name, value, low, high, allowed: str, low_open=False, high_open=False) -> None:
    ok = math.isfinite(value) or (value == math.inf and not high_open)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise UserError(f"{name} must be {allowed}, got {value!r}")
