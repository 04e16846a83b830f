"""The model card (README.md of an export): the YAML header the Hub reads (fill-mask widget, languages, license)
and what the model is, what it was trained on, for how long and how well, and the commands that made it, with
the values the run actually used (never "auto"). `--card-extra FILE` appends the user's own section."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mlmtrain.errors import UserError
from mlmtrain.text import CONJOINING_JAMO, HANGUL_SYLLABLE

DEFAULT_WIDGETS = {  # the blog post's widget sentence for Korean
    "ko": "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다.",
    "en": "The capital of France is [MASK].",
}


def default_widget(languages: list[str], vocab: list[str]) -> str:
    """The fill-mask widget's sentence when none is given: the first --language's (English for one without a
    sentence here); with no language, Korean for a vocabulary of more Hangul pieces than Latin ones, else English."""
    if languages:
        return DEFAULT_WIDGETS.get(languages[0], DEFAULT_WIDGETS["en"])
    hangul = sum(bool(HANGUL_SYLLABLE.search(piece) or CONJOINING_JAMO.search(piece)) for piece in vocab)
    latin = sum(any("a" <= c <= "z" for c in piece.lower()) for piece in vocab)
    return DEFAULT_WIDGETS["ko" if hangul > latin else "en"]


def fit_warnings(vocab: list[str], data_meta: dict | None) -> list[str]:
    """What a user of the model must know of how its tokenizer fits text: a vocabulary that spells Hangul in
    conjoining jamo (trained on NFD text: ordinary NFC Korean reads as [UNK]), and a share of [UNK] in the
    training tokens that `prepare` noted. The export says each, and the card's Limits."""
    from mlmtrain.prepare import UNK_NOTE_SHARE, unk_share

    out = []
    jamo = sum(bool(CONJOINING_JAMO.search(piece)) for piece in vocab)
    syllables = sum(bool(HANGUL_SYLLABLE.search(piece)) for piece in vocab)
    if jamo > syllables:
        out.append(
            f"The vocabulary spells Hangul in conjoining jamo ({jamo:,} such pieces, {syllables:,} with syllables): "
            "its tokenizer was trained on decomposed (NFD) text, so ordinary (NFC) Korean reads as [UNK]."
        )
    share, _ = unk_share(data_meta or {})
    if share > UNK_NOTE_SHARE:
        out.append(f"{share:.1%} of the training text's tokens were [UNK]: the tokenizer does not fit it.")
    return out


_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # ISO 639 code, optionally with a region or script


def parse_languages(values) -> list[str]:
    """`--language ko --language en` and `--language ko,en` (or a mix) as ["ko", "en"], checked."""
    if isinstance(values, str):
        values = [values]
    languages = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    for code in languages:
        if not _LANGUAGE.match(code):
            raise UserError(f"--language takes ISO 639 codes like ko or en (comma-separated or repeated), got {code!r}")
    return list(dict.fromkeys(languages))


def read_card_extra(path) -> str:
    """The user's own Markdown section for the card, read and checked at export time."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"--card-extra {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--card-extra {path} is not a readable UTF-8 text file ({e})") from None
    if not text:
        raise UserError(f"--card-extra {path} is empty")
    if text.startswith("---"):
        raise UserError(f"--card-extra {path} starts with a YAML header: the card has one already; give Markdown only")
    return text


def model_card(
    *,
    title: str | None,
    config,
    run_config: dict,
    state: dict,
    step: int,
    language,
    license: str,
    widgets: list[str],
    data_meta: dict | None,
    tokenizer_record: dict | None = None,
    unigram: tuple[float | None, str] = (None, "not computed"),
    extra: str | None = None,
    base_model: str | None = None,
    warnings: list[str] = (),
):
    """The README.md: the YAML header the Hub reads + what, on what, how long, how good, how to reproduce.
    `title` is the Hub repo id (or any name); `unigram` is (loss, how it was measured or why not); `base_model` is
    the Hub id of the model training started from (`--init-from`), for the header (a run that started from a
    local folder names that folder in the text only); `warnings` go to the Limits (`fit_warnings`)."""
    from huggingface_hub import ModelCard, ModelCardData

    from mlmtrain import __version__
    from mlmtrain.config import MODEL_SIZES

    languages = parse_languages(language)
    card_data = ModelCardData(
        language=languages[0] if len(languages) == 1 else (languages or None),
        license=license,
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["bert", "fill-mask", "mlmtrain"],
        mask_token="[MASK]",
        widget=[{"text": t} for t in widgets],
        base_model=base_model,
    )
    run = _resolved_run(run_config.get("run") or {}, state.get("resolved") or {})
    init_from = base_model or (run.get("model") or {}).get("init_from")
    origin = f"continued from `{init_from}`" if init_from else "pretrained from scratch"
    if init_from and not base_model:  # a local folder: its name only (a public card shows no home directory)
        origin = f"continued from a local model (`{Path(init_from).name}`)"
    data, mask, optim, train = (run.get(k) or {} for k in ("data", "mask", "optim", "train"))
    size = next(
        (name for name, dims in MODEL_SIZES.items() if all(getattr(config, k) == v for k, v in dims.items())), "custom"
    )
    model_id = title if title and "/" in title else "PATH_OR_REPO_ID"  # this folder, or the repo it went to
    tokens = state.get("real_tokens")
    lines = [
        f"# {title or f'BERT {size} masked-language model'}",
        "",
        f"A BERT masked-language model (`BertForMaskedLM`, size `{size}`: {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads, vocabulary {config.vocab_size}) "
        f"{origin} with mlmtrain on {UNITS[data.get('pack', 'sentence')]}: masked language "
        "modelling only, no next-sentence prediction.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'fill = pipeline("fill-mask", model="{model_id}")',
        f"print(fill({widgets[0]!r}))",
        "```",
        "",
        "## Training",
        "",
        f"- Data: {_data_text(data_meta, data)}.",
        f"- Steps: {step:,}" + (f", {tokens:,} real (non-padding) tokens seen" if tokens else "") + ".",
        f"- Masking: {mask.get('mask_prob', 0.15):.0%} of tokens selected"
        + (" (whole words)" if mask.get("whole_word") else "")
        + f", of those {mask.get('mask_frac', 0.8):.0%} [MASK], {mask.get('random_frac', 0.1):.0%} random.",
        *([_optimizer_text(data, optim, train)] if "lr" in optim else []),
        *_dropout_lines(config, state),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(state, unigram),
        *_data_statistics(data_meta, config.vocab_size),
        "## Reproduce",
        "",
        "```bash",
        *_commands(tokenizer_record, data_meta, state.get("commands") or [state.get("command")], base_model),
        "```",
        "",
        "## Limits",
        "",
        _positions_text(data_meta, config.max_position_embeddings, bool(state.get("init_from")))
        + "Token type ids are all 0 (no sentence pairs were seen).",
        *(f"{w}" for w in warnings),
        "",
        *([extra, ""] if extra else []),
        f"Exported by mlmtrain {__version__}.",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _positions_text(data_meta: dict | None, positions: int, continued: bool) -> str:
    """Which position embeddings the shards' segments reached (`continued`: the run started from another model,
    which may have trained the others)."""
    if not data_meta:
        return ""
    cap = data_meta["max_seq_len"]
    if cap >= positions:
        return f"Trained on segments of up to {cap} tokens: every position embedding. "
    untrained = "were not trained in this run" if continued else "were never trained"
    return f"Trained on segments of up to {cap} tokens; position embeddings past that (up to {positions}) {untrained}. "


def _resolved_run(run: dict, resolved: dict) -> dict:
    """The run config with the values its `auto` settings took (recorded in the checkpoint since it has them);
    an `auto` an older checkpoint did not resolve stays None, which the card says is not recorded."""
    run = {section: dict(values) if isinstance(values, dict) else values for section, values in run.items()}
    for dotted in ("train.precision", "train.compile", "train.device", "data.tokens_per_batch", "optim.warmup_steps"):
        section, key = dotted.split(".")
        if section in run and key in run[section]:
            value = resolved.get(dotted, run[section][key])
            run[section][key] = None if value in ("auto", 0) else value
    return run


def _dropout_lines(config, state: dict) -> list[str]:
    """What dropout the run applied: config.json says `attention_probs_dropout_prob` (for fine-tuning), but the
    fast attention kernels apply none while pretraining (the checkpoint records what was applied)."""
    p, applied = config.hidden_dropout_prob, state.get("attention_dropout")
    if not p:
        return ["- Dropout: none."]
    where = (state.get("resolved") or {}).get("model.attention")
    probs = "not recorded" if applied is None else (f"{applied}" if applied else f"none ({where} attention has none)")
    return [f"- Dropout: {p} on hidden states; on attention probabilities {probs}."]


def _optimizer_text(data: dict, optim: dict, train: dict) -> str:
    def known(value, unit=""):
        return f"{value}{unit}" if value is not None else "not recorded"

    return (
        f"- Optimiser: AdamW, peak learning rate {optim['lr']} after a linear warm-up over "
        f"{known(optim.get('warmup_steps'))} step{'s' * (optim.get('warmup_steps') != 1)}, "
        f"{optim.get('schedule', 'linear')} decay; {known(data.get('tokens_per_batch'))} tokens per micro-batch x "
        f"{optim.get('grad_accum', 1)} micro-batches per step; precision {known(train.get('precision'))}."
    )


# what a segment held, by `data.pack` (packing.py)
UNITS = {"sentence": "single sentences", "document": "runs of consecutive sentences of one document"}
SEGMENTS = {"sentence": "[CLS] sentence [SEP]", "document": "[CLS] s1 [SEP] s2 [SEP] ..., sentences of one document"}


def _data_text(data_meta: dict | None, data: dict) -> str:
    if not data_meta:
        return f"token shards in `{public(data['data_dir'])}`" if data.get("data_dir") else "not recorded"
    train_split = data_meta.get("train") or {}
    return (
        f"{_count(train_split.get('sentences'))} sentences / {_count(train_split.get('tokens'))} tokens from "
        f"{', '.join(_input_names(data_meta)) or 'not recorded'}, in segments of at most "
        f"{data_meta.get('max_seq_len')} tokens ({SEGMENTS[data.get('pack', 'sentence')]})"
    )


def _evaluation_lines(state: dict, unigram: tuple[float | None, str]) -> list[str]:
    from mlmtrain.evaluate import perplexity

    metrics = state.get("metrics") or {}
    loss, accuracy = state.get("valid_loss"), metrics.get("valid_accuracy")
    if loss is None:
        why = (
            "its validation masked no token"
            if metrics.get("valid_targets") == 0
            else "it stopped before its first evaluation"
        )
        return [f"Not measured ({why}).", ""]
    baseline, how = unigram
    targets, at = metrics.get("valid_targets"), metrics.get("step")
    when = f", the evaluation at step {at:,}" if isinstance(at, int) and at != state.get("step") else ""
    lines = [
        f"On held-out sentences (the validation split{f', {targets:,} masked tokens' if targets else ''}{when}):",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| MLM loss | {loss:.4f} nats (perplexity {perplexity(loss):.2f}) |",
    ]
    if accuracy is not None:
        lines.append(f"| masked-token accuracy | {accuracy:.3f} |")
    lines.append(
        f"| unigram baseline loss | {baseline:.4f} nats ({how}) |"
        if baseline is not None
        else f"| unigram baseline loss | {how} |"
    )
    return lines + [
        "",
        "The unigram baseline is the loss of a model that knows only how often each token occurs; a lower MLM loss "
        "is learning from context.",
        "",
    ]


def _data_statistics(data_meta: dict | None, vocab_size: int) -> list[str]:
    if not data_meta:
        return []
    lines = [
        "### Data",
        "",
        "| split | documents | sentences | tokens | tokens per sentence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for split in ("train", "valid"):
        s = data_meta.get(split) or {}
        mean = s["tokens"] / s["sentences"] if s.get("sentences") else None
        lines.append(
            f"| {split} | {_count(s.get('documents'))} | {_count(s.get('sentences'))} | {_count(s.get('tokens'))} | "
            + (f"{mean:.1f} (max {s.get('max_sentence_len')}) |" if mean else "- |")
        )
    skipped, repaired = data_meta.get("lines_skipped"), data_meta.get("lines_repaired")
    lines += [
        "",
        f"Vocabulary {vocab_size:,} WordPiece tokens; sentences longer than {data_meta.get('max_seq_len', 0) - 2} "
        f"tokens split into pieces: {_count(data_meta.get('sentences_split'))}; input lines skipped (invalid "
        f"UTF-8, NUL bytes): {_count(skipped)}; repaired (CR endings, byte-order mark): {_count(repaired)}.",
        "",
    ]
    return lines


def _commands(
    tokenizer_record: dict | None, data_meta: dict | None, train_commands: list, base_model: str | None
) -> list[str]:
    """The tokenizer, prepare and train commands, with the recorded settings (the train commands: each one that
    trained these weights, in order); input files by name only (the card is public: no local paths)."""
    inputs = " ".join(_input_names(data_meta)) if data_meta else "CORPUS"
    lines = ["# the WordPiece tokenizer"]
    if tokenizer_record:
        s = tokenizer_record.get("settings") or {}
        names = " ".join(_input_name(p) for p in tokenizer_record.get("inputs") or []) or inputs
        flags = [
            f"--vocab-size {s.get('vocab_size')}",
            f"--limit-alphabet {s.get('limit_alphabet')}",
            f"--min-frequency {s.get('min_frequency')}",
            f"--model-max-length {s.get('model_max_length')}",
        ]
        for key in ("lowercase", "strip_accents", "clean_text", "handle_chinese_chars"):
            if key in s:
                flags.append(f"--{'' if s[key] else 'no-'}{key.replace('_', '-')}")
        if s.get("wordpieces_prefix", "##") != "##":
            flags.append(f"--wordpieces-prefix '{s['wordpieces_prefix']}'")
        lines.append(f"mlmtrain tokenizer --input {names} --out tokenizer {' '.join(flags)}")
    else:
        lines.append("# the tokenizer's settings were not recorded (a tokenizer not made by this mlmtrain version)")
    lines.append("# token shards (train/validation split)")
    if data_meta:
        lines.append(
            f"mlmtrain prepare --input {inputs} --tokenizer tokenizer --out data --valid-fraction "
            f"{data_meta.get('valid_fraction')} --max-seq-len {data_meta.get('max_seq_len')} "
            f"--seed {data_meta.get('seed')}"
        )
    else:
        lines.append("# the token shards' settings are not known (at export their meta.json was missing, unreadable, "
                     "or written by a later prepare)")  # fmt: skip
    train_commands = [c for c in train_commands if c]
    if len(train_commands) > 1:
        lines.append("# training: the command lines the run recorded, in order (each after the first resumed it)")
    else:
        lines.append("# training: the command line the run recorded")
    lines += [_pretty_command(c, base_model) for c in train_commands] or ["# (not recorded)"]
    return lines


def _input_names(data_meta: dict) -> list[str]:
    return [_input_name(p) for p in data_meta.get("inputs") or []]


def _input_name(entry) -> str:
    """A meta.json input as the card names it: a file's name, or a dataset's name and split."""
    if isinstance(entry, dict) and entry.get("dataset"):
        return f"{public(entry['dataset'])} ({entry.get('split')})"
    return Path(str(entry.get("path", entry) if isinstance(entry, dict) else entry)).name


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


# where the Reproduce block's train command shows a local path: by what the commands above it make, or its last part
_MADE_ABOVE = {"--data": "data", "--tokenizer": "tokenizer", "data.data_dir": "data", "data.tokenizer_dir": "tokenizer"}
_PATHS = {"--out", "--config", "--resume", "--init-from", "out_dir", "model.init_from", *_MADE_ABOVE}


def _pretty_command(command: str, base_model: str | None = None) -> str:
    """The recorded command line as the card shows it: `mlmtrain` for the program however it was started (its
    install path, `python -m mlmtrain.cli`), and no local path: the shards and tokenizer as the commands above
    name them, any other path by its last part; `--init-from` whole when it was the Hub id `base_model` (a
    relative `dir/model` looks the same: the run recorded which it was)."""
    try:
        words = shlex.split(command)
        if "\\" in command and shlex.join(words) != command:  # a space-joined Windows record: shlex ate the \
            raise ValueError
    except ValueError:  # recorded before 2026-12-01, joined with spaces
        words = command.split(" ")
    words = [part for w in words for part in (w.split("=", 1) if w.startswith("--set=") else [w])]  # --set=K=V
    start = next((i for i, w in enumerate(words) if Path(w).name in ("mlmtrain", "cli.py", "mlmtrain.cli")), None)
    words = ["mlmtrain", *words[start + 1 :]] if start is not None else [public(words[0]), *words[1:]]
    shown = words[:1]
    for before, word in zip(words, words[1:]):
        name, eq, value = word.partition("=")
        if eq and (word.startswith("--") or before == "--set"):  # --out=/x/run, --set data.data_dir=/x/data
            shown.append(f"{name}={_shown(name, value, base_model)}")
        else:
            shown.append(_shown(before, word, base_model))
    return shlex.join(shown)


def _shown(key: str, value: str, base_model: str | None) -> str:
    """`value` given to flag or config key `key`, as a public card shows it."""
    if key in _PATHS and not (key in ("--init-from", "model.init_from") and value == base_model):
        return _MADE_ABOVE.get(key) or last_part(value)
    return public(value)


def is_local_path(value: str) -> bool:
    """A value that names a local file or folder by a path a public card must not show (absolute, from home,
    from the working folder, a file: URL); a bare name or a Hub id `org/name` is not one."""
    if value.startswith(("/", "~", "./", "../", "\\", "file:")):
        return True
    return re.match(r"^[A-Za-z]:[\\/]", value) is not None


def public(value: str) -> str:
    """`value` as a public card may show it: a local path by its last part, anything else as it is."""
    return last_part(value) if is_local_path(value) else value


def last_part(path: str) -> str:
    """The last part of a path, POSIX or Windows (a share's `\\\\server\\name` too)."""
    parts = [part for part in re.split(r"[\\\\/]+", path) if part]
    return parts[-1] if parts else path


def read_data_meta(run_config: dict) -> dict | None:
    data_dir = ((run_config.get("run") or {}).get("data") or {}).get("data_dir")
    path = Path(data_dir) / "meta.json" if data_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
