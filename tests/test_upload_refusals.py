"""`mlmtrain upload` refusing what it must not send: broken or unverified folders, tokens in the wrong place,
files that are not plain, a folder that changes while it is read, an endpoint that is not the Hub."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
from upload_env import (
    CARD,
    WRITE_TOKEN,
    api_requests,
    assert_clean_error,
    list_another_file,
    upload,
    upload_in_process,
    write_manifest,
)

from mlmtrain.export_check import EXPORT_MANIFEST, check_export_folder


@pytest.fixture
def upload_here(monkeypatch, capsys):
    """`mlmtrain upload` in this process (upload_env.upload_in_process): what these tests refuse is refused before
    anything is sent, and a new interpreter for each would import torch and transformers again (~7 s)."""
    return functools.partial(upload_in_process, monkeypatch, capsys)


# -- refusing broken folders ----------------------------------------------------------------------


def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _add_to_manifest(folder: Path, name: str) -> None:
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest))


def _rewrite_weights_header(folder: Path, change) -> None:
    """model.safetensors with its JSON header changed by `change(header, its first tensor's name)`, its tensor
    bytes kept."""
    data = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header, next(k for k in header if k != "__metadata__"))
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


BREAKAGES = {  # name -> (how to break the folder, whether to refresh the manifest after, expected problem)
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), False, "model.safetensors is missing"),
    "no_card": (lambda f: (f / "README.md").unlink(), False, "README.md is missing"),
    "no_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), False, "tokenizer.json is missing"),
    "no_manifest": (lambda f: (f / EXPORT_MANIFEST).unlink(), False, "mlmtrain_export.json is missing"),
    "edited_after_export": (lambda f: (f / "README.md").write_text(CARD + "edit\n"), False, "changed after export"),
    "edited_same_size": (lambda f: (f / "README.md").write_text(CARD.replace("tiny", "tinY")), False, "sha256"),
    "vocab_mismatch": (
        lambda f: _rewrite_config(f, vocab_size=json.loads((f / "config.json").read_text())["vocab_size"] + 1),
        True,
        "vocab_size is",
    ),
    "weights_do_not_match_config": (
        lambda f: _rewrite_config(f, intermediate_size=48),
        True,
        "intermediate.dense.weight has shape (32, 16), config.json implies (48, 16)",
    ),
    "truncated_weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
        True,
        "model.safetensors is unreadable",
    ),
    "card_without_header": (lambda f: (f / "README.md").write_text("# model\n"), True, "no YAML header"),
    "card_not_utf8": (lambda f: (f / "README.md").write_bytes(CARD.encode("cp949")), True, "is not UTF-8 text"),
    "vocab_not_utf8": (lambda f: (f / "vocab.txt").write_bytes(b"\xff\xfe[PAD]\n"), True, "vocab.txt is not UTF-8"),
    "weights_header_not_a_table": (
        lambda f: (f / "model.safetensors").write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]"),
        True,
        "its header is not a table of tensors",
    ),
    "card_without_pipeline_tag": (
        lambda f: (f / "README.md").write_text(CARD.replace("pipeline_tag: fill-mask\n", "")),
        True,
        "lacks pipeline_tag",
    ),
    "config_not_json": (lambda f: (f / "config.json").write_text('{"model_type": "be'), True, "is not valid JSON"),
    "config_not_bert": (lambda f: _rewrite_config(f, model_type="roberta"), True, "is 'roberta', expected 'bert'"),
    "config_without_heads": (lambda f: _rewrite_config(f, num_attention_heads=0), True, "positive integer num_att"),
    "heads_do_not_divide": (lambda f: _rewrite_config(f, num_attention_heads=3), True, "is not divisible by"),
    "manifest_without_files": (
        lambda f: (f / EXPORT_MANIFEST).write_text(json.dumps({"files": {}, "verified": True})),
        False,
        'has no "files" table',
    ),
    "manifest_lists_a_path": (
        lambda f: _add_to_manifest(f, "../model.safetensors"),
        False,
        "which is not a plain file name of the export",
    ),
    "tokenizer_json_without_vocab": (
        lambda f: (f / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}})),
        True,
        "has no model.vocab table",
    ),
    "weights_header_length_out_of_range": (
        lambda f: (f / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}"),
        True,
        "header length is out of range",
    ),
    "weights_tensor_of_wrong_bytes": (
        lambda f: _rewrite_weights_header(f, lambda h, first: h[first].update(shape=[1, 1])),
        True,
        "bytes for shape [1, 1]",
    ),
    "weights_entry_without_offsets": (
        lambda f: _rewrite_weights_header(f, lambda h, first: h[first].pop("data_offsets")),
        True,
        "in its header lacks a dtype, a shape or its two data offsets",
    ),
    "weights_with_a_foreign_tensor": (
        lambda f: _rewrite_weights_header(f, lambda h, first: h.update(extra=dict(h[first]))),
        True,
        "a tensor BertForMaskedLM does not use: extra",
    ),
    "card_yaml_invalid": (lambda f: (f / "README.md").write_text("---\nlanguage: [ko\n---\n"), True, "is invalid"),
    "card_yaml_a_list": (lambda f: (f / "README.md").write_text("---\n- ko\n---\n"), True, "not a mapping"),
    "card_wrong_library": (
        lambda f: (f / "README.md").write_text(CARD.replace("library_name: transformers", "library_name: pytorch")),
        True,
        "has library_name: pytorch, expected transformers",
    ),
    "vocab_files_disagree": (
        lambda f: (f / "vocab.txt").write_text(
            "\n".join(reversed((f / "vocab.txt").read_text(encoding="utf-8").splitlines())) + "\n", encoding="utf-8"
        ),
        True,
        "disagree",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_check_export_folder_names_the_problem(breakage, export_dir):
    assert check_export_folder(export_dir) == []
    break_it, refresh_manifest, expected = BREAKAGES[breakage]
    break_it(export_dir)
    if refresh_manifest:  # a folder that is consistent with its manifest but wrong inside
        write_manifest(export_dir)
    problems = check_export_folder(export_dir)
    assert any(expected in p for p in problems), problems


def test_broken_or_unverified_folder_is_refused_and_nothing_sent(hub, export_dir, tmp_path, upload_here):
    write_manifest(export_dir, verified=False)
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export", "nothing was sent")
    assert "not verified" in result.stderr
    _rewrite_config(export_dir, vocab_size=7)
    (export_dir / "README.md").unlink()
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "README.md is missing" in result.stderr and "config.json is" in result.stderr
    run = tmp_path / "run"  # not an export at all (a run folder, say): one sentence, not a list of every file
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = upload_here("--folder", str(run), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "is not an export of `mlmtrain export`", "export a checkpoint first")
    assert "\n  - " not in result.stderr
    assert hub.requests == []


# -- what the upload does not take on trust ---------------------------------------------------------


def test_a_token_pasted_in_the_wrong_place_is_never_echoed(export_dir, tmp_path, upload_here):
    unreachable = "http://127.0.0.1:9"  # nothing may be sent anyway
    base = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert"]
    cases = [
        ([*base, "--token-file", WRITE_TOKEN], "looks like the token itself"),
        ([*base, WRITE_TOKEN], "unrecognized arguments: hf_***"),  # a stray positional: argparse's own error
        # what goes into the repo's public history: refused before anything is sent (tests/test_export.py:
        # the same for what an export writes into the card)
        (["--folder", str(export_dir), "--repo-id", WRITE_TOKEN], "looks like a Hugging Face token"),
        ([*base, "--commit-message", f"release {WRITE_TOKEN}", "--dry-run"], "looks like a Hugging Face token"),
        ([*base, "--revision", WRITE_TOKEN], "looks like a Hugging Face token"),
    ]
    for args, phrase in cases:  # argparse's own error exits the process: that case runs in one of its own
        if phrase.startswith("unrecognized"):
            result = upload(tmp_path, *args, endpoint=unreachable, token=None)
        else:
            result = upload_here(*args, endpoint=unreachable, token=None)
        assert result.returncode == 2 and phrase in result.stderr, result.stderr
        assert WRITE_TOKEN not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_only_regular_files_with_plain_names_are_sent(hub, export_dir, tmp_path, upload_here):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(export_dir / "model.safetensors", outside)
    (export_dir / "model.safetensors").symlink_to(outside)
    write_manifest(export_dir)  # consistent with what the link points to
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export", "nothing was sent")
    assert "model.safetensors is a symbolic link" in result.stderr

    (export_dir / "model.safetensors").unlink()
    shutil.move(outside, export_dir / "model.safetensors")
    list_another_file(export_dir, "*.json", b"{}")  # as a pattern, it would select every JSON file
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "a name with wildcard characters" in result.stderr
    assert api_requests(hub) == []


def test_verified_is_checked_again_not_taken_from_the_manifest(hub, export_dir, upload_here):
    """A folder edited after its export, its manifest rewritten to match and to say "verified": the files and
    shapes are consistent, but transformers no longer computes what we do, so nothing is sent."""
    _rewrite_config(export_dir, hidden_act="relu")
    write_manifest(export_dir, verified=True)
    assert check_export_folder(export_dir) == []
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "does not pass verification with transformers again", "nothing was sent")
    assert "logits differ" in result.stderr and api_requests(hub) == []


EDITED_DURING_THE_UPLOAD = """
import pathlib, sys
import mlmtrain.export as export

real = export.verify_export


def verify_then_edit(folder, texts, **kw):  # the user's folder changes once the checks have passed
    report = real(folder, texts, **kw)
    original = pathlib.Path(sys.argv[sys.argv.index("--folder") + 1])
    with open(original / "README.md", "a", encoding="utf-8") as f:
        f.write("edited during the upload")
    return report


export.verify_export = verify_then_edit
from mlmtrain.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_what_is_sent_is_what_was_checked_even_if_the_folder_changes(hub, export_dir, tmp_path):
    card = (export_dir / "README.md").read_bytes()
    args = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert"]
    (tmp_path / "tmp").mkdir()
    tmpdir = str(tmp_path / "tmp")
    result = upload(tmp_path, *args, endpoint=hub.endpoint, code=EDITED_DURING_THE_UPLOAD, TMPDIR=tmpdir)
    assert result.returncode == 0, result.stderr
    assert b"edited during the upload" in (export_dir / "README.md").read_bytes()
    assert hub.files("alice/tiny-bert")["README.md"] == card  # the checked copy, not the edited file
    assert not any(name.startswith("mlmtrain_upload_") for name in os.listdir(tmpdir))  # the copy is gone


def test_refused_before_sending(hub, export_dir, tmp_path, upload_here):
    """An export made for another repo, a token file with characters no token has, a manifest that lists a file
    `mlmtrain export` does not write: one sentence each, nothing sent, no token shown."""
    manifest = json.loads((export_dir / EXPORT_MANIFEST).read_text())
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps({**manifest, "name": "alice/other-name"}))
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "was exported for alice/other-name", "--name alice/tiny-bert")
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest))

    token_file = tmp_path / "token"
    token_file.write_text("\ufeff" + WRITE_TOKEN + "\n", encoding="utf-8")  # a Windows editor's byte-order mark
    args = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--token-file", str(token_file)]
    assert upload_here(*args, "--dry-run", endpoint=hub.endpoint, token=None).returncode == 0
    token_file.write_text(WRITE_TOKEN + "\x00", encoding="utf-8")
    result = upload_here(*args, endpoint=hub.endpoint, token=None)
    assert_clean_error(result, "holds characters a token cannot have")
    assert WRITE_TOKEN not in result.stdout + result.stderr

    list_another_file(export_dir, "id_rsa", b"private key")
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "lists 'id_rsa', which `mlmtrain export` does not write" in result.stderr
    assert api_requests(hub) == []


def test_a_card_the_hub_refuses_leaves_no_empty_repo(hub, export_dir, upload_here):
    """The Hub checks the card's YAML itself (its license list changes: mlmtrain keeps no copy). upload_folder asks
    only after create_repo, so asking first is what keeps a refused card from leaving an empty repo."""
    (export_dir / "README.md").write_text(CARD.replace("license: apache-2.0", "license: apache2"), encoding="utf-8")
    write_manifest(export_dir)
    result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    line = assert_clean_error(result, "refused the export's model card", "nothing was sent", '"license" must be one of')
    assert "--license" in line and "Invalid metadata" not in line
    assert hub.repos == {} and hub.commits == []


def test_only_the_card_checks_refusal_is_said_as_the_cards():
    """A ValueError at another step (huggingface_hub's own argument checks, after create_repo) is not the card's:
    it says the library's reason, not that nothing was sent."""
    from mlmtrain.upload import explain_error

    card = ValueError('Invalid metadata in README.md.\n- "license" must be one of [mit]')
    assert explain_error(card, "validate", "alice/tiny-bert", None, None).startswith(
        'the Hub refused the export\'s model card (README.md), so nothing was sent: "license" must be one of [mit]'
    )
    for step in ("create", "upload"):
        line = explain_error(ValueError("Invalid repo id: x\nmore"), step, "alice/tiny-bert", None, None)
        assert line == "huggingface_hub refused the request: Invalid repo id: x", line


@pytest.mark.parametrize(
    "status, step, words",
    [
        (404, "upload", "alice/tiny-bert (revision dev) was not found on the Hub (404)"),
        (404, "create", "namespace 'alice' does not exist on the Hub (404): check the NAME part of --repo-id"),
        (429, "upload", "the Hub is rate-limiting this account (429 Too Many Requests); wait a few minutes"),
        (503, "branch", "the Hub answered 503 (a server error) during creating the branch; nothing is wrong with"),
        (409, "upload", "the Hub refused the upload (409): a conflict"),
    ],
)
def test_the_hubs_http_errors_are_one_sentence_each(status, step, words):
    """What the Hub answers a request with, said as one sentence that names the step and what to do."""
    from types import SimpleNamespace

    from huggingface_hub.errors import HfHubHTTPError

    from mlmtrain.upload import explain_error

    response = SimpleNamespace(status_code=status, headers={}, request=None)  # its HTTP library's, in effect
    error = HfHubHTTPError("a conflict\nsecond line", response=response, server_message="a conflict")
    line = explain_error(error, step, "alice/tiny-bert", "dev", None)
    assert line.startswith(words) and "\n" not in line, line


def test_an_endpoint_that_does_not_answer_as_the_hub_is_one_sentence(export_dir, upload_here):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class EmptyJson(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_PUT = do_HEAD = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), EmptyJson)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = upload_here("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=endpoint)
    finally:
        server.shutdown()
    assert_clean_error(result, "did not answer as the Hugging Face Hub does", "check HF_ENDPOINT")


def test_verification_leaves_the_hubs_progress_bars_as_they_were(export_dir):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from mlmtrain.export import verify_export

    disable_progress_bars()  # as the upload does for a log file or --quiet
    try:
        verify_export(export_dir, ["[MASK]"])
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()


@pytest.mark.parametrize(
    "extra, phrase",
    [(["--repo-id", "alice/tiny--bert"], "is not NAME/REPO"),
     (["--repo-id", "alice/tiny-bert", "--revision", "dev.lock"], "is not a branch name")],
)  # fmt: skip
def test_names_git_or_the_hub_refuse_are_refused_before_anything(extra, phrase, export_dir, capsys):
    """A branch name git refuses (ending in .lock) and a repo id the Hub refuses ("--") are refused before the
    copy and the transformers check, in one sentence of ours."""
    from mlmtrain.cli import main

    assert main(["upload", "--folder", str(export_dir), *extra]) == 2
    assert phrase in capsys.readouterr().err


def _problems_after(export_dir, edit):
    from upload_env import write_manifest

    from mlmtrain.export_check import check_export_folder

    assert check_export_folder(export_dir) == []
    edit(export_dir)
    write_manifest(export_dir)  # consistent with its manifest, wrong inside
    return check_export_folder(export_dir)


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_an_untied_config_needs_a_decoder_weight_of_its_own(export_dir):
    """tie_word_embeddings = false makes transformers read cls.predictions.decoder.weight from the file: a file
    without it would load with a freshly initialised decoder."""
    problems = _problems_after(export_dir, lambda f: _edit_json(f / "config.json", tie_word_embeddings=False))
    assert "model.safetensors lacks cls.predictions.decoder.weight" in problems


def test_weights_with_bytes_past_the_last_tensor_are_refused(export_dir):
    """A model.safetensors longer than its header describes (two files concatenated, a botched copy) is not the
    file that was exported, whatever its manifest says."""
    problems = _problems_after(
        export_dir, lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes() + b"\0" * 64)
    )
    assert any("model.safetensors is unreadable: the header describes" in p for p in problems), problems


def test_a_mask_token_the_vocabulary_lacks_is_refused(export_dir):
    """The fill-mask widget and pipeline look the card's mask token up in vocab.txt: one it lacks is refused."""
    problems = _problems_after(export_dir, lambda f: _edit_json(f / "tokenizer_config.json", mask_token="[MASK2]"))
    assert "tokenizer_config.json mask_token '[MASK2]' is not in vocab.txt" in problems
