"""Checkpoints that survive: atomic writes, checksummed manifests, pickle-free state.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_{step:08d}/`:
    model.safetensors      weights, transformers key names, tied decoder weight/bias stored once
    optimizer.safetensors  optimizer tensors (exp_avg, exp_avg_sq, step) keyed "state.{param}.{name}"
    rng.safetensors        torch CPU (and CUDA) RNG states, so dropout continues bit-exactly
    config.json            {"model": BertConfig fields, "run": resolved RunConfig}
    state.json             step, data cursor, optimizer param groups, grad-scaler state, versions, metrics
    manifest.json          size and sha256 of every file above; written last

A checkpoint is written into a temporary sibling folder, every file fsynced, then renamed into place
(rename is atomic on POSIX), so a crash at any moment leaves either the old set of checkpoints or the old
set plus one complete new one. Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlmtrain.errors import UserError
from mlmtrain.files import sha256_file, write_json

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PAUSE_ENV = "MLMTRAIN_TEST_PAUSE_IN_CHECKPOINT"  # test hook: seconds to sleep mid-write (kill -9 tests)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once, as transformers saves them: of names sharing storage,
    keep the one that is not under a `.decoder.` (the tied output projection)."""
    state = unwrap(model).state_dict()
    names = sorted(state, key=lambda k: (".decoder." in k, list(state).index(k)))
    seen: set[tuple[int, int]] = set()
    out = {}
    for name in names:
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return {k: out[k] for k in state if k in out}  # original order


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors for optimizer.safetensors, the JSON rest)."""
    tensors, scalars = {}, {}
    for param_id, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    return rng


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    run_config: dict,
    state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scaler_state: dict | None = None,
    keep: int = 0,
    *,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (0 = all). Returns its folder.
    On a write failure (disk full, permissions) the partial folder is removed, earlier checkpoints are
    untouched, and a UserError says what happened. `model_state` / `optimizer_state` (an
    `optimizer.state_dict()`-shaped dict) replace reading them from `model` / `optimizer`: FSDP passes
    the full state it gathered (trainer/distributed.py), so every world size writes the same files;
    `extra_rng` adds tensors to rng.safetensors (every rank's generator states under torchrun)."""
    from mlmtrain import __version__

    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{checkpoint_name(step)}_{os.getpid()}"
    config = unwrap(model).config
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        weights = model_state if model_state is not None else model_state_for_saving(model)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        full_state = {
            "step": step,
            **state,
            "scaler": scaler_state,
            "versions": {"mlmtrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if optimizer is not None or optimizer_state is not None:
            tensors, rest = _optimizer_tensors(optimizer_state or optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            full_state["optimizer"] = rest
        save_file({**_rng_tensors(), **(extra_rng or {})}, tmp / "rng.safetensors")
        model_fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        write_json(tmp / "config.json", {"model": model_fields, "run": run_config})
        write_json(tmp / "state.json", full_state)
        if os.environ.get(PAUSE_ENV):  # lets a test kill -9 us mid-write
            time.sleep(float(os.environ[PAUSE_ENV]))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
        write_json(tmp / MANIFEST, {"step": step, "files": manifest})
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if final.exists():  # same step saved twice (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in complete_checkpoints(Path(run_dir))]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e}; {kept}") from e
    if keep > 0:
        for old in complete_checkpoints(Path(run_dir))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file in the manifest is present with its size and sha256, else what is wrong."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return "manifest.json is unreadable"
    for name, info in manifest.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {info['size']} (truncated?)"
        if sha256_file(p) != info["sha256"]:
            return f"{name} does not match its sha256 checksum (corrupted)"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders under RUN_DIR/checkpoints that have a manifest, oldest first (not verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())


def latest_checkpoint(path: str | Path, log=print) -> Path:
    """Resolve a checkpoint folder, or the newest *verified* checkpoint of a run folder. Damaged ones are
    skipped with a message naming them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / MANIFEST).is_file() or (path / "model.safetensors").is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"checkpoint {path} is damaged: {problem}")
        return path
    candidates = complete_checkpoints(path)
    for ckpt in reversed(candidates):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"skipping damaged checkpoint {ckpt}: {problem}")
    raise UserError(
        f"no complete checkpoint in {path} (expected {path / CHECKPOINTS}/step_*/ with a "
        f"manifest.json); train with `mlmtrain train --out {path}` first"
    )


def load_checkpoint_model(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state dict, config.json, state.json) of a checkpoint folder; safetensors + JSON only."""
    ckpt = Path(ckpt)
    state_dict = load_file(ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    return state_dict, config, state


def load_model_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load saved weights; tied tensors that were stored once are filled through their tie."""
    missing, unexpected = unwrap(model).load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if ".decoder." not in k]
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Path, state: dict) -> None:
    optimizer.load_state_dict(read_optimizer_state(ckpt, state))


def read_optimizer_state(ckpt: Path, state: dict) -> dict:
    """Rebuild the optimizer state dict from optimizer.safetensors + state.json, no pickle."""
    tensors = load_file(ckpt / "optimizer.safetensors")
    saved = state["optimizer"]
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        opt_state.setdefault(int(param_id), {})[name] = value
    for key, value in saved["scalars"].items():
        param_id, name = key.split(".", 1)
        opt_state.setdefault(int(param_id), {})[name] = value
    return {"state": opt_state, "param_groups": saved["param_groups"]}


def restore_rng(ckpt: Path) -> None:
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
