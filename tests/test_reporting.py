"""`--report-to`: TensorBoard event files and a W&B run (offline) mirror metrics.jsonl, the resolved config and
the summary; a missing package is one sentence before any device work; the allocator columns are in every row."""

from __future__ import annotations

import json

import pytest
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
