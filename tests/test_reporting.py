"""`--report-to`: TensorBoard event files and a W&B run (offline) mirror metrics.jsonl, the resolved config and
the summary; a missing package is one sentence before any device work; the allocator columns are in every row.
`mlmtrain plot` draws a run's curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_run import assert_refused, in_process
from test_train import tiny_config

from mlmtrain.errors import UserError
from mlmtrain.train import train


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_row_eval_config_and_summary(data_dir, tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 4, "train.eval_every": 2})
    cfg.train.report_to = "tensorboard"
    summary = train(cfg)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/valid_loss"} <= scalars
    assert {"eval/valid_accuracy", "summary/final_loss", "summary/valid_loss"} <= scalars
    logged = rows(run)
    train_rows = [r for r in logged if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in train_rows
    ]
    evals = [(e.step, e.value) for e in events.Scalars("eval/valid_loss")]
    assert evals == [(r["step"], pytest.approx(r["valid_loss"])) for r in logged if "valid_loss" in r]
    assert events.Scalars("summary/final_loss")[0].value == pytest.approx(summary["final_loss"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"precision": "auto"' in config_text and '"train.precision": "fp32"' in config_text  # and resolved
    # the allocator columns: null on CPU, in every row
    assert all(r["peak_reserved_bytes"] is None and r["alloc_retries"] is None and r["oom_count"] is None
               for r in train_rows)  # fmt: skip


def test_wandb_offline_run(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3, "train.eval_every": 3})
    cfg.train.report_to = "wandb"
    train(cfg)
    wandb.teardown()  # W&B's service process writes the run's log file; wait for it, as the end of a process does
    run_id = (run / "wandb" / "mlmtrain_run_id").read_text()
    offline = [p for p in (run / "wandb").iterdir() if p.name.startswith("offline-run-") and p.name.endswith(run_id)]
    assert len(offline) == 1
    # offline, W&B keeps only its transaction log (protobuf records; keys and JSON values appear as text)
    records = (offline[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train/loss", b"train/tokens_per_s", b"eval/valid_loss", b"summary/final_loss", b"train.precision"):
        assert key in records, key
    last_loss = [r for r in rows(run) if "loss" in r][-1]["loss"]
    assert json.dumps(last_loss).encode() in records


def test_a_missing_tracker_package_is_one_sentence_before_device_work(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "run")
    cfg.train.report_to = "tensorboard,wandb"
    with pytest.raises(UserError, match=r'--report-to wandb needs the wandb package: pip install -e "\.\[wandb\]"'):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--report-to takes tensorboard, wandb or none"):
        tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.report_to": "mlflow"})


def test_plot_draws_curves(data_dir, tokenizer_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mlmtrain.cli import main

    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3, "train.eval_every": 2}))
    assert main(["plot", str(run)]) == 0
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["plot", str(tmp_path)]) == 2  # not a run folder: a clear error, no traceback
    rows = (run / "metrics.jsonl").read_text().splitlines()
    diverged = [json.dumps({**json.loads(r), "loss": None}) if '"loss"' in r else r for r in rows]
    (run / "metrics.jsonl").write_text("\n".join(diverged) + "\n")  # every window non-finite: still plotted
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert "note: 3 of 3 log windows had a non-finite loss" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    with open(run / "metrics.jsonl", "a") as f:  # a line the run is still writing (or a kill cut short)
        f.write('{"step": 4, "lo')
    assert main(["plot", str(run)]) == 0
    good = (run / "metrics.jsonl").read_bytes()
    for edit, phrase in (  # an edited file: one sentence naming what is wrong, no traceback
        (b"\xff\n", "is not UTF-8 text"),
        (b"[1, 2]\n", "line 6 is not a metrics row with step"),
        (b'{"step": 9, "loss": 1.0}\n', "line 6 is not a metrics row with step, lr, tokens_per_s"),
    ):
        (run / "metrics.jsonl").write_bytes(good.rsplit(b"\n", 1)[0] + b"\n" + edit)
        capsys.readouterr()
        assert main(["plot", str(run)]) == 2
        err = capsys.readouterr().err
        assert phrase in err and len(err.strip().splitlines()) == 1, err


def test_plot_writes_only_the_png_it_says_and_replaces_only_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 8.0 - s, "lr": 1e-3, "tokens_per_s": 1000.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.png").write_text("my notes, not an image")
    refusals = {
        "curves.txt": "is not a .png path",
        "afile/c.png": "afile is a file, not a folder",
        "run": "is not a .png path",
        "notes.png": "exists and is not a PNG image",
    }
    for out, phrase in refusals.items():
        assert_refused(in_process(capsys, "plot", run, "--out", tmp_path / out), phrase)
    assert (tmp_path / "notes.png").read_text() == "my notes, not an image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes.png", "run"]  # nothing else written
    out = tmp_path / "new" / "c.png"
    for _ in range(2):  # a second run replaces the image it wrote
        done = in_process(capsys, "plot", run, "--out", out)
        assert done.returncode == 0 and done.stdout.strip() == f"wrote {out}", done.stdout + done.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.png"]  # no temporary file left
    if Path("/proc").is_dir():  # a folder nothing can be created in: one sentence, the token hidden
        token = "hf_FAKEabcdefghijklmnopqrstuvwxyz1234"
        line = assert_refused(in_process(capsys, "plot", run, "--out", f"/proc/{token}.png"), "could not write")
        assert token not in line and "hf_***" in line


def _metrics_run(tmp_path: Path, extra: str = "") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 8.0 - s, "lr": 1e-3, "tokens_per_s": 1000.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return run


def test_plot_out_is_checked_by_its_suffix_any_case_its_kind_and_its_whole_signature(tmp_path, capsys):
    """--out: `X.PNG` is a .png path (kills L01); a folder named `x.png` is refused as a folder (kills L02); a
    file that begins like a PNG but is not one is not replaced (kills L13: only 4 bytes of the signature read)."""
    pytest.importorskip("matplotlib")
    run = _metrics_run(tmp_path)
    done = in_process(capsys, "plot", run, "--out", tmp_path / "CURVES.PNG")
    assert done.returncode == 0 and (tmp_path / "CURVES.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr
    (tmp_path / "pics.png").mkdir()
    assert_refused(in_process(capsys, "plot", run, "--out", tmp_path / "pics.png"), "is a folder")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG but my notes after it")
    assert_refused(in_process(capsys, "plot", run, "--out", fake), "exists and is not a PNG image")
    assert fake.read_bytes() == b"\x89PNG but my notes after it"


def test_plot_refuses_a_damaged_line_before_the_last_and_a_file_without_training_rows(tmp_path, capsys):
    """Only the last line, with no newline after it, may be cut short (a run still writing it): a damaged line
    followed by a newline is an edited file (kills L04, L05); metrics with no training row yet say so (L08)."""
    pytest.importorskip("matplotlib")
    run = _metrics_run(tmp_path, '{"step": 4, "lo\n')
    assert_refused(in_process(capsys, "plot", run), "line 4 is not JSON")
    assert not (run / "curves.png").exists()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "valid_loss": 7.0}) + "\n")
    assert_refused(in_process(capsys, "plot", run), "holds no training steps yet")
    assert not (run / "curves.png").exists()


def test_plot_replaces_its_image_all_at_once(tmp_path, capsys):
    """A second plot renames a new image into place: a viewer that opened the old one reads it whole (kills L09:
    the image written over in place, truncating the file the viewer reads)."""
    pytest.importorskip("matplotlib")
    run = _metrics_run(tmp_path)
    assert in_process(capsys, "plot", run).returncode == 0
    old = (run / "curves.png").read_bytes()
    with open(run / "metrics.jsonl", "a") as f:  # a longer run: another image
        f.write(json.dumps({"step": 4, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 3000.0}) + "\n")
    with open(run / "curves.png", "rb") as viewer:
        assert viewer.read(8) == old[:8]
        assert in_process(capsys, "plot", run).returncode == 0
        assert viewer.read() == old[8:]
    assert (run / "curves.png").read_bytes() != old
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_plot_says_whether_the_run_folder_is_missing_or_a_file(tmp_path, capsys):
    """One sentence that names what is wrong with the argument (kills L10: the two words swapped)."""
    assert_refused(in_process(capsys, "plot", tmp_path / "nowhere"), "nowhere is missing")
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(in_process(capsys, "plot", tmp_path / "notes.txt"), "notes.txt is a file")
