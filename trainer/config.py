"""Run configuration: one dataclass per concern, read from a TOML file, overridden by flags and
`--set section.key=value`. The resolved config is logged at start and saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mlmtrain.errors import UserError


@dataclass
class ModelSpec:
    size: str = "tiny"  # tiny | mini | small | base | large (trainer/model.py MODEL_SIZES)
    dropout: float = 0.1  # hidden and attention-probability dropout, as BERT; 0 turns it off
    max_position_embeddings: int = 512


@dataclass
class DataSpec:
    data_dir: str = ""  # token shards from `mlmtrain prepare`
    tokenizer_dir: str = ""  # the tokenizer the shards were made with
    tokens_per_batch: int = 0  # per micro-batch, per rank; 0 = auto (65536 on CUDA, 4096 on CPU)
    pack: str = "sentence"  # sentence: one sentence per segment | document: neighbours joined up to max_seq_len
    prefetch: int = 4  # batches built ahead on the background thread


@dataclass
class MaskSpec:
    mask_prob: float = 0.15
    mask_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_frac: float = 0.1  # of the selected: replaced by a random non-special id (the rest stay)
    whole_word: bool = False


@dataclass
class OptimSpec:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: int = 0  # 0 = auto: 6% of max_steps
    schedule: str = "linear"  # linear | cosine decay to min_lr_ratio * lr after warmup
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks together


@dataclass
class TrainSpec:
    max_steps: int = 200
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: str = "auto"  # auto (on for CUDA) | on | off
    tf32: bool = True
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 0  # steps; 0 = only at the end (and on preemption)
    checkpoint_minutes: float = 30.0  # also save when this much wall time passed since the last save
    keep_checkpoints: int = 3
    checkpoint_at_end: bool = True  # benchmarks turn it off (a base checkpoint is ~1.3 GB)
    peak_tflops: float = 0.0  # device peak for MFU; 0 = from the built-in table (trainer/flops.py)
    profile_steps: str = ""  # "A:B" records a torch.profiler trace of steps A..B-1
    nan_policy: str = "skip"  # skip: skip the update | stop: final checkpoint and stop
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps
    shard: str = "ddp"  # ddp | fsdp (only used under torchrun with more than one process)


@dataclass
class RunConfig:
    out_dir: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _coerce(value, target_type, name: str):
    """Turn a TOML value or a `--set` string into the field's type, with a clear error."""
    if isinstance(target_type, str):
        target_type = eval(target_type, {"tuple": tuple, "float": float, "int": int, "str": str, "bool": bool})
    if isinstance(value, str) and target_type is not str:
        text = value.strip()
        if target_type is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{name} must be true or false, got {value!r}")
        try:
            value = json.loads(text) if target_type is not float else float(text)
        except (ValueError, json.JSONDecodeError):
            raise UserError(
                f"{name} must be a {getattr(target_type, '__name__', target_type)}, got {value!r}"
            ) from None
    origin = getattr(target_type, "__origin__", None)
    if origin is tuple or target_type is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list like [0.9, 0.98], got {value!r}")
        return tuple(float(v) for v in value)
    if target_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target_type in (int, str, bool) and not isinstance(value, target_type):
        raise UserError(f"{name} must be a {target_type.__name__}, got {value!r}")
    if target_type is int and isinstance(value, bool):
        raise UserError(f"{name} must be an integer, got {value!r}")
    return value


def _set(cfg: RunConfig, dotted: str, value) -> None:
    parts = dotted.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise UserError(f"unknown config section {part!r} in {dotted!r}")
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    key = parts[-1]
    if key not in fields or dataclasses.is_dataclass(getattr(obj, key)):
        raise UserError(f"unknown config key {dotted!r}; known: {', '.join(sorted(fields))}")
    setattr(obj, key, _coerce(value, fields[key].type, dotted))


def load_config(
    toml_path: str | Path | None = None, overrides: dict | None = None, sets: list[str] | None = None
) -> RunConfig:
    """TOML file, then `overrides` (flag values: dotted key -> value, None = not given), then `--set`."""
    cfg = RunConfig()
    if toml_path:
        path = Path(toml_path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        if path.suffix == ".json":  # a run folder's resolved config.json (e.g. to resume a run)
            try:
                cfg = config_from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"config file {path} is not valid JSON: {e}") from None
            return _apply(cfg, overrides, sets)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None

        def walk(prefix: str, node: dict) -> None:
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    _set(cfg, f"{prefix}{k}", v)

        walk("", table)
    return _apply(cfg, overrides, sets)


def _apply(cfg: RunConfig, overrides: dict | None, sets: list[str] | None) -> RunConfig:
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(cfg, dotted, value)
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value (e.g. optim.lr=3e-4), got {item!r}")
        dotted, value = item.split("=", 1)
        _set(cfg, dotted.strip(), value)
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from its saved dict (`RunConfig.to_dict()`, e.g. from a checkpoint)."""
    cfg = RunConfig(out_dir=d.get("out_dir", ""))
    for section in ("model", "data", "mask", "optim", "train"):
        spec = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(spec)}
        for k, v in d.get(section, {}).items():
            if k in known:  # keys from newer versions are ignored, missing ones keep defaults
                setattr(spec, k, tuple(v) if isinstance(v, list) else v)
    return cfg
