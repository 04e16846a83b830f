"""`mlmtrain demo`: the whole job on the bundled sample corpus, end to end, with no network:

    tokenizer -> prepare -> train (tiny on CPU, small on a GPU) -> curves.png -> export -> verify -> fill-mask
    -> upload dry run

It prints the final validation MLM loss next to two unigram numbers: the train corpus's unigram entropy,
and the loss a unigram model fitted on train scores on the same validation split. A model that learned
nothing beyond token frequencies sits at the latter; a lower loss is learning from context.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mlmtrain.errors import UserError, require
from mlmtrain.files import LOCK, TMP, Layout, check_out_folder, write_json, write_marker

WIDGET_TEXT = "대한민국의 주권은 [MASK]에게 있고, 모든 권력은 국민으로부터 나온다."
DEMO_REPO = "your-name/mlmtrain-demo"  # a placeholder: the demo uploads nothing (a dry run)


def stage(line: str) -> None:
    """A stage's header line: progress, which --quiet leaves out (the stages' results are printed)."""
    from mlmtrain.progress import quiet

    if not quiet():
        print(line)


def demo_layout():
    """The demo's folder: its result, and one folder of each kind the pipeline makes."""
    from mlmtrain.export_check import EXPORT_LAYOUT
    from mlmtrain.prepare import SHARDS_LAYOUT
    from mlmtrain.run_folder import RUN_LAYOUT
    from mlmtrain.tokenizer import TOKENIZER_LAYOUT

    parts = (("tokenizer", TOKENIZER_LAYOUT), ("data", SHARDS_LAYOUT), ("run", RUN_LAYOUT), ("export", EXPORT_LAYOUT))
    files = ("demo_result.json", LOCK, TMP, f"{TMP}/**")  # LOCK: held while a demo runs in the folder
    return Layout("demo", "a demo", "mlmtrain demo", files, ("demo_result.json",), parts)


def main(args) -> int:
    from mlmtrain import cli, progress
    from mlmtrain.config_load import load_config
    from mlmtrain.evaluate import perplexity, unigram_cross_entropy, unigram_entropy
    from mlmtrain.prepare import load_split, prepare, shard_specials
    from mlmtrain.run_folder import RunLock
    from mlmtrain.text import sample_corpus_path
    from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer
    from mlmtrain.train import train

    out = Path(args.out)
    require("transformers", "mlmtrain demo (it verifies the export and runs fill-mask)", "transformers", "hf")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device: use --device cpu or auto.")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    settings = TokenizerSettings(vocab_size=args.vocab_size)
    settings.validate()
    if args.steps < 0:
        raise UserError(f"--steps must be at least 1 (or 0 for the default), got {args.steps}.")
    steps = args.steps or (400 if cuda else 300)
    cfg = load_config(  # every flag checked before anything is written
        None,
        {
            "out_dir": str(out / "run"),
            "data.data_dir": str(out / "data"),
            "data.tokenizer_dir": str(out / "tokenizer"),
            "model.size": "small" if cuda else "tiny",
            "data.tokens_per_batch": 16384 if cuda else 4096,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 30,
            "train.max_steps": steps,
            "train.eval_every": 100,
            "train.log_every": 10,
            "train.device": "cuda" if cuda else "cpu",
            "train.compile": "off",
        },
    )
    # --force deletes an earlier demo only when every file in it is one the demo wrote, and none runs there: this
    # process holds the folder's lock until it ends
    replace = check_out_folder(out, demo_layout(), replace=args.force, replace_flag="--force", renamed=False)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, print)  # noqa: F841 (held, not used)
    for child in out.iterdir() if replace else ():  # all the demo's own (check_out_folder); the lock stays held
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name != LOCK:
            child.unlink()
    write_marker(out, demo_layout())
    corpus = sample_corpus_path()
    t0 = time.time()

    stage(f"[1/6] tokenizer: WordPiece on {corpus.name}")
    vocab_size = train_tokenizer([corpus], out / "tokenizer", settings, progress=not progress.quiet())
    print(f"      {vocab_size} tokens in the vocabulary")

    stage("[2/6] prepare: token shards")
    meta = prepare(
        [corpus],
        out / "tokenizer",
        out / "data",
        valid_fraction=0.05,
        max_seq_len=128,
        seed=0,
        progress=not progress.quiet(),
    )
    train_tokens = np.asarray(load_split(out / "data", "train").tokens)
    entropy = unigram_entropy(train_tokens, meta["vocab_size"], shard_specials(meta))
    valid_tokens = np.asarray(load_split(out / "data", "valid").tokens)
    baseline = unigram_cross_entropy(train_tokens, valid_tokens, meta["vocab_size"], shard_specials(meta))
    print(
        f"      {meta['train']['sentences']} train / {meta['valid']['sentences']} valid sentences; unigram "
        f"entropy {entropy:.3f} nats (train), a unigram model's loss on valid {baseline:.3f} nats"
    )

    stage(f"[3/6] train: {'small on CUDA' if cuda else 'tiny on CPU'}, {steps} steps")
    summary = train(cfg)
    if summary["exit_code"]:
        print(f"demo stopped ({summary['stopped_by']}); the run so far is in {out / 'run'}")
        return summary["exit_code"]
    valid_loss = summary["valid_loss"]
    print(
        f"      validation MLM loss {valid_loss:.3f} nats (unigram baseline on valid {baseline:.3f}), "
        f"accuracy {summary['valid_accuracy']:.3f}, {summary['tokens_per_s']:.0f} tokens/s"
    )
    print(f"      curves: {draw_curves(out / 'run')}")

    stage("[4/6] export + verify with transformers")
    export_dir = out / "export"
    rc = cli.main(
        [
            "export",
            "--checkpoint",
            str(out / "run"),
            "--tokenizer",
            str(out / "tokenizer"),
            "--out",
            str(export_dir),
            "--name",
            DEMO_REPO,  # the repo of the upload's dry run below: the card's usage example loads it
            "--language",  # the sample: Korean constitution and bills, and King James Bible excerpts
            "ko",
            "--language",
            "en",
            "--widget-text",
            WIDGET_TEXT,
            *progress.flags(),
        ]
    )
    if rc != 0:
        return rc

    stage("[5/6] fill-mask on the widget sentence")
    print(f"      {WIDGET_TEXT}")
    for guess in fill_mask(export_dir, WIDGET_TEXT):
        print(f"      {guess['score']:.3f}  {guess['token_str']}")

    stage("[6/6] upload dry run (nothing is sent)")
    upload = ["upload", "--folder", str(export_dir), "--repo-id", DEMO_REPO, "--dry-run"]
    rc = cli.main([*upload, *progress.flags()])
    result = {
        "vocab_size": vocab_size,
        "unigram_entropy": entropy,
        "unigram_valid_loss": baseline,
        "valid_loss": valid_loss,
        "valid_accuracy": summary["valid_accuracy"],
        "steps": steps,
        "tokens_per_s": summary["tokens_per_s"],
        "wall_s": round(time.time() - t0, 1),
        "device": "cuda" if cuda else "cpu",
    }
    write_json(out / "demo_result.json", result)
    verdict = "below" if valid_loss < baseline else "NOT below"
    print(
        f"done in {result['wall_s']:.0f} s: validation MLM loss {valid_loss:.3f} is {verdict} the unigram model's "
        f"{baseline:.3f} on the same split (perplexity {perplexity(valid_loss):.0f} vs {perplexity(baseline):.0f}; "
        f"train-corpus unigram entropy {entropy:.3f}); exported model in {export_dir}"
    )
    return rc


def draw_curves(run_dir: Path) -> str:
    """RUN/curves.png (loss, lr, throughput), or why it was not drawn."""
    from mlmtrain.plot import plot

    try:
        return str(plot(run_dir, run_dir / "curves.png"))
    except UserError as e:
        return f"not drawn: {e}"


def fill_mask(folder: Path, text: str, top_k: int = 5) -> list[dict]:
    """transformers' fill-mask pipeline on the exported folder (what the Hub widget would run)."""
    import transformers

    transformers.logging.disable_progress_bar()  # its weight-loading bar would draw into logs
    fill = transformers.pipeline("fill-mask", model=str(folder), tokenizer=str(folder), device="cpu")
    return fill(text, top_k=top_k)
