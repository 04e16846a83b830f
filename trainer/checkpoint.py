"""Checkpoints that survive: atomic writes, checksummed manifests, pickle-free state, one format for every
world size.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_{step:08d}/`:
    model.safetensors      weights, transformers key names, tied decoder weight/bias stored once
    optimizer.safetensors  optimizer tensors (exp_avg, exp_avg_sq, step) keyed "state.{param index}.{name}"
    rng.safetensors        torch CPU (and CUDA) generator states; under torchrun every rank's, as
                           "rank{r}.cpu" / "rank{r}.cuda", so dropout continues bit-exactly
    config.json            {"model": BertConfig fields, "run": the RunConfig as given (state.json: what `auto` became)}
    state.json             step, data cursor, fingerprints, the resolved `auto` values, optimizer param groups,
                           grad-scaler state, world size
    manifest.json          size and sha256 of every file above; written last

A checkpoint is written into a temporary sibling folder, every file fsynced, then renamed into place (rename
is atomic on POSIX), so a crash at any moment leaves either the old set of checkpoints or the old set plus
one complete new one. Loading never unpickles: safetensors and JSON only.

Any world size, DDP or FSDP, writes the files a one-process run writes (FSDP first gathers the full state to
rank 0 with `torch.distributed.checkpoint.state_dict`) and resumes any of them: every rank reads the full
files and FSDP re-shards them; at the saved world size each rank also gets its own RNG streams back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlmtrain import parallel
from mlmtrain.errors import UserError
from mlmtrain.files import CHECKPOINTS, MANIFEST, atomic_dir, lock_holder, tmp_sibling, write_json
from mlmtrain.manifest import file_entries, manifest_problems
from mlmtrain.model import BertConfig, BertForMaskedLM, drop_tied_aliases

CHECKPOINT_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "config.json",
    "state.json",
    MANIFEST,
)


def train_command(run_dir, resume: bool = True) -> str:
    """The command that continues the run in `run_dir` (resume=False: starts it again), quoted for a shell: it is
    printed to be copied, and a path with a space must stay one argument."""
    return f"mlmtrain train --config {shlex.quote(str(Path(run_dir) / 'config.json'))}" + (" --resume" * resume)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint folder sits in (RUN/checkpoints/step_*), or None for one copied elsewhere."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else None


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a checkpoint folder's name says (None for a step_* name that holds no number)."""
    digits = Path(ckpt).name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    run_config: dict,
    state: dict,
    scaler_state: dict | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (0 = all); returns its folder. A
    collective under torchrun: every rank calls it, rank 0 writes, the others wait. On a write failure (disk
    full, permissions) the partial folder is removed, earlier checkpoints are untouched, and a UserError
    says what happened."""
    rng = _rng_of_every_rank(next(model.parameters()).device) if parallel.active() else {}
    weights, optimizer_state = _full_state(model, optimizer)
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    if parallel.rank() == 0:
        _write(final, step, unwrap(model).config, weights, optimizer_state, rng, run_config, state, scaler_state)
        if keep > 0:  # the newest `keep` up to this step; a later one (a longer run's, resumed before it) stays
            older = [p for p in complete_checkpoints(Path(run_dir)) if checkpoint_step(p) < step]
            for old in older[: max(0, len(older) - keep + 1)]:
                retire(old)
    parallel.barrier()
    return final


def retire(ckpt: Path) -> None:
    """Delete a checkpoint so that a reader (an export of the run while it trains) never sees half of it: it
    leaves the step_* names in one rename, then goes (what a kill leaves is a stale temporary folder). One that
    holds files a checkpoint does not write is kept, and said."""
    extra = sorted(set(os.listdir(ckpt)) - set(CHECKPOINT_FILES))
    if extra:
        print(f"kept {ckpt} past train.keep_checkpoints: it holds files mlmtrain did not write ({', '.join(extra)})",
              file=sys.stderr)  # fmt: skip
        return
    gone = tmp_sibling(ckpt)
    try:
        os.replace(ckpt, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def _full_state(model, optimizer) -> tuple[dict | None, dict | None]:
    """(weights without tied aliases, optimizer.state_dict()-shaped dict keyed by parameter index, or None
    without an optimizer) on rank 0, (None, None) on the others. FSDP gathers the full state to rank 0's CPU
    (a collective, so every rank calls this)."""
    if not parallel.is_fsdp(model):
        if parallel.rank() != 0:
            return None, None
        weights = {
            k: v.detach().to("cpu").contiguous() for k, v in drop_tied_aliases(unwrap(model).state_dict()).items()
        }
        return weights, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if parallel.rank() != 0:
        return None, None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups, first = [], 0
    for group in optim["param_groups"]:
        groups.append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    state = {index[name]: value for name, value in optim["state"].items()}
    weights = {k: v.contiguous() for k, v in drop_tied_aliases(weights).items()}
    return weights, {"state": state, "param_groups": groups}


def _rng_of_every_rank(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's CPU generator state (and its own GPU's), gathered to all (a collective)."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, rng_state in own.items():
        local = rng_state.to(device)  # NCCL moves device tensors only
        parts = [torch.empty_like(local) for _ in range(parallel.world_size())]
        dist.all_gather(parts, local)
        out.update({f"rank{r}.{name}": part.cpu() for r, part in enumerate(parts)})
    return out


def _write(final: Path, step, config, weights, optimizer_state, rng, run_config, state, scaler_state) -> None:
    """A failed write (disk full, read-only, no permission) leaves no temporary folder and says which earlier
    checkpoint is intact."""
    from mlmtrain import __version__

    previous = [p.name for p in complete_checkpoints(final.parent.parent) if p.name != final.name]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    with atomic_dir(final, replace=True, kept=kept) as tmp:  # the same step saved twice (a signal after a save)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        optimizer_rest = None
        if optimizer_state is not None:
            tensors, optimizer_rest = _split_optimizer_state(optimizer_state)
            save_file(tensors, tmp / "optimizer.safetensors")
        save_file({**_own_rng(), **rng}, tmp / "rng.safetensors")
        write_json(tmp / "config.json", {"model": dataclasses.asdict(config), "run": run_config})
        versions = {"mlmtrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
        write_json(
            tmp / "state.json",
            {
                "step": step,
                **state,
                "world_size": parallel.world_size(),
                "scaler": scaler_state,
                "optimizer": optimizer_rest,
                "versions": versions,
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        write_json(tmp / MANIFEST, {"step": step, "files": file_entries(tmp)})


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors for optimizer.safetensors, the JSON rest)."""
    tensors, scalars = {}, {}
    for param_id, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _own_rng() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    return rng


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified name of every optimizer parameter, in the optimizer's order: the order that gives
    the integer ids of `optimizer.state_dict()`. A tied parameter gets its first name (the embedding)."""
    names: dict[int, str] = {}
    for name, p in unwrap(model).named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------------- finding


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file in the manifest is present with its size and sha256 and state.json and config.json
    say what a resume reads, else what is wrong."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete write)"
    try:
        entries = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is unreadable"
    problems = manifest_problems(ckpt, entries, "the checkpoint was saved")
    if problems:
        return problems[0]
    missing = [name for name in ("model.safetensors", "config.json", "state.json") if name not in entries]
    if missing:
        return f"the manifest does not list {', '.join(missing)}"
    try:
        read_state(ckpt)
    except UserError as e:
        return str(e).removeprefix(f"checkpoint {ckpt} is damaged: ")
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders under RUN_DIR/checkpoints that have a manifest, oldest step first (not verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]  # by step: names pass 8 digits


def warn(msg: str) -> None:
    print(msg, file=sys.stderr)  # a warning: stdout is for results


def latest_checkpoint(path: str | Path, log=warn) -> Path:
    """Resolve a checkpoint folder, or the newest *verified* checkpoint of a run folder. Damaged ones are
    skipped with a message naming them (`log`, stderr by default)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a run folder or a checkpoint folder")
    if (path / MANIFEST).is_file() or (path / "model.safetensors").is_file():
        if not (path / MANIFEST).is_file() and _is_transformers_folder(path):
            raise UserError(
                f"{path} holds a transformers model, not an mlmtrain checkpoint (to train on from its weights: "
                f"--init-from {path})"
            )
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"checkpoint {path} is damaged: {problem}")
        return path
    said = set()
    for _ in range(3):  # a training process may retire the one being read and add a newer one meanwhile
        retired = False
        for ckpt in reversed(complete_checkpoints(path)):
            problem = verify_checkpoint(ckpt)
            if problem is None:
                return ckpt
            if not ckpt.exists():  # retired while it was read: the newer one it made way for is complete
                retired = True
                break
            if ckpt not in said:
                said.add(ckpt)
                log(f"skipping damaged checkpoint {ckpt}: {problem}")
        if not retired:
            break
    run_config, holder = path / "config.json", lock_holder(path)
    if said or any((path / CHECKPOINTS).glob("step_*")):
        next_step = "every checkpoint there is damaged or incomplete: train again into a new --out"
    elif holder:  # training, before its first save
        next_step = f"it is training ({holder}): its first checkpoint comes at train.checkpoint_every or its end"
    elif (path / "summary.json").is_file():  # it ended (train.checkpoint_at_end = false): a result, kept as it is
        next_step = "the run ended without saving one (train.checkpoint_at_end = false): there is nothing to resume"
    elif run_config.is_file():  # a run killed before its first save starts again from its config (no --resume)
        next_step = f"the run saved none yet: `{train_command(path, resume=False)}` starts it again"
    else:
        next_step = "it is not a run folder of `mlmtrain train` (nor a checkpoint folder)"
    raise UserError(
        f"no complete checkpoint in {path} (expected {path / CHECKPOINTS}/step_*/ with a manifest.json); {next_step}"
    )


def _is_transformers_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "model_type" in config


# ---------------------------------------------------------------------------------------------------- loading


def read_state(ckpt: str | Path) -> tuple[dict, dict]:
    """(config.json, state.json) of a checkpoint folder, checked for what a resume or an export reads; a file
    that does not say it makes the checkpoint "damaged", in one sentence."""
    ckpt = Path(ckpt)
    try:
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is damaged: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f'checkpoint {ckpt} is damaged: config.json has no "model" section')
    step, cursor = (state.get("step"), state.get("cursor", [0, 0])) if isinstance(state, dict) else (None, None)
    if not (isinstance(step, int) and step >= 0 and isinstance(cursor, list) and len(cursor) == 2):
        raise UserError(f"checkpoint {ckpt} is damaged: state.json lacks a step or a data cursor")
    return config, state


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state dict, config.json, state.json) of a checkpoint folder; safetensors + JSON only."""
    ckpt = Path(ckpt)
    config, state = read_state(ckpt)
    try:
        weights = load_file(ckpt / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} is damaged: model.safetensors is unreadable ({e})") from None
    return weights, config, state


def read_latest(path: str | Path, log=warn) -> tuple[Path, dict[str, torch.Tensor], dict, dict]:
    """(checkpoint folder, weights, config.json, state.json) of `latest_checkpoint(path)`. A training process
    may retire that checkpoint between its check and its read (keep_checkpoints = 1): then the newer one it
    made way for is read instead."""
    for _ in range(3):
        ckpt = latest_checkpoint(path, log=log)
        try:
            return (ckpt, *read_checkpoint(ckpt))
        except UserError:
            if ckpt.exists():
                raise
    raise UserError(f"the checkpoints of {path} were replaced three times while being read: try again")


@dataclasses.dataclass
class Trained:
    """A run's checkpoint read for export or scoring, with the tokenizer folder its ids are checked against."""

    ckpt: Path
    model: BertForMaskedLM  # fp32, on the CPU
    run_config: dict  # its config.json
    state: dict  # its state.json
    tokenizer_dir: Path  # the folder passed, else the one its run trained with
    tokenizer_fingerprint: str  # of tokenizer_dir, taken before it was read (`check_unchanged` compares it later)


def read_trained(path: str | Path, tokenizer_dir=None) -> Trained:
    """The model of `read_latest(path)`, refused in one sentence when the tokenizer folder is damaged, has another
    vocabulary size or is another tokenizer than the one the run trained with."""
    from mlmtrain.preflight import check_vocab_match
    from mlmtrain.prepare import check_tokenizer_match
    from mlmtrain.tokenizer_folder import load_tokenizer, read_vocab, tokenizer_fingerprint

    ckpt, weights, run_config, state = read_latest(path)  # its warnings on stderr
    config = BertConfig.from_dict(run_config["model"], f"checkpoint {ckpt} is damaged: its config.json")
    tokenizer_dir = Path(tokenizer_dir or run_tokenizer_dir(ckpt, run_config))
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # checks the files and the special-token ids
    check_vocab_match(config.vocab_size, len(read_vocab(tokenizer_dir)), f"checkpoint {ckpt}")
    check_tokenizer_match(state.get("tokenizer_fingerprint"), tokenizer_dir, f"checkpoint {ckpt}", shards=False)
    model = BertForMaskedLM(config)
    model.load_hf_state_dict(weights)  # UserError on missing/unexpected keys or wrong shapes
    return Trained(ckpt, model, run_config, state, tokenizer_dir, fingerprint)


def run_tokenizer_dir(ckpt: Path, config: dict) -> str:
    """The tokenizer folder the checkpoint's run trained with (its config.json), for a command given none."""
    run = config.get("run")
    data = run.get("data") if isinstance(run, dict) else None
    tokenizer_dir = data.get("tokenizer_dir") if isinstance(data, dict) else None
    if not isinstance(tokenizer_dir, str) or not tokenizer_dir:
        raise UserError(f"{ckpt / 'config.json'} does not name the tokenizer: pass --tokenizer DIR.")
    return tokenizer_dir


def read_optimizer_state(ckpt: Path, state: dict) -> dict:
    """Rebuild the optimizer state dict from optimizer.safetensors + state.json, no pickle."""
    opt_state: dict[int, dict] = {}
    try:
        tensors = load_file(ckpt / "optimizer.safetensors")
        saved = state["optimizer"]
        for key, value in tensors.items():
            _, param_id, name = key.split(".", 2)
            opt_state.setdefault(int(param_id), {})[name] = value
        for key, value in saved["scalars"].items():
            param_id, name = key.split(".", 1)
            opt_state.setdefault(int(param_id), {})[name] = value
        return {"state": opt_state, "param_groups": list(saved["param_groups"])}
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} is damaged: its optimizer state is unreadable ({e!r})") from None


def load_optimizer_state(model, optimizer, ckpt: Path, state: dict) -> None:
    """Restore the optimizer from a checkpoint written at any world size. Plain/DDP: as saved. FSDP: every
    rank reads the full state and `set_optimizer_state_dict` keeps its own shard of each tensor."""
    full = read_optimizer_state(ckpt, state)  # keyed by parameter index
    if not parallel.is_fsdp(model):
        optimizer.load_state_dict(full)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in full["param_groups"]):
        raise UserError(f"the optimizer state in {ckpt} does not fit this model's parameters")
    by_name = {
        "state": {names[i]: value for i, value in full["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def restore_rng(ckpt: Path, state: dict, device: torch.device) -> bool:
    """Every rank takes rank 0's saved generator states; at the world size the checkpoint was written with,
    each rank then takes its own, so dropout continues exactly as if the run had not stopped. Returns whether
    this rank got streams of its own (else it holds rank 0's)."""
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    saved = torch.device((state.get("resolved") or {}).get("train.device") or "cuda")  # the GPU the run drew from
    if device.type == "cuda" and saved.type == "cuda" and f"cuda{saved.index or 0}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda{saved.index or 0}"], device)  # on whichever GPU, of however many, runs now
    if not parallel.active() or state.get("world_size") != parallel.world_size():
        return not parallel.active()
    r = parallel.rank()
    if f"rank{r}.cpu" in rng:
        torch.set_rng_state(rng[f"rank{r}.cpu"])
    if device.type == "cuda" and f"rank{r}.cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{r}.cuda"], device)
    # its own only if the generators dropout draws from here were saved by this rank, and differ from rank 0's
    # (a checkpoint written on CPUs has no GPU streams; one written before ranks drew masks of their own, equal ones)
    kind = "cuda" if device.type == "cuda" else "cpu"
    own = f"rank{r}.{kind}" in rng
    return own and (r == 0 or not torch.equal(rng[f"rank{r}.{kind}"], rng[f"rank0.{kind}"]))


# ---------------------------------------------------------------------------------------------------- resuming


def data_fingerprint(meta: dict) -> str:
    """What identifies a set of shards for a resume: vocabulary, tokenizer, split and counts."""
    keys = ("vocab_size", "tokenizer_fingerprint", "max_seq_len", "seed", "valid_fraction")
    body = {k: meta.get(k) for k in keys} | {"train": meta.get("train"), "valid": meta.get("valid")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
