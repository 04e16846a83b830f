"""The `mlmtrain` command: every subcommand's flags, then its module's `main(args) -> int`, imported only to run
it. Nothing here imports torch, so `--help`, `--version` and argument errors answer at once. A UserError prints
one sentence and exits 2; README "What can go wrong" lists every exit code. Nothing it prints, a bug's traceback
included, shows a token-shaped string: each message passes through `errors.redact_tokens`.

`train` flags write straight into the run config: a flag's destination is the config key it sets (`--lr` ->
`optim.lr`), its help is that key's comment in config.py, and `--set KEY=VALUE` reaches every other key
(`mlmtrain train --help-config` lists them all, with their defaults).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from mlmtrain import __version__, progress
from mlmtrain.config import MODEL_SIZES, PRECISIONS, field_docs
from mlmtrain.config_load import defaults_toml
from mlmtrain.corpus_check import add_corpus_args
from mlmtrain.errors import UserError, redact_tokens
from mlmtrain.stop import STREAM_NAMES, NamedStream, exit_now, handled
from mlmtrain.tokenizer import WORDPIECES_PREFIX, TokenizerSettings

BENCH_SECTIONS, BENCH_OPTIONAL = "ceilings,mask,model,train,sweep", "ablation"


def tokenizer_args(p) -> None:
    d = TokenizerSettings()
    add_corpus_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer files into")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=d.vocab_size,
        help=f"vocabulary size to aim for, specials included (default {d.vocab_size}); the real size can be smaller",
    )
    p.add_argument(
        "--limit-alphabet",
        type=int,
        default=d.limit_alphabet,
        help=f"keep only this many most frequent characters; rarer ones become [UNK] (default {d.limit_alphabet})",
    )
    p.add_argument(
        "--min-frequency",
        type=int,
        default=d.min_frequency,
        help=f"minimum count for a merged piece to enter the vocabulary (default {d.min_frequency})",
    )
    for flag, help_text in (
        ("lowercase", "lowercase text before tokenizing (default off)"),
        ("strip-accents", "NFD-decompose and drop accents (default off; it also splits Hangul into jamo)"),
        (
            "clean-text",
            "drop control characters and normalize whitespace (always on: transformers' BertTokenizer "
            "cleans text whatever the folder says, so --no-clean-text is refused)",
        ),
        ("handle-chinese-chars", "split CJK ideographs (hanja) into single-character words (default on)"),
    ):
        default = getattr(d, flag.replace("-", "_"))
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
    p.add_argument(
        "--wordpieces-prefix",
        default=d.wordpieces_prefix,
        help=f"prefix of word-continuation pieces; only {WORDPIECES_PREFIX!r}, which transformers' BertTokenizer reads",
    )
    p.add_argument(
        "--model-max-length",
        type=int,
        default=d.model_max_length,
        help=f"model_max_length written to tokenizer_config.json (default {d.model_max_length})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer `mlmtrain tokenizer` wrote in --out")


def prepare_args(p) -> None:
    add_corpus_args(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR_OR_HUB_ID",
        help="tokenizer folder from `mlmtrain tokenizer` or of a transformers BERT (a Hub id is downloaded)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the shards into (new, or empty)")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="fraction of split units (documents, cut every 64 sentences) held out for validation (default 0.01)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=128,
        help="longest model input; sentences over max_seq_len - 2 tokens are split into pieces (default 128)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards `mlmtrain prepare` wrote in --out (only once the new ones are complete)",
    )


# train: flag -> the config key it sets, and its argparse settings. The help is the key's comment in config.py.
TRAIN_FLAGS = {
    "--data": ("data.data_dir", dict(metavar="DIR")),
    "--tokenizer": ("data.tokenizer_dir", dict(metavar="DIR")),
    "--out": ("out_dir", dict(metavar="RUN")),
    "--model": ("model.size", dict(choices=list(MODEL_SIZES))),
    "--init-from": ("model.init_from", dict(metavar="PATH_OR_HUB_ID")),
    "--max-steps": ("train.max_steps", dict(type=int)),
    "--tokens-per-batch": ("data.tokens_per_batch", dict(type=int)),
    "--seed": ("train.seed", dict(type=int)),
    "--lr": ("optim.lr", dict(type=float)),
    "--warmup-steps": ("optim.warmup_steps", dict(type=int)),
    "--grad-accum": ("optim.grad_accum", dict(type=int)),
    "--eval-every": ("train.eval_every", dict(type=int)),
    "--checkpoint-every": ("train.checkpoint_every", dict(type=int)),
    "--precision": ("train.precision", dict(choices=["auto", *PRECISIONS])),
    "--compile": ("train.compile", dict(action="store_const", const="on")),
    "--no-compile": ("train.compile", dict(action="store_const", const="off")),
    "--whole-word-mask": ("mask.whole_word", dict(action="store_const", const=True)),
    "--pack": ("data.pack", dict(choices=["sentence", "document"])),
    "--profile-steps": ("train.profile_steps", dict(metavar="A:B")),
    "--profile-memory": ("train.profile_memory", dict(action="store_const", const=True)),
    "--report-to": ("train.report_to", dict(metavar="NAMES")),
}


COMPILE_HELP = {
    "--compile": "torch.compile the step, on a CPU too",
    "--no-compile": "do not compile (default: on CUDA)",
}


class HelpConfig(argparse.Action):
    """`--help-config`: every config key, its default and its meaning (config_load.defaults_toml), then exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(defaults_toml(), sys.stdout)  # as --help writes (a closed reader: exit 1)
        parser.exit()


def train_args(p) -> None:
    docs = field_docs()
    for flag, (key, settings) in TRAIN_FLAGS.items():
        help_text = COMPILE_HELP.get(flag) or docs[key][1]
        if "type" in settings:
            settings = {"metavar": key.split(".")[-1].upper(), **settings}
        p.add_argument(flag, dest=key, help=f"{help_text} ({key})".replace("%", "%%"), **settings)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from the newest complete checkpoint in --out (or from PATH)",
    )
    p.add_argument("--change-max-steps", action="store_true", help="with --resume: accept another --max-steps")
    p.add_argument(
        "--nproc", type=int, help="processes on this machine, run under torch's elastic agent (as torchrun runs them)"
    )
    p.add_argument("--config", help="TOML run config: a path, or a packaged one's name (tiny_cpu, base_gpu, large_gpu)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key, e.g. optim.lr=3e-4 (--help-config lists them)",
    )
    p.add_argument("--help-config", action=HelpConfig, nargs=0, help="list every config key with its default, exit")


def eval_args(p) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_HUB_ID",
        help="a run folder (its newest checkpoint), a checkpoint, an export, a transformers BERT folder or a Hub id",
    )
    p.add_argument("--compare", metavar="PATH_OR_HUB_ID", help="a second model, scored on the same masked tokens")
    p.add_argument("--data", metavar="DIR", help="token shards from `mlmtrain prepare` (instead of a corpus)")
    p.add_argument("--data-split", choices=["valid", "train"], default="valid", help="shard split (default valid)")
    add_corpus_args(p, required=False)
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's)")
    p.add_argument("--max-seq-len", type=int, default=128, help="corpus: longest segment, as in prepare (128)")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument(
        "--layout",
        choices=["auto", "flat", "rows"],
        default="auto",
        help="batches packed flat, or in rows of the shards' max_seq_len (data.layout = rows); auto (default): a "
        "run's or checkpoint's own, else flat",
    )
    p.add_argument(
        "--pack",
        choices=["auto", "sentence", "document"],
        default="auto",
        help="segments of one sentence, or of neighbouring sentences of a document up to max_seq_len (data.pack); "
        "auto (default): a run's or checkpoint's own, else sentence",
    )
    p.add_argument("--max-batches", type=int, default=0, help="score at most this many batches (default 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens masked (default 0.15)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32 (default) or bf16 autocast")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def export_args(p) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, or a run folder (its newest complete checkpoint is used)",
    )
    p.add_argument("--tokenizer", help="the tokenizer the model was trained with (default: the run's)")
    p.add_argument("--out", required=True, help="the folder to write (new or empty, or an export to --overwrite)")
    p.add_argument(
        "--language", action="append", help="model card language code(s), e.g. ko; repeat or comma-separate for several"
    )
    p.add_argument("--name", help="the card's title: the Hub repo id it will be uploaded to (NAME/REPO) or any name")
    p.add_argument("--card-extra", metavar="FILE", help="a Markdown file appended to the model card as your section")
    p.add_argument(
        "--license",
        default="apache-2.0",
        help="model card license: one of the Hub's identifiers, huggingface.co/docs/hub/repositories-licenses "
        "(`upload` has the Hub check it; default: apache-2.0)",
    )
    p.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the Hub model training started from, for the card's base_model (default: the run's "
        "--init-from when it was a Hub id)",
    )
    p.add_argument(
        "--widget-text",
        action="append",
        metavar="TEXT",
        help="a fill-mask example with [MASK] for the Hub widget; repeat for several",
    )
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp32", help="weights dtype in model.safetensors")
    p.add_argument("--no-verify", action="store_true", help="skip loading the folder back with transformers")
    p.add_argument("--overwrite", action="store_true", help="replace an export `mlmtrain export` wrote in --out")


def upload_args(p) -> None:
    p.add_argument("--folder", required=True, help="an export folder written by `mlmtrain export`")
    p.add_argument(
        "--repo-id",
        required=True,
        metavar="NAME/REPO",
        help="the model repo: your user name or an organization you can write to, then the repo name",
    )
    p.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (an existing repo keeps its visibility; a public one is refused)",
    )
    p.add_argument(
        "--revision", metavar="BRANCH", help="commit to this branch, created from main if missing (default: main)"
    )
    p.add_argument("--commit-message", help="default: names the run and step of the export")
    p.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the token from this file (default: HF_TOKEN, then the saved `hf auth login`)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be created and uploaded, and the model card header; send nothing",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of lines")
    p.add_argument("--token", help=argparse.SUPPRESS)  # only to refuse it without echoing it (upload.main)


def demo_args(p) -> None:
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (default: demo_out)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: 300 on CPU, 400 on a GPU)")
    p.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary to request (default 8000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (default), cpu or cuda")
    p.add_argument("--force", action="store_true", help="start over when --out holds an earlier demo (its files only)")


def plot_args(p) -> None:
    p.add_argument("run_dir", help="a run folder written by `mlmtrain train` (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def bench_args(p) -> None:
    p.add_argument("--out", required=True, help="folder for results.json, report.md and the PNG charts")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized smoke run: tiny model, small batches, no torch.compile (16 s on 2 CPU cores)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument(
        "--sections",
        default=BENCH_SECTIONS,
        help=f"comma-separated, run in this order (default {BENCH_SECTIONS}; also {BENCH_OPTIONAL})",
    )
    p.add_argument("--size", help="model size for train and sweep (default base; tiny with --quick)")
    p.add_argument(
        "--sweep-tokens",
        metavar="T1,T2,...",
        help="tokens per batch of the sweep (default 16384,65536,262144; 512,1024 with --quick)",
    )
    p.add_argument("--sweep-caps", metavar="C1,C2", help="sequence caps of the sweep (default 128,512)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wall-clock budget: no section starts past it, and no sweep point that the longest point "
        "so far says would end past it (0 = none)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of an existing OUT/results.json that this run does not redo; sweep "
        "points already measured there are not measured again",
    )
    p.add_argument(
        "--remeasure",
        action="append",
        metavar="ROW",
        help="with --merge: measure this ablation row again rather than keep it (its code changed since); repeatable",
    )
    p.add_argument(
        "--skip",
        action="append",
        metavar="ROW",
        help="do not measure this ablation row in this call (it says so; a later --merge measures it); repeatable",
    )
    p.add_argument("--work", help="folder for data, runs and checkpoints (default: a temporary folder, removed)")


# subcommand -> (module whose main(args) runs it, one-line help, its flags)
COMMANDS = {
    "tokenizer": ("mlmtrain.tokenizer", "train a WordPiece tokenizer on a corpus", tokenizer_args),
    "prepare": ("mlmtrain.prepare", "tokenize a corpus into memory-mapped token shards", prepare_args),
    "train": ("mlmtrain.launch", "pretrain a BERT masked-language model on token shards", train_args),
    "eval": ("mlmtrain.evaluate", "score models (MLM loss, perplexity, accuracy) on the same masked tokens", eval_args),
    "export": ("mlmtrain.export", "write a checkpoint as a Hugging Face BertForMaskedLM folder", export_args),
    "upload": ("mlmtrain.upload", "upload an exported folder to the Hugging Face Hub", upload_args),
    "demo": ("mlmtrain.demo", "run the whole pipeline on the bundled sample corpus", demo_args),
    "plot": ("mlmtrain.plot", "draw loss, lr and throughput curves of a run to PNG", plot_args),
    "bench": ("mlmtrain.benchmarks.suite", "measure throughput against the HF Trainer baseline", bench_args),
}


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one sentence (no usage block: `--help` shows it) and never echoes a
    token pasted in the wrong place."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {redact_tokens(message)} (see `{self.prog} --help`)\n")

    def _print_message(self, message: str, file=None) -> None:
        """argparse's, except that a reader gone away (`--help | head` with unbuffered stdout: `python -u`) reaches
        `main`, which exits 1 as it does for buffered output; argparse ignores every failed write and exits 0."""
        file = file or sys.stderr
        if not message or file is None:
            return
        try:
            file.write(message)
        except BrokenPipeError:
            raise
        except OSError:  # as argparse
            pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that cleanups run (`mlmtrain train` handles them itself)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def _terminate(signum, frame):
    raise Terminated(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mlmtrain",
        description="Train a BERT masked-language model from sentences and publish it to the Hugging Face Hub.",
    )
    parser.add_argument("--version", action="version", version=f"mlmtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        progress.add_args(p)
    parser.commands = sub.choices  # a flag a command does not know is refused by that command's parser
    return parser


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # the `mlmtrain` command itself, not a call from Python
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # `mlmtrain train: error: ...`, as the command's other usage errors say
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit:  # --help, --version, a usage error: what they wrote is flushed here, not at exit
        _flush_or_exit()
        raise
    except BrokenPipeError:
        os._exit(1)
    if args.command is None:
        parser.print_help()
        return 2
    # a name in another encoding reaches Python as lone surrogates (os.fsdecode), which no file records: say it now
    if bad := next((a for a in argv if any("\udc80" <= c <= "\udcff" for c in a)), None):
        _say(args.command, f"error: '{os.fsencode(bad).decode('utf-8', 'backslashreplace')}' is not valid UTF-8 (a "
             "name in another encoding, as unzipping a Windows-made archive gives): rename it, e.g. `convmv -f "
             "cp949 -t utf-8 --notest NAME`")  # fmt: skip
        return 2
    args.argv = list(argv)  # as given: `train --nproc` runs the same command in each process
    progress.configure(no_progress=args.no_progress, quiet=args.quiet)
    # SIGTERM and SIGHUP (not when ignored: `nohup`) end a command through its cleanups, as Ctrl-C does
    previous = {sig: signal.signal(sig, _terminate) for sig in handled((signal.SIGTERM, signal.SIGHUP))}
    previous_int = signal.getsignal(signal.SIGINT)  # a finished train ignores it: a caller gets it back
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s and NamedStream(s, name) for s, name in zip(streams, STREAM_NAMES))  # None: closed
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        code = int(module.main(args) or 0)
        if sys.stdout is not None:  # a failed write of what is still buffered is said below, not at the exit
            sys.stdout.flush()
        return code
    except UserError as e:
        _say(args.command, f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(args.command, "interrupted")
        return exit_now(130) if program else 130
    except Terminated as e:
        _say(args.command, f"stopped by {e.signal.name}")
        return exit_now(128 + e.signal) if program else 128 + e.signal
    except BrokenPipeError:
        os._exit(1)
    except OSError as e:  # a write the system refused, outside a command's own handling: one sentence too
        from mlmtrain.files import WRITE_ERRNOS, write_failure

        if e.filename in STREAM_NAMES:  # `> file` on a full disk: the command's own files are complete or absent
            _say(args.command, f"error: could not write to {e.filename}: {e.strerror or e}")
            return 2
        if e.errno not in WRITE_ERRNOS:
            return _crashed()
        _say(args.command, f"error: {write_failure(e)}")
        return 2
    except Exception:
        return _crashed()
    finally:
        sys.stdout, sys.stderr = streams
        # as the program (not called in-process), the exit code is decided here: a SIGTERM during the
        # interpreter's shutdown (about a second with torch loaded) would turn a finished command into 143
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if program else handler)
        if program:  # Ctrl-C as well: the command has its exit code, its output is written or not
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, previous_int)


def _flush_or_exit() -> None:
    """Flush stdout; a reader that went away (`mlmtrain --help | head`) exits 1 without a traceback (at the
    interpreter's exit the same flush would print one and exit 120)."""
    if sys.stdout is None:  # started with it closed (`>&-`, a daemon): nothing was written
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os._exit(1)


def _say(command: str, message: str) -> None:
    """`mlmtrain COMMAND: MESSAGE` on stderr, never showing a token (README: every error shows it as hf_***)."""
    print(f"mlmtrain {command}: {redact_tokens(message)}", file=sys.stderr)


def _crashed() -> int:
    """A bug, not a user mistake: the traceback Python would print, with any token-shaped text hidden too."""
    print(redact_tokens(traceback.format_exc()), end="", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
