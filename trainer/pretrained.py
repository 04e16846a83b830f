"""Starting from a transformers BERT (`mlmtrain train --init-from`, `mlmtrain eval --model`): find the folder or
download a Hub id, refuse what this trainer would not compute exactly, and read the config and weights in our
layout.

- A path that exists is a local folder; anything else shaped like `owner/name` is a Hub id, fetched with
  `huggingface_hub.snapshot_download` (the only network access here; the files land in the Hub cache).
- Refused, each by name: another `model_type`, `hidden_act` other than exact "gelu", relative positions, a
  decoder or cross-attention, untied output embeddings, a `pad_token_id` other than the tokenizer's [PAD].
- Accepted and converted: BertForMaskedLM, BertForPreTraining (the next-sentence head is dropped), BertModel
  (keys without `bert.`; the MLM head is then initialised), task heads (dropped), TF-era LayerNorm
  `gamma`/`beta` names, fp16/bf16 weights (trained in fp32), `pytorch_model.bin` read with weights_only.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlmtrain.errors import UserError
from mlmtrain.tokenizer import TOKENIZER_FILES

if TYPE_CHECKING:  # torch is imported where weights are read: `mlmtrain prepare` only locates a tokenizer
    import torch

    from mlmtrain.model import BertConfig, BertForMaskedLM

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MLM_HEAD = "cls.predictions."  # what a missing head means: these keys are initialised
ENCODER_PARTS = ("embeddings.", "encoder.", "pooler.")  # BertModel keys, saved without the `bert.` prefix
UNSUPPORTED = {  # config.json key -> (values computed exactly here, what to say)
    "hidden_act": ({"gelu", None}, "mlmtrain computes exact GELU ('gelu', transformers' default) only"),
    "position_embedding_type": ({"absolute", None}, "mlmtrain has learned absolute positions only"),
    "is_decoder": ({False, None}, "mlmtrain trains bidirectional encoders only"),
    "add_cross_attention": ({False, None}, "mlmtrain trains encoders without cross-attention"),
    "tie_word_embeddings": ({True, None}, "mlmtrain ties the MLM decoder to the word embeddings"),
}


def hub_id(source: str) -> str | None:
    """`source` if it names a Hub repository (not an existing local path), else None."""
    return source if HUB_ID.fullmatch(source) and not Path(source).expanduser().exists() else None


def locate(source, what: str = "--init-from", tokenizer_only: bool = False) -> Path:
    """The local folder `source` names: itself, or a Hub id's snapshot (downloaded: the model's config, weights
    and tokenizer files, or only the tokenizer files)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {path} is a file; pass the folder that holds it.")
        from mlmtrain.files import CHECKPOINTS, MANIFEST, read_marker

        is_run = (read_marker(path) or {}).get("kind") == "run" or any((path / CHECKPOINTS).glob(f"step_*/{MANIFEST}"))
        if is_run or ((path / MANIFEST).is_file() and (path / "state.json").is_file()):  # a run, or a checkpoint
            raise UserError(
                f"{what} {path} is an mlmtrain run or checkpoint, not a BERT folder: export it (`mlmtrain export "
                f"--checkpoint {path} --out DIR`) and pass DIR."
            )
        return path
    if hub_id(source) is None:
        raise UserError(f"{what} {source} does not exist (pass a local folder, or a Hub id like klue/bert-base).")
    from huggingface_hub import snapshot_download

    patterns = list(TOKENIZER_FILES) + ([] if tokenizer_only else ["config.json", "model.safetensors"])
    print(f"downloading {source} from the Hugging Face Hub ({', '.join(patterns)})", file=sys.stderr)
    try:
        folder = Path(snapshot_download(source, allow_patterns=patterns))
        if not tokenizer_only and not (folder / "model.safetensors").is_file():
            folder = Path(snapshot_download(source, allow_patterns=[*patterns, "pytorch_model.bin"]))
    except Exception as e:  # huggingface_hub raises its HTTP, not-found and offline errors, all with a message
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{source} is no local folder, and it cannot be downloaded from the Hugging Face Hub: {first_line}"
        ) from None
    return folder


def read_config(folder: Path) -> BertConfig:
    """The folder's config.json as a BertConfig, after refusing any setting this trainer would not compute."""
    from mlmtrain.model import BertConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: pass a transformers model folder (save_pretrained writes one).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object of settings.")
    if config.get("model_type") != "bert":
        what = f"a {config['model_type']!r} model" if "model_type" in config else "no model_type"
        raise UserError(f"{path} names {what}; mlmtrain continues pretraining BERT models only (model_type 'bert').")
    for key, (allowed, why) in UNSUPPORTED.items():
        if not isinstance(config.get(key), (str, int, float, type(None))) or config.get(key) not in allowed:
            raise UserError(f"{folder} has {key}={config.get(key)!r} in config.json: {why}.")
    if config.get("pad_token_id") is None:
        config["pad_token_id"] = 0  # transformers' default
    return BertConfig.from_dict(config, str(path))  # types and ranges: a string would fail mid-run


@dataclass
class Pretrained:
    """A transformers BERT read into our layout."""

    folder: Path
    config: BertConfig
    weights: dict[str, torch.Tensor]  # transformers key names, fp32; the MLM head's keys may be missing
    initialised: list[str]  # MLM head keys the folder lacks: `load_into` keeps the model's own initialisation
    dropped: list[str]  # keys BertForMaskedLM has no use for (pooler, next-sentence or task heads)

    def load_into(self, model: BertForMaskedLM) -> None:
        """Copy the weights into a freshly initialised model (its init stays for the keys the folder lacks)."""
        own = model.hf_state_dict()
        model.load_hf_state_dict({**{k: own[k] for k in self.initialised}, **self.weights})

    def describe(self) -> str:
        notes = [f"{len(self.weights)} tensors from {self.folder}"]
        if self.initialised:
            notes.append(f"the MLM head ({len(self.initialised)} tensors) initialised: the folder has none")
        if self.dropped:
            notes.append(f"{len(self.dropped)} tensors BertForMaskedLM does not use dropped ({self.dropped[0]}, ...)")
        return "; ".join(notes)


def read_pretrained(folder: Path) -> Pretrained:
    """Config and weights of a transformers BERT folder, checked against each other."""
    import torch

    from mlmtrain.model import TIED_KEYS, hf_tensor_shapes

    folder = Path(folder)
    _check_export_files(folder)
    config = read_config(folder)
    raw = _read_weights(folder)
    required, optional = hf_tensor_shapes(config)
    weights, dropped = {}, []
    for key, tensor in raw.items():
        key = _our_name(key)
        if key in required or key in optional:
            weights[key] = tensor.float()
        else:
            dropped.append(key)
    for alias, source in TIED_KEYS.items():
        if alias in weights and source in weights and not torch.equal(weights[alias], weights[source]):
            raise UserError(f"{folder} has a {alias} that differs from {source}: mlmtrain ties the two.")
        if alias in weights:  # a tensor stored under its alias alone (transformers loads it so) is the tied one
            weights.setdefault(source, weights[alias])
    missing = [k for k in required if k not in weights]
    initialised = [k for k in missing if k.startswith(MLM_HEAD)]
    if len(initialised) < len(missing):
        lacking = [k for k in missing if not k.startswith(MLM_HEAD)]
        raise UserError(
            f"{folder} lacks {len(lacking)} encoder weights ({lacking[0]}, ...): its config.json and weights do not "
            "belong together."
        )
    for key, tensor in weights.items():
        want = required.get(key, optional.get(key))
        if tuple(tensor.shape) != want:
            raise UserError(f"{folder}: weight {key} has shape {tuple(tensor.shape)} but config.json implies {want}.")
    return Pretrained(folder, config, weights, initialised, sorted(dropped))


def _check_export_files(folder: Path) -> None:
    """An mlmtrain export is read only if the files a model is built from are the ones it wrote (its manifest's
    sizes and sha256): a changed byte of weights would load and silently score or train something else."""
    from mlmtrain.export_check import EXPORT_MANIFEST
    from mlmtrain.manifest import manifest_problems

    if not (folder / EXPORT_MANIFEST).is_file():
        return
    try:
        entries = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {name: entries[name] for name in ("model.safetensors", "config.json", *TOKENIZER_FILES)}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / EXPORT_MANIFEST} is unreadable: export the checkpoint again.") from None
    problems = manifest_problems(folder, entries, "export")
    if problems:
        raise UserError(f"{folder} is a damaged export: {problems[0]}; export the checkpoint again.")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights; a file that cannot be read whole (truncated, corrupted, not weights) is one
    sentence naming it, never a traceback."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(folder / name)
                import torch

                with warnings.catch_warnings():  # torch's own advice about the legacy format is not ours to print
                    warnings.simplefilter("ignore")
                    return torch.load(folder / name, map_location="cpu", weights_only=True)  # never unpickles code
            except Exception as e:  # SafetensorError, pickle's UnpicklingError, RuntimeError, EOFError, ...
                if "Weights only load failed" in str(e):  # torch's tensors-only unpickler stopped (its advice: off)
                    raise UserError(
                        f"{folder / name} cannot be read as tensors alone (damaged, or it pickles other objects, "
                        "which mlmtrain does not load: they can run code): save the model as model.safetensors "
                        "(transformers' save_pretrained does)."
                    ) from None
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise UserError(f"{folder / name} is damaged or not a weights file ({reason}).") from None
    if (folder / "model.safetensors.index.json").is_file():
        raise UserError(f"{folder} holds sharded weights (model.safetensors.index.json); save them as one file.")
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin.")


def _our_name(key: str) -> str:
    """A transformers state-dict key as BertForMaskedLM names it."""
    if key.startswith(ENCODER_PARTS):
        key = "bert." + key
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def check_tokenizer_fits(config: BertConfig, specials, vocab: list[str], folder) -> None:
    """The model's [PAD] row and vocabulary must be the tokenizer's (`vocab`: its tokens by id), and the folder's
    own tokens its tokens (check_own_tokens): otherwise each embedding row would go on training as another's."""
    vocab_size = len(vocab)
    if config.pad_token_id != specials.pad:
        raise UserError(
            f"{folder} has pad_token_id={config.pad_token_id} in config.json but the tokenizer's [PAD] is id "
            f"{specials.pad}: pass the tokenizer the model was trained with."
        )
    if config.vocab_size != vocab_size:
        raise UserError(
            f"{folder} has vocab_size={config.vocab_size} in config.json but the tokenizer has {vocab_size} tokens: "
            + (
                "its embedding has rows past the tokenizer's (padded, or for added tokens), and mlmtrain needs the two "
                "equal."
                if config.vocab_size > vocab_size
                else "pass the tokenizer the model was trained with."
            )
        )
    check_own_tokens(Path(folder), vocab)


def check_own_tokens(folder: Path, vocab: list[str]) -> None:
    """A tokenizer given beside a model folder (`vocab`: its tokens by id) must hold the folder's own tokenizer's
    tokens id for id, where the folder has one: the same ids would be other tokens."""
    own = _own_vocab(folder)
    if own is not None and own != vocab:
        i = next((i for i, (a, b) in enumerate(zip(own, vocab)) if a != b), min(len(own), len(vocab)))
        raise UserError(
            f"the tokenizer passed has other tokens than {folder}'s own (id {i}: {_row(vocab, i)} against "
            f"{_row(own, i)}): pass the tokenizer the model was trained with, or leave --tokenizer out."
        )


def _own_vocab(folder: Path) -> list[str] | None:
    """The pretrained folder's tokens by id (vocab.txt, else tokenizer.json's table), or None if it has none."""
    from mlmtrain.tokenizer_folder import read_vocab, vocab_rows

    if (folder / "vocab.txt").is_file():
        return vocab_rows(folder / "vocab.txt")
    try:
        return read_vocab(folder) if (folder / "tokenizer.json").is_file() else None
    except UserError:  # no WordPiece table to compare with
        return None


def _row(vocab: list[str], i: int) -> str:
    return repr(vocab[i]) if i < len(vocab) else "no token"
