"""Shared fixtures. Everything is built from the bundled sample corpus, once per test session.

Triton kernels run on the CPU through the interpreter when there is no GPU, which must be decided
before triton is first imported: hence the environment variable here, at collection time."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import mlmtrain

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mlmtrain.kernels import INTERPRETER_PROBLEM, triton_runs_on  # noqa: E402  (after TRITON_INTERPRET)

# `trainer/` installs as `mlmtrain`, so another checkout's editable install would be imported silently.
CHECKOUT = Path(__file__).resolve().parents[1]
if Path(mlmtrain.__file__).resolve().parent != CHECKOUT / "trainer":
    pytest.exit(
        f"the tests import mlmtrain from {Path(mlmtrain.__file__).parent}, not from this checkout ({CHECKOUT}): "
        'run `pip install -e ".[test]"` here first',
        returncode=4,
    )


# The tests send stop signals to the commands they start, which inherit this process's ignored signals: a pytest
# started in the background of a script (SIGINT ignored) or under nohup (SIGHUP ignored) would hand that on, and
# mlmtrain rightly keeps a signal ignored that it was started with. So SIGINT gets Python's own handler (the
# in-process tests expect KeyboardInterrupt), and an ignored SIGHUP or SIGTERM a handler that does nothing: this
# process still ignores them (a nohup'd test run survives the hangup), and the commands it starts get the default,
# as exec resets caught signals. The tests that want one ignored ask for it.
def _still_ignored(signum, frame):
    pass


for _sig, _handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, _still_ignored),
                       (signal.SIGTERM, _still_ignored)):  # fmt: skip
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, _handler)

SMALL_VOCAB = 2000  # small enough to train in ~1 s, big enough to hold every sample character


@pytest.fixture(scope="session")
def sample_corpus():
    from mlmtrain.text import sample_corpus_path

    return sample_corpus_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, sample_corpus):
    """A WordPiece tokenizer trained on the sample corpus (vocab ~2000)."""
    from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([sample_corpus], out, TokenizerSettings(vocab_size=SMALL_VOCAB))
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, sample_corpus, tokenizer_dir):
    """Token shards of the sample corpus (train + 5% valid), max_seq_len 128."""
    from mlmtrain.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "data"
    prepare([sample_corpus], tokenizer_dir, out, valid_fraction=0.05, max_seq_len=128, seed=0)
    return out


@pytest.fixture(scope="session")
def stored_data(tmp_path_factory, sample_corpus):
    """(shards, tokenizer) made with the tokenizer stored in tests/assets/tokenizer: WordPiece training in
    `tokenizers` is not reproducible run to run (hash-map order breaks ties; huggingface/tokenizers#1794), so a
    test that compares loss values across runs or paths needs this fixed vocabulary to be deterministic."""
    from mlmtrain.prepare import prepare

    tokenizer = Path(__file__).parent / "assets" / "tokenizer"
    out = tmp_path_factory.mktemp("stored") / "data"
    prepare([sample_corpus], tokenizer, out, valid_fraction=0.05, max_seq_len=128, seed=0)
    return out, tokenizer


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernel tests run
requires_triton = pytest.mark.skipif(
    not triton_runs_on(KERNEL_DEVICE), reason=f"Triton cannot run here: {INTERPRETER_PROBLEM}"
)
# the CPU runs the Triton kernels (the interpreter), for tests whose models stay on the CPU: not on a CUDA machine,
# where the kernels run compiled and the interpreter is off
CPU_RUNS_TRITON = triton_runs_on(torch.device("cpu"))
requires_cpu_triton = pytest.mark.skipif(not CPU_RUNS_TRITON, reason=f"no Triton on the CPU: {INTERPRETER_PROBLEM}")


@pytest.fixture(scope="session")
def clean_export(tmp_path_factory, tokenizer_dir):
    """A valid export folder for the upload tests (upload_env.make_export); copied per test by `export_dir`."""
    from upload_env import make_export

    return make_export(tmp_path_factory.mktemp("export"), tokenizer_dir)


@pytest.fixture
def export_dir(clean_export, tmp_path) -> Path:
    """A fresh copy per test, with the strays a run folder collects: none of them may be uploaded."""
    folder = tmp_path / "export"
    shutil.copytree(clean_export, folder)
    (folder / "checkpoints" / "step_00000010").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"old weights")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "notes.txt").write_text("stray")
    return folder


@pytest.fixture
def hub():
    """A fake Hub (tests/fake_hub.py) that knows alice's write and read tokens, serving for one test."""
    from fake_hub import FakeHub, Token
    from upload_env import READ_TOKEN, WRITE_TOKEN

    tokens = {WRITE_TOKEN: Token("alice"), READ_TOKEN: Token("alice", role="read")}
    with FakeHub(tokens=tokens, orgs={"alice": ["alice-lab"]}) as server:
        yield server


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_fp32():
    """A training run sets the process's TF32 flags (train.tf32, on by default): give every test the flags it
    started with, so a GPU test after one does not compare against a TF32 'fp32' reference."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
