"""A tokenizer folder, whoever wrote it (`mlmtrain tokenizer`, transformers' save_pretrained, the Hub): the
checks every command runs when it first reads one, and what it reads from it. The ids come from vocab.txt
(or, without one, tokenizer.json's WordPiece table) and must agree with tokenizer.json; the specials' ids and
the never-masked ids; the casing transformers' BertTokenizer will use (tokenizer_config.json's flags) must be
tokenizer.json's; the fingerprint says when two folders map text to the same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer

from mlmtrain.errors import UserError
from mlmtrain.tokenizer import (
    DEFAULT_SPECIALS,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG_KEYS,
    TOKENIZER_RECORD,
    UNUSED_TOKEN,
    WORDPIECES_PREFIX,
    SpecialTokens,
    TokenizerSettings,
    tokenizer_config,
)

# tokenizer_config.json classes that build BertTokenizer's normalizer and pre-tokenizer from the config's flags
BERT_CLASSES = ("BertTokenizer", "BertTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast",
                "ElectraTokenizer", "ElectraTokenizerFast")  # fmt: skip
REWRITE = (
    "`AutoTokenizer.from_pretrained(DIR).save_pretrained(NEW_DIR)` writes a folder transformers and mlmtrain read alike"
)

# ------------------------------------------------------------------------------------------------- the folder


def _check_tokenizer_dir(tokenizer_dir) -> Path:
    path = Path(tokenizer_dir)
    if path.is_file():
        raise UserError(f"{path} is a file, not a tokenizer folder: pass the folder that holds it ({path.parent}).")
    if not path.is_dir():
        raise UserError(f"tokenizer folder {path} does not exist; make one with `mlmtrain tokenizer`.")
    if not (path / "tokenizer.json").is_file():
        how = (  # the fast class: transformers 4's slow BertTokenizer saves no tokenizer.json
            "transformers writes it: "
            "`BertTokenizerFast.from_pretrained(DIR, do_lower_case=...).save_pretrained(NEW_DIR)`"
        )
        raise UserError(
            f"{path} is not a tokenizer folder: tokenizer.json is missing ("
            + (how if (path / "vocab.txt").is_file() else "make one with `mlmtrain tokenizer`")
            + ")."
        )
    source = _tokenizer_config_file(path) if (path / "tokenizer_config.json").is_file() else {}
    if source.get("tokenizer_class", "BertTokenizer") in BERT_CLASSES:  # export names the class it names
        tok_json = _tokenizer_json(path)
        norm, pre = (
            x if isinstance(x, dict) else {} for x in (tok_json.get("normalizer"), tok_json.get("pre_tokenizer"))
        )
        if (
            norm.get("type") != "BertNormalizer"
            or not norm.get("clean_text", True)
            or pre.get("type") != "BertPreTokenizer"
        ):
            raise UserError(
                f"{path}: tokenizer.json's normalizer and pre-tokenizer ({norm.get('type')}, {pre.get('type')}) "
                "are not transformers' BertTokenizer's (a BertNormalizer that cleans text, the BertPreTokenizer), "
                f"which it builds in their place: transformers would split text unlike mlmtrain; {REWRITE}."
            )
    return path


def _tokenizer_json(path: Path) -> dict:
    try:
        tok_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
    if not isinstance(tok_json, dict):
        raise UserError(f"cannot read {path / 'tokenizer.json'}: it holds no JSON object")
    return tok_json


def load_tokenizer(tokenizer_dir) -> Tokenizer:
    """The fast tokenizer, its five specials checked (present, the same ids in vocab.txt and tokenizer.json)."""
    path = _check_tokenizer_dir(tokenizer_dir)
    try:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
        raise UserError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
    read_special_tokens(path)
    added = tok.get_vocab_size(with_added_tokens=True) - tok.get_vocab_size(with_added_tokens=False)
    if added > 0:  # ids past the WordPiece table: vocab.txt, the model's rows and the shards would disagree
        first = tok.id_to_token(tok.get_vocab_size(with_added_tokens=False))
        raise UserError(
            f"{path} has {added} tokens added past its WordPiece vocabulary ({first!r}, ...): mlmtrain trains "
            "WordPiece vocabularies only; train a tokenizer that holds them (`mlmtrain tokenizer`) or leave them out."
        )
    prefix = getattr(tok.model, "continuing_subword_prefix", WORDPIECES_PREFIX)
    if prefix != WORDPIECES_PREFIX:
        raise UserError(
            f"{path} continues words with {prefix!r}, but transformers' BertTokenizer only reads "
            f"{WORDPIECES_PREFIX!r}: retrain it with `mlmtrain tokenizer` (which always uses {WORDPIECES_PREFIX!r})."
        )
    return tok


# -------------------------------------------------------------------------------------------------------- ids


def read_vocab(tokenizer_dir) -> list[str]:
    """vocab.txt as a list: index = token id. A folder without one (transformers 5's save_pretrained writes
    none): tokenizer.json's WordPiece table in id order, which export writes as the vocab.txt."""
    path = _check_tokenizer_dir(tokenizer_dir)
    if (path / "vocab.txt").is_file():
        return vocab_rows(path / "vocab.txt")
    model = _tokenizer_json(path).get("model") or {}
    table = model.get("vocab") if model.get("type") == "WordPiece" else None
    by_id = (
        sorted(table, key=table.get) if isinstance(table, dict) and all(type(i) is int for i in table.values()) else []
    )
    if not by_id or [table[t] for t in by_id] != list(range(len(by_id))):
        raise UserError(f"{path} has no vocab.txt, and tokenizer.json holds no WordPiece vocabulary with ids 0..N-1.")
    return by_id


def vocab_rows(vocab_txt: Path) -> list[str]:
    """A vocab.txt's rows: index = token id."""
    try:
        rows = vocab_txt.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{vocab_txt} is not UTF-8 text (byte {e.start}): it is damaged or not a vocab.txt.") from None
    if rows[0].startswith("\ufeff"):  # transformers reads it as part of token 0's text
        raise UserError(f"{vocab_txt} starts with a byte-order mark (a UTF-8-with-BOM save): token 0 would be "
                        f"{rows[0]!r}; save it as plain UTF-8.")  # fmt: skip
    return rows[:-1] if rows[-1] == "" else rows  # a last row without its newline is a row (as transformers reads)


def vocab_bytes(tokenizer_dir) -> bytes:
    """The folder's vocab.txt as bytes; without one, the vocab.txt its tokenizer.json gives (one row per id)."""
    path = Path(tokenizer_dir)
    if (path / "vocab.txt").is_file():
        return (path / "vocab.txt").read_bytes()
    return "".join(t + "\n" for t in read_vocab(path)).encode("utf-8")


def vocab_disagreements(vocab: list[str], json_vocab: dict) -> int:
    """How many rows of vocab.txt (`vocab`, index = id) tokenizer.json's WordPiece table (`json_vocab`, token ->
    id) puts at another id, or leaves out, plus the ids it has beyond vocab.txt's rows."""
    beyond = sum(1 for i in json_vocab.values() if not isinstance(i, int) or not 0 <= i < len(vocab))
    return sum(json_vocab.get(token) != i for i, token in enumerate(vocab)) + beyond


def read_special_tokens(tokenizer_dir) -> SpecialTokens:
    """The special-token layout of a tokenizer folder: the ids of [PAD] [UNK] [CLS] [SEP] [MASK] in vocab.txt
    (tokenizer.json must agree), and the never-masked ids. One sentence if a special is missing."""
    path = _check_tokenizer_dir(tokenizer_dir)
    vocab = read_vocab(path)
    index = {token: i for i, token in reversed(list(enumerate(vocab)))}  # the first row of a repeated token
    tok_json = _tokenizer_json(path)
    json_vocab = (tok_json.get("model") or {}).get("vocab") or {}
    differ = vocab_disagreements(vocab, json_vocab)
    rows = "vocab.txt" if (path / "vocab.txt").is_file() else "tokenizer.json's vocabulary"
    if differ:  # a repeated or missing vocab.txt row: transformers and the shards would read other ids
        raise UserError(
            f"{path}: vocab.txt and tokenizer.json disagree on the id of {differ} tokens; the two files must come "
            "from the same tokenizer."
        )
    added = {t.get("content"): t.get("id") for t in tok_json.get("added_tokens") or [] if t.get("special")}
    ids = []
    for token in SPECIAL_TOKENS:
        if token not in index:
            raise UserError(f"{path}: {rows} has no {token}: a BERT vocabulary needs {' '.join(SPECIAL_TOKENS)}.")
        in_json = added.get(token, json_vocab.get(token))
        if in_json != index[token]:
            raise UserError(
                f"{path} puts {token} at id {index[token]} in {rows} but at {in_json} in tokenizer.json; "
                "the two files must come from the same tokenizer."
            )
        ids.append(index[token])
    extra = [i for i in added.values() if isinstance(i, int) and 0 <= i < len(vocab)]
    unused = [i for i, token in enumerate(vocab) if UNUSED_TOKEN.fullmatch(token)]
    return SpecialTokens(*ids, never_mask=_ranges([*ids, *extra, *unused]))


def _ranges(ids) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return tuple((a, b) for a, b in out)


# -------------------------------------------------------------------------------------- tokenizer_config.json


CASING_KEYS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
TRANSFORMERS_CASING = (True, None, True)  # BertTokenizer's defaults for CASING_KEYS
NORMALIZER_KEYS = ("lowercase", "strip_accents", "handle_chinese_chars")  # the same flags in tokenizer.json


def read_tokenizer_config(tokenizer_dir) -> dict:
    """The clean tokenizer_config.json of a tokenizer folder: its own file's BertTokenizer keys, the casing flags
    those of tokenizer.json's normalizer (what the shards were tokenized with, whatever the file says), completed
    with the defaults and the special tokens."""
    path = Path(tokenizer_dir)
    source = _tokenizer_config_file(path) if (path / "tokenizer_config.json").is_file() else {}
    flags = _normalizer_flags(path)
    if flags is not None:
        source = {**source, **dict(zip(CASING_KEYS, flags))}
    config = tokenizer_config(TokenizerSettings())
    config.update({k: v for k, v in source.items() if k in TOKENIZER_CONFIG_KEYS and k not in SPECIAL_TOKENS_MAP})
    length = source.get("model_max_length")  # None: not stated (the exporter decides)
    config["model_max_length"] = None if length is None else int(min(length, 1 << 62))  # HF's "no limit": 1e30
    return config


def _tokenizer_config_file(path: Path) -> dict:
    """A folder's own tokenizer_config.json: a JSON object whose BertTokenizer keys have the types
    transformers reads them as (a wrong one fails only when the export is loaded back, after training)."""
    file = path / "tokenizer_config.json"
    try:
        source = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {file}: {e}") from None
    if not isinstance(source, dict):
        raise UserError(f"cannot read {file}: it holds no JSON object of settings")
    flags = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "clean_up_tokenization_spaces")
    bad = [k for k in flags if k in source and not isinstance(source[k], bool)]
    bad = [k for k in bad if not (k == "strip_accents" and source[k] is None)]  # null: follow do_lower_case
    length = source.get("model_max_length")
    is_number = isinstance(length, (int, float)) and not isinstance(length, bool)
    bad += [] if length is None or (is_number and length >= 1) else ["model_max_length"]
    bad += [] if isinstance(source.get("tokenizer_class", ""), str) else ["tokenizer_class"]
    if bad:
        values = ", ".join(f"{k}={source[k]!r}" for k in bad)
        raise UserError(f"{file} has {values}: flags must be true, false or null, model_max_length a positive number.")
    return source


def transformers_casing_problem(tokenizer_dir, model_dir=None) -> str | None:
    """For a transformers model's tokenizer (`--init-from`, `eval --model`): the model learned text as
    transformers' BertTokenizer splits it, whose normalizer comes from tokenizer_config.json's flags (a missing
    do_lower_case is true) in the model's folder (`model_dir`, where it has one, else `tokenizer_dir`), not from
    tokenizer.json, which mlmtrain tokenizes with (`tokenizer_dir`'s). What differs, or None."""
    path = _check_tokenizer_dir(tokenizer_dir)
    config_dir = Path(model_dir) if model_dir and (Path(model_dir) / "tokenizer_config.json").is_file() else path
    source = _tokenizer_config_file(config_dir) if (config_dir / "tokenizer_config.json").is_file() else {}
    ours = _normalizer_flags(path)
    theirs = _casing(*(source.get(k, default) for k, default in zip(CASING_KEYS, TRANSFORMERS_CASING)))
    if source.get("tokenizer_class", "BertTokenizer") not in BERT_CLASSES or ours is None or ours == theirs:
        return None
    differ = [i for i in range(3) if ours[i] != theirs[i]]
    said = ", ".join(f"{CASING_KEYS[i]}={str(theirs[i]).lower()}" for i in differ)
    has = ", ".join(f"{NORMALIZER_KEYS[i]}={str(ours[i]).lower()}" for i in differ)
    return (
        f"{path}: transformers tokenizes for this model with {said} ({config_dir / 'tokenizer_config.json'}; a "
        f"missing do_lower_case is true) but {path / 'tokenizer.json'}, which mlmtrain tokenizes with, has {has}: "
        f"the model would see text split unlike in its pretraining; {REWRITE}, and prepare the shards with it."
    )


def _normalizer_flags(path: Path) -> tuple[bool, bool, bool] | None:
    """tokenizer.json's casing, when its normalizer is the BertNormalizer BertTokenizer builds (else None)."""
    norm = _tokenizer_json(path).get("normalizer") or {}
    if not isinstance(norm, dict) or norm.get("type") != "BertNormalizer":
        return None
    return _casing(norm.get("lowercase", True), norm.get("strip_accents"), norm.get("handle_chinese_chars", True))


def _casing(do_lower_case, strip_accents, tokenize_chinese_chars) -> tuple[bool, bool, bool]:
    """BertNormalizer's effective flags: strip_accents null follows the lowercasing."""
    return (
        bool(do_lower_case),
        bool(do_lower_case if strip_accents is None else strip_accents),
        bool(tokenize_chinese_chars),
    )


# ----------------------------------------------------------------------------------------- what else it holds


def read_tokenizer_record(tokenizer_dir) -> dict | None:
    """TOKENIZER_RECORD of a folder `mlmtrain tokenizer` wrote; None for other tokenizer folders."""
    path = Path(tokenizer_dir) / TOKENIZER_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError):
        return None


def tokenizer_fingerprint(tokenizer_dir) -> str:
    """sha256 of vocab.txt, the normalizer settings and the special-token layout: two folders with the same
    fingerprint map text to the same ids and mask alike, so shards made with one can be trained with the other
    (file formatting may differ)."""
    path = _check_tokenizer_dir(tokenizer_dir)
    normalizer = _tokenizer_json(path).get("normalizer")
    h = hashlib.sha256()
    h.update(vocab_bytes(path))
    h.update(json.dumps(normalizer, sort_keys=True).encode())
    specials = read_special_tokens(path)
    if specials != DEFAULT_SPECIALS:
        # tokenizer.json can mark specials that vocab.txt does not show, and they change the masking; the 0-4
        # layout hashes without them, so the fingerprints its shards and checkpoints already record still match
        h.update(json.dumps(specials.to_dict()).encode())
    return h.hexdigest()


def check_unchanged(tokenizer_dir, fingerprint: str, command: str) -> None:
    """Refuse when `tokenizer_dir` no longer has `fingerprint` (taken before `command` read it): another command
    replaced it meanwhile (`mlmtrain tokenizer --overwrite`), so what was read may mix the two tokenizers' files
    and ids. Called just before the output is renamed into place."""
    if tokenizer_fingerprint(tokenizer_dir) != fingerprint:
        raise UserError(
            f"{tokenizer_dir} changed while `mlmtrain {command}` read it (another command replaced it): nothing was "
            f"written or replaced; run `mlmtrain {command}` again."
        )
