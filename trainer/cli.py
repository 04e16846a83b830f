"""The `mlmtrain` command. Each subcommand lives in its own module, which provides
`add_args(parser)` and `main(args) -> int`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mlmtrain import __version__, progress
from mlmtrain.errors import UserError

# subcommand -> (module, one-line help). Modules are imported lazily so `mlmtrain --help` is instant.
COMMANDS = {
    "tokenizer": ("mlmtrain.tokenizer", "train a WordPiece tokenizer on text files"),
    "prepare": ("mlmtrain.prepare", "tokenize text files into memory-mapped token shards"),
    "train": ("mlmtrain.train", "pretrain a BERT masked-language model on token shards"),
    "eval": ("mlmtrain.evaluate", "score models (MLM loss, perplexity, accuracy) on the same masked tokens"),
    "export": ("mlmtrain.export", "write a checkpoint as a Hugging Face BertForMaskedLM folder"),
    "upload": ("mlmtrain.upload", "upload an exported folder to the Hugging Face Hub"),
    "demo": ("mlmtrain.demo", "run the whole pipeline on the bundled sample corpus"),
    "plot": ("mlmtrain.plot", "draw loss, lr and throughput curves of a run to PNG"),
    "bench": ("mlmtrain.benchmarks.suite", "measure throughput against the HF Trainer baseline and the hardware"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmtrain",
        description="Train a BERT masked-language model from sentences and publish it to the Hugging Face Hub.",
    )
    parser.add_argument("--version", action="version", version=f"mlmtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the command being run (or all of them for --help listings).
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        progress.add_args(p)
        if wanted is None or wanted == name:
            module = importlib.import_module(module_name)
            module.add_args(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    progress.configure(no_progress=args.no_progress, quiet=args.quiet)
    try:
        return int(args._module.main(args) or 0)
    except UserError as e:
        print(f"mlmtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mlmtrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
