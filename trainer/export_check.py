"""Is a folder a complete, unedited export that transformers and the Hub will take? `mlmtrain export` runs this
on what it wrote and `mlmtrain upload` on what it is asked to send. Reads headers and JSON only: no weights are
loaded, so it takes about a second on a 400 MB model.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from mlmtrain.errors import UserError
from mlmtrain.files import Layout
from mlmtrain.manifest import manifest_problems
from mlmtrain.tokenizer_folder import vocab_disagreements

EXPORT_MANIFEST = "mlmtrain_export.json"
REQUIRED_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
EXPORT_LAYOUT = Layout(
    "export", "an export", "mlmtrain export", (*REQUIRED_FILES, EXPORT_MANIFEST), (*REQUIRED_FILES, EXPORT_MANIFEST)
)
WILDCARDS = set("*?[]")  # a listed name holding one would be a pattern when the upload selects its files
# What the model card's YAML header must say for the Hub to show a fill-mask model (page, widget, code snippet).
CARD_REQUIRED = {"library_name": "transformers", "pipeline_tag": "fill-mask", "mask_token": None}  # None: any value
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def check_export_folder(path: str | Path) -> list[str]:
    """The problems that make `path` not a complete export; empty means OK.

    Checks: every required file present and listed in the manifest; manifest sizes and sha256 match the
    files; config vocab size == tokenizer vocab size (vocab.txt and tokenizer.json, which must agree token by
    token); every tensor in model.safetensors has the shape the config implies (read from the file's JSON
    header, not loaded); the model card has a YAML header with the keys the Hub needs (CARD_REQUIRED).
    Whether transformers loaded it (`"verified"` in the manifest) is the upload's check, not this one."""
    folder = Path(path)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (folder / name).is_file()]
    problems += _check_manifest(folder)
    config = _read_json(folder / "config.json", problems)
    if config is not None:
        problems += _check_config(config)
        problems += _check_vocab(folder, config)
        if (folder / "model.safetensors").is_file() and not any("config.json" in p for p in problems):
            problems += _check_weights(folder / "model.safetensors", config)
    if (folder / "README.md").is_file():
        problems += _check_card(folder / "README.md")
    return problems


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))


def card_header(readme: Path) -> str | None:
    """The YAML text between the leading `---` lines of a model card, or None if there is none."""
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"\A---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(\r?\n|\Z)", text, re.DOTALL)
    return None if match is None else (match.group(1) or "")


def _read_json(path: Path, problems: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path.name} is not valid JSON ({e})")
        return None


def _check_manifest(folder: Path) -> list[str]:
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        return [f"{EXPORT_MANIFEST} is missing: this folder was not written by `mlmtrain export`"]
    problems: list[str] = []
    manifest = _read_json(path, problems)
    if manifest is None:
        return problems
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return [f'{EXPORT_MANIFEST} has no "files" table']
    problems += [f"{EXPORT_MANIFEST} does not list {name}" for name in REQUIRED_FILES if name not in files]
    listed = {}
    for name, entry in files.items():
        if name == EXPORT_MANIFEST or "/" in name or "\\" in name or name in ("", ".", ".."):
            problems.append(f"{EXPORT_MANIFEST} lists {name!r}, which is not a plain file name of the export")
        elif WILDCARDS & set(name):
            problems.append(f"{EXPORT_MANIFEST} lists {name!r}, a name with wildcard characters")
        elif (folder / name).is_symlink():
            problems.append(f"{name} is a symbolic link; an export holds regular files only")
        elif (folder / name).exists() and not stat.S_ISREG((folder / name).lstat().st_mode):
            problems.append(f"{name} is not a regular file")
        elif name not in REQUIRED_FILES:  # it would be sent: an export holds these files and no others
            problems.append(f"{EXPORT_MANIFEST} lists {name!r}, which `mlmtrain export` does not write")
        elif (folder / name).is_file():  # a missing required one is reported as missing
            listed[name] = entry
    return problems + [f"{p} ({EXPORT_MANIFEST})" for p in manifest_problems(folder, listed, "export")]


def _check_config(config: dict) -> list[str]:
    if config.get("model_type") != "bert":
        return [f"config.json model_type is {config.get('model_type')!r}, expected 'bert'"]
    from mlmtrain.model import SHAPE_FIELDS  # here, not at import: `upload`'s flag refusals import no torch

    bad = [k for k in SHAPE_FIELDS if not (isinstance(config.get(k), int) and config[k] > 0)]
    if bad:
        return [f"config.json lacks a positive integer {', '.join(bad)}"]
    if config["hidden_size"] % config["num_attention_heads"]:
        return [
            f"config.json hidden_size {config['hidden_size']} is not divisible by "
            f"num_attention_heads {config['num_attention_heads']}"
        ]
    return []


def _check_vocab(folder: Path, config: dict) -> list[str]:
    """A model vocab size that differs from the tokenizer's surfaces on a GPU as an opaque CUDA assert."""
    problems: list[str] = []
    want = config.get("vocab_size")
    lines = None
    if (folder / "vocab.txt").is_file():
        try:
            with open(folder / "vocab.txt", encoding="utf-8") as f:  # read as transformers' BertTokenizer does
                lines = [line.rstrip("\n") for line in f.readlines()]
        except UnicodeDecodeError:
            return problems + ["vocab.txt is not UTF-8 text"]
        if len(lines) != want:
            problems.append(f"config.json vocab_size is {want} but vocab.txt has {len(lines)} tokens")
    tok = _read_json(folder / "tokenizer.json", problems)
    if isinstance(tok, dict):
        vocab = (tok.get("model") or {}).get("vocab")
        if not isinstance(vocab, dict):
            return problems + ["tokenizer.json has no model.vocab table (not a WordPiece tokenizer?)"]
        ids = list(vocab.values()) + [t.get("id", -1) for t in tok.get("added_tokens") or []]
        size = max(ids) + 1 if ids else 0
        if size != want:
            problems.append(f"config.json vocab_size is {want} but tokenizer.json has {size} tokens")
        if lines is not None:
            differ = vocab_disagreements(lines, vocab)
            if differ:
                problems.append(f"vocab.txt and tokenizer.json disagree on the id of {differ} tokens")
    tok_config = _read_json(folder / "tokenizer_config.json", problems)
    if isinstance(tok_config, dict) and lines is not None:
        mask = tok_config.get("mask_token")
        mask = mask.get("content") if isinstance(mask, dict) else mask
        if mask not in lines:
            problems.append(f"tokenizer_config.json mask_token {mask!r} is not in vocab.txt")
    _read_json(folder / "special_tokens_map.json", problems)
    return problems


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}, from the 8-byte length + JSON header. Raises ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n <= 1 or 8 + n > size:
            raise ValueError("its header length is out of range (truncated or not a safetensors file)")
        header = json.loads(f.read(n))
    if not isinstance(header, dict) or not all(isinstance(t, dict) for t in header.values()):
        raise ValueError("its header is not a table of tensors")
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        fields = (t.get("dtype"), t.get("shape"), t.get("data_offsets"))
        if not (isinstance(fields[0], str) and isinstance(fields[1], list) and isinstance(fields[2], list)
                and len(fields[2]) == 2 and all(isinstance(v, int) for v in (*fields[1], *fields[2]))):  # fmt: skip
            raise ValueError(f"tensor {name!r} in its header lacks a dtype, a shape or its two data offsets")
        begin, stop = t["data_offsets"]
        numel = 1
        for d in t["shape"]:
            numel *= d
        if t["dtype"] in _DTYPE_BYTES and stop - begin != numel * _DTYPE_BYTES[t["dtype"]]:
            raise ValueError(f"tensor {name} has {stop - begin} bytes for shape {t['shape']} {t['dtype']}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"the header describes {8 + n + end} bytes but the file has {size} (truncated?)")
    return header


def _check_weights(path: Path, config: dict) -> list[str]:
    try:
        header = read_safetensors_header(path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"model.safetensors is unreadable: {e}"]
    from mlmtrain.model import BertConfig, hf_tensor_shapes

    try:
        required, optional = hf_tensor_shapes(BertConfig.from_dict(config, "config.json"))
    except UserError as e:
        return [str(e)]
    if config.get("tie_word_embeddings") is False:  # untied: the decoder has its own weight
        required["cls.predictions.decoder.weight"] = optional.pop("cls.predictions.decoder.weight")
    problems = [f"model.safetensors lacks {name}" for name in required if name not in header]
    for name, t in header.items():
        want = required.get(name, optional.get(name))
        if want is None:
            problems.append(f"model.safetensors has a tensor BertForMaskedLM does not use: {name}")
        elif tuple(t["shape"]) != want:
            problems.append(f"model.safetensors {name} has shape {tuple(t['shape'])}, config.json implies {want}")
    if len(problems) > 8:  # a wrong config makes every tensor wrong: say so once, not 200 times
        problems = problems[:8] + [f"... and {len(problems) - 8} more weight problems"]
    return problems


def _check_card(readme: Path) -> list[str]:
    import yaml

    try:
        header = card_header(readme)
    except UnicodeDecodeError:
        return ["README.md (model card) is not UTF-8 text"]
    if header is None:
        return ["README.md (model card) has no YAML header between '---' lines"]
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError as e:
        return [f"README.md YAML header is invalid: {str(e).splitlines()[0]}"]
    if not isinstance(meta, dict):
        return ["README.md YAML header is not a mapping of keys to values"]
    problems = []
    for key, value in CARD_REQUIRED.items():
        if key not in meta:
            problems.append(f"README.md YAML header lacks {key}" + (f": {value}" if value else ""))
        elif value is not None and meta[key] != value:
            problems.append(f"README.md YAML header has {key}: {meta[key]}, expected {value}")
    return problems
