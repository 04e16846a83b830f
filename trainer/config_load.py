"""Where a run's settings come from: a TOML file (a path, or the name of a packaged one in trainer/configs/) or
a run's config.json, then the flags, then `--set section.key=value`, each value checked for its key's type as it
is set, then `config.validate`. No torch import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from pathlib import Path

from mlmtrain.config import PACKAGED_CONFIGS, SECTIONS, RunConfig, validate
from mlmtrain.errors import UserError


def flag_overrides(args) -> dict:
    """The config keys a command line set: the flags whose destination is a dotted key (or out_dir)."""
    return {k: v for k, v in vars(args).items() if (k == "out_dir" or "." in k) and v is not None}


def load_config(
    toml_path: str | Path | None = None, overrides: dict | None = None, sets: list[str] | None = None
) -> RunConfig:
    """TOML file, then `overrides` (flag values: dotted key -> value, None = not given), then `--set`, then
    `validate`. `toml_path` may be a run folder's config.json (to resume: the run is where that file is, not
    where the file says it was) or a packaged config's name. Paths are made absolute, so a run's config.json
    works from any working directory."""
    cfg, given = RunConfig(), {}  # dotted key -> where it was given
    if toml_path:
        path = resolve_config_path(toml_path)
        is_run_config = path.suffix == ".json"  # a run folder's resolved config.json (e.g. to resume a run)
        try:
            table = _read_run_config(path) if is_run_config else tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for dotted, value in _flatten(table):  # both checked alike: known keys, values of the key's type
            _set(cfg, dotted, value)
        if is_run_config:  # what a run saved is its own, not given again (it omits what its init_from decides)
            cfg.out_dir = str(path.resolve().parent)
        else:
            given |= {dotted: f"the config file {path}" for dotted, _ in _flatten(table)}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(cfg, dotted, value)
            given[dotted] = "a flag"
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value (e.g. optim.lr=3e-4), got {item!r}")
        dotted, value = item.split("=", 1)
        _set(cfg, dotted.strip(), value)
        given[dotted.strip()] = "--set"
    for spec, key in ((cfg, "out_dir"), (cfg.data, "data_dir"), (cfg.data, "tokenizer_dir")):
        if getattr(spec, key):
            setattr(spec, key, os.path.abspath(os.path.expanduser(getattr(spec, key))))
    cfg.model.init_from = source_path(cfg.model.init_from)  # a folder absolute, a Hub id as given
    return validate(cfg, given)


def source_path(source: str) -> str:
    """A model source as runs store it: an existing local path made absolute; a Hub id (or "") as given."""
    path = os.path.expanduser(source)
    return os.path.abspath(path) if source and os.path.exists(path) else source


def _read_run_config(path: Path) -> dict:
    """A run's config.json; anything else given as --config is refused, since its keys would be ignored."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if isinstance(d, dict) and ("model_type" in d or "architectures" in d):
        raise UserError(
            f"{path} is a transformers model config, not an mlmtrain run config: to start from a transformers "
            "model, pass its folder as --init-from FOLDER; --config takes a TOML file or a run's config.json."
        )
    if isinstance(d, dict) and isinstance(d.get("run"), dict) and isinstance(d.get("model"), dict):
        raise UserError(
            f"{path} is a checkpoint's config; pass the run's own config.json (RUN/config.json), or the "
            "checkpoint as --resume CHECKPOINT."
        )
    if not isinstance(d, dict) or "out_dir" not in d or not any(isinstance(d.get(s), dict) for s in SECTIONS):
        raise UserError(f"{path} is not an mlmtrain run config (a run's config.json); --config also takes TOML.")
    return d


def resolve_config_path(name: str | Path) -> Path:
    """A config file's path, or the name of a packaged one (`base_gpu` -> trainer/configs/base_gpu.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name.removesuffix('.toml')}.toml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.toml")))
    raise UserError(f"config file {path} does not exist (packaged configs: {known})")


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from its saved dict (`RunConfig.to_dict()`, e.g. a checkpoint's), each value checked
    as a TOML file's are (`_set`). Keys from other versions are ignored, missing ones keep their defaults."""
    cfg = RunConfig()
    known = {"out_dir"} | {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))}
    for dotted, value in _flatten(d):
        if dotted in known:
            _set(cfg, dotted, value)
    return cfg


def _flatten(table: dict, prefix: str = ""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _set(cfg: RunConfig, dotted: str, value) -> None:
    parts = dotted.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise UserError(f"unknown config section {part!r} in {dotted!r}")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):  # "optim.lr.a": a value given a table
        raise UserError(f"config key {'.'.join(parts[:-1])!r} takes a value, not a table ({dotted!r})")
    types = typing.get_type_hints(type(obj))
    key = parts[-1]
    if key not in types:
        raise UserError(f"unknown config key {dotted!r}; known: {', '.join(sorted(types))}")
    if dataclasses.is_dataclass(getattr(obj, key)):
        raise UserError(f"config section {dotted!r} must be a table of its keys, got {value!r}")
    setattr(obj, key, _coerce(value, types[key], dotted))


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}  # for _coerce's messages


def _coerce(value, target_type, name: str):
    """A TOML value or a `--set` string as the field's type (str, int, float, bool, or a tuple of floats)."""
    is_tuple = typing.get_origin(target_type) is tuple
    if isinstance(value, str) and target_type is not str:
        text = value.strip()
        if target_type is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{name} must be true or false, got {value!r}")
        try:
            value = float(text) if target_type is float else json.loads(text)
        except (ValueError, json.JSONDecodeError):
            kind = "a list like [0.9, 0.98]" if is_tuple else _KINDS[target_type]
            raise UserError(f"{name} must be {kind}, got {value!r}") from None
    if is_tuple:
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            raise UserError(f"{name} must be a list like [0.9, 0.98], got {value!r}")
        return tuple(float(v) for v in value)
    if target_type is float and _is_number(value):
        return float(value)
    if not isinstance(value, target_type) or (target_type is int and isinstance(value, bool)):
        raise UserError(f"{name} must be {_KINDS[target_type]}, got {value!r}")
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def defaults_toml() -> str:
    """`mlmtrain train --help-config`: every config key with its default and meaning, as a TOML file of the
    defaults (dotted keys, section names and meanings as comments), each key line one `--set` also takes."""
    from mlmtrain.config import field_docs

    section, lines = None, []
    for dotted, (default, meaning) in field_docs().items():
        if dotted.split(".")[0] != section and "." in dotted:
            section = dotted.split(".")[0]
            lines.append(f"\n# {section}")
        lines.append(f"{dotted} = {toml_value(default)}\n    # {meaning}")
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    """A default as a TOML file writes it (`true`, `"tiny"`, `[0.9, 0.98]`), so a line of --help-config pastes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)
