"""The launcher's and the process group's decisions that need no process group: the collective timeout, which GPU a
rank takes, how a timed-out collective and the ranks' exit codes are read, and FSDP with one process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("text", ["0", "-5", "nan"])
def test_the_collective_timeout_must_be_a_positive_number_of_seconds(monkeypatch, text):
    """MLMTRAIN_DIST_TIMEOUT of 0 (every collective would give up at once) or nan is one sentence."""
    from mlmtrain import parallel
    from mlmtrain.errors import UserError

    monkeypatch.setenv(parallel.TIMEOUT_ENV, text)
    with pytest.raises(UserError, match="positive number of seconds"):
        parallel.timeout()


def test_a_named_gpu_is_kept_and_cuda_alone_means_this_ranks_gpu(monkeypatch):
    import torch

    from mlmtrain import parallel

    monkeypatch.setenv("LOCAL_RANK", "2")
    assert parallel.rank_device("cuda") == torch.device("cuda", 2)
    assert parallel.rank_device("cuda:1") == torch.device("cuda", 1)
    assert parallel.rank_device("cpu") == torch.device("cpu")


def test_a_timed_out_collective_is_not_read_as_a_peer_that_left():
    """A rank whose collective timed out is not "stopped because another rank left": the timeout (a hung rank,
    MLMTRAIN_DIST_TIMEOUT) is what it reports; a refused or closed connection is a peer that left."""
    import torch.distributed as dist

    from mlmtrain.parallel import peer_left

    assert not peer_left(dist.DistNetworkError("The client socket has timed out after 300000ms"))
    assert peer_left(dist.DistNetworkError("failed to connect to localhost:29500"))
    assert peer_left(RuntimeError("[../gloo/transport] Connection closed by peer [127.0.0.1]:1234"))


def test_ranks_ending_on_different_signals_without_rank_0_exit_1_naming_one():
    """Exit codes the ranks take together (130, 143, 3) are the command's only when they agree: two ranks that
    ended on different ones (and rank 0 not among them) did not stop together, and the command exits 1."""
    from mlmtrain.launch import ranks_exit_code

    assert ranks_exit_code({1: 143, 2: 143}, 3) == 143
    assert ranks_exit_code({1: 130, 2: 143}, 3) == 1


def test_of_several_ranks_torch_knows_failed_the_lowest_is_named():
    from mlmtrain.launch import first_failed

    def failure(code, error_file="<N/A>", timestamp=100):
        return SimpleNamespace(exitcode=code, error_file=error_file, timestamp=timestamp)

    assert first_failed({0: failure(1), 1: failure(-9), 2: failure(1, error_file="/tmp/r2/error.json")}) == 1


def test_fsdp_with_one_process_runs_under_the_agent(tmp_path, monkeypatch):
    """FSDP needs a process group: `--nproc 1` with train.shard = fsdp starts its one process under the elastic
    agent (as torchrun would); DDP with one process trains here."""
    from mlmtrain import launch
    from mlmtrain.cli import build_parser

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    started = []
    monkeypatch.setattr(launch, "preflight", lambda cfg, args: None)
    monkeypatch.setattr(launch, "run_ranks", lambda argv, nproc, summary: started.append(nproc) or 0)
    monkeypatch.setattr(launch, "train", lambda *a, **k: pytest.fail("trained in the launcher's process"))
    argv = ["train", "--data", str(tmp_path), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "run"),
            "--nproc", "1", "--set", "train.shard=fsdp"]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.argv = argv
    assert launch.main(args) == 0 and started == [1]


def test_one_process_refusal_is_not_prefixed_with_a_rank(monkeypatch):
    """Outside torchrun a refusal is the sentence itself; only with several ranks does it say which rank."""
    from mlmtrain import parallel
    from mlmtrain.errors import UserError

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match=r"^bad input$"):
        with parallel.name_failing_rank():
            raise UserError("bad input")


def test_a_resume_without_config_takes_the_run_folders_config_only(tmp_path):
    """`--resume` without --config reads RUN/config.json (from --out, the run folder, or one of its checkpoints;
    a run folder is one with the run's marker, checkpoints or not); a checkpoint copied out of its run, whose
    config.json is the model's, and a run folder without a config.json give None: the defaults and flags."""
    from mlmtrain.files import write_marker
    from mlmtrain.launch import resumed_run_config
    from mlmtrain.run_folder import RUN_LAYOUT

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    write_marker(run, RUN_LAYOUT)  # what makes a folder a run folder, with or without checkpoints yet
    (run / "config.json").write_text("{}")
    (ckpt / "config.json").write_text("{}")  # a checkpoint's own config.json: the model and the run it saved

    def args(resume, out_dir=None, config=None):
        return SimpleNamespace(resume=resume, out_dir=out_dir, config=config)

    for given in (args("auto", out_dir=str(run)), args(str(run)), args(str(ckpt))):
        assert resumed_run_config(given) == run / "config.json"
    assert resumed_run_config(args(str(run), config="mine.toml")) is None
    assert resumed_run_config(args(None, out_dir=str(run))) is None  # no --resume: a new run's defaults
    copied = tmp_path / "backup" / "step_00000002"
    copied.mkdir(parents=True)
    (copied / "config.json").write_text("{}")
    assert resumed_run_config(args(str(copied), out_dir=str(tmp_path / "new"))) is None
    killed = tmp_path / "killed"  # a run killed before its first checkpoint: its config.json all the same
    killed.mkdir()
    write_marker(killed, RUN_LAYOUT)
    (killed / "config.json").write_text("{}")
    assert resumed_run_config(args("auto", out_dir=str(killed))) == killed / "config.json"
    (run / "config.json").unlink()
    assert resumed_run_config(args(str(run))) is None
