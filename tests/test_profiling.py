"""Profiling on torch's profiler: the scheduled trace of a CPU run with the loop's named ranges, the per-rank file
names, nothing profiled (no record_function at all) without --profile-steps, and the kernel-category breakdown on
a synthetic CUDA trace in the format torch.profiler (kineto) exports."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config

from mlmtrain import profiling
from mlmtrain.config import TrainSpec
from mlmtrain.errors import UserError
from mlmtrain.idle_gaps import idle_gaps
from mlmtrain.profiling import PHASES, StepProfiler, kernel_categories, kernel_category, phase_times
from mlmtrain.train import train


def test_profiled_run_writes_a_trace_with_the_named_ranges(data_dir, tokenizer_dir, tmp_path):
    run, logged = tmp_path / "run", []
    cfg = tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 5, "train.profile_steps": "2:4"})
    cfg.train.profile_memory = True
    summary = train(cfg, log=logged.append)
    text = "\n".join(logged)
    trace = json.loads((run / "profile" / "trace.json").read_text())
    annotations = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    assert sorted(n for n in annotations if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert set(PHASES) <= set(annotations)  # data, mask, forward, backward, optimizer
    categories = json.loads((run / "profile" / "categories.json").read_text())
    assert categories["schema"] == profiling.CATEGORIES_SCHEMA and categories["timeline"] == "host"
    assert categories["steps"] == 2 and categories["step_ms"] > 0
    assert set(categories["categories"]) == {*profiling.CATEGORIES, "idle"} and categories["idle_gaps"] is None
    assert categories["categories"]["gemm"]["ms"] > 0 and categories["categories"]["optimizer"]["ms"] > 0
    phases = json.loads((run / "profile" / "phases.json").read_text())
    assert list(phases) == list(PHASES) and summary["phase_ms"] == phases
    # where each file went and how to open it; on CPU the memory snapshot is skipped with the reason
    assert str(run / "profile" / "trace.json") in text and "ui.perfetto.dev" in text and "kernel categories" in text
    assert "no memory snapshot: it records CUDA allocations, and this run is on cpu" in text
    assert not (run / "profile" / "memory_snapshot.pickle").exists()


def test_a_run_stopped_inside_the_window_traces_only_the_steps_it_ran(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """SIGTERM after the second traced step: the checkpoint saved on the way out is no traced step."""
    import os
    import signal

    step = StepProfiler.step

    def step_then_signal(self):
        spent = step(self)
        if self.steps_done == 4:  # steps 0..3 ran: 1 was the warm-up, 2 and 3 traced
            os.kill(os.getpid(), signal.SIGTERM)
        return spent

    monkeypatch.setattr(StepProfiler, "step", step_then_signal)
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 8, "train.profile_steps": "2:6"})
    summary = train(cfg, log=lambda msg: None)
    assert summary["steps"] == 4 and summary["exit_code"] == 143
    trace = json.loads((run / "profile" / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if "dur" in e]
    steps = sorted((e for e in spans if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
    assert [e["name"] for e in steps][:2] == ["ProfilerStep#2", "ProfilerStep#3"]
    # the range the last step() opened holds the log window's reads only (with the save it was ~47 ms, a third
    # step in the averages); nothing is traced after it
    assert all(e["dur"] < 0.1 * steps[1]["dur"] for e in steps[2:]), steps
    assert not [e for e in spans if e["ts"] >= steps[-1]["ts"] + steps[-1]["dur"]]
    assert json.loads((run / "profile" / "categories.json").read_text())["steps"] == 2


def test_no_profiler_no_ranges(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Without --profile-steps the loop opens none of its ranges (not even disabled ones: `phase` is a no-op).
    torch's optimizer opens its own, always; those pass through."""
    opened, record_function = [], torch.profiler.record_function

    def recording(name, *args, **kwargs):
        opened.append(name)
        return record_function(name, *args, **kwargs)

    monkeypatch.setattr(torch.profiler, "record_function", recording)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", recording)
    train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 2}))
    assert opened and not set(opened) & set(PHASES)


def _work(profiler, steps):
    x = torch.randn(64, 64, requires_grad=True)
    for _ in range(steps):
        profiler.phase("forward")
        y = (x @ x).relu().sum()
        profiler.phase("backward")
        y.backward()
        profiler.step()
    return profiler.close()


def test_each_rank_writes_its_own_files_and_a_late_start_is_clipped(tmp_path):
    logged = []
    cpu = torch.device("cpu")
    # rank 1 of 2, a run resumed at step 3 asked to trace 2..5: steps 3 and 4 are traced, with no warm-up left
    profiler = StepProfiler(2, 5, 1, 3, tmp_path, cpu, rank=1, world=2, memory=False, log=logged.append)
    phases = _work(profiler, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "categories_rank1.json",
        "phases_rank1.json",
        "trace_rank1.json",
    ]
    trace = json.loads((tmp_path / "trace_rank1.json").read_text())
    steps = [e["name"] for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")]
    assert sorted(steps) == ["ProfilerStep#3", "ProfilerStep#4"]  # the loop's step numbers, not this process's
    assert set(phases) == {"forward", "backward"}
    assert "no warm-up step before step 3" in logged[0] and "traced steps 3..4" in logged[-1]
    # a run resumed past the whole window traces nothing, and says so
    assert profiling.start_profiler(TrainSpec(profile_steps="2:3"), 5, tmp_path, cpu, 0, 1, logged.append) is None
    assert "were run before step 5" in logged[-1]
    # a window past the run's last step ends with it (the final evaluation and save are no traced step), and one
    # that starts after it traces nothing
    profiler = profiling.start_profiler(TrainSpec(profile_steps="2:8", max_steps=3), 0, tmp_path, cpu, 0, 1, print)
    assert profiler.end == 3
    profiler.close()
    assert (
        profiling.start_profiler(TrainSpec(profile_steps="3:4", max_steps=3), 0, tmp_path, cpu, 0, 1, logged.append)
        is None
    )
    assert "nothing traced: steps 3..3 come after the run's last step, 2" in logged[-1]
    # an evaluation or a save inside the window is said: its work counts in a traced step
    spec = TrainSpec(profile_steps="2:5", max_steps=9, eval_every=3, checkpoint_every=4)
    profiling.start_profiler(spec, 0, tmp_path, cpu, 0, 1, logged.append).close()
    assert (
        "the evaluation after step 3 (train.eval_every 3) runs in traced step 3; the checkpoint after step 4 "
        in (logged[-2])
    )


def test_the_trace_export_is_no_training_time():
    """The seconds the last traced step spends writing the trace leave the log window's time, not its tokens."""
    from types import SimpleNamespace

    from mlmtrain.metrics import WindowStats

    window = WindowStats(torch.device("cpu"), 2, 1, 0.0, SimpleNamespace(wait_s=0.0))
    t0 = window.t0
    window.exclude(2.5)
    assert window.t0 == t0 + 2.5


@pytest.mark.parametrize("first, warmup", [(3, 1), (2, 0)])
def test_the_trace_starts_on_a_drained_device(tmp_path, monkeypatch, first, warmup):
    """The host runs steps ahead of the device: the profiler waits for it just before the first traced step
    (after the warm-up), so no kernel of an untraced step is counted in a traced one, and after the last, so the
    trace's export that follows is no device time of the log window (which leaves it out)."""
    profiler = StepProfiler(first, first + 2, warmup, 0, tmp_path, torch.device("cpu"), 0, 1, False, lambda m: None)
    profiler.device = type("CudaDevice", (), {"type": "cuda"})()  # what a CUDA run drains; the trace stays CPU
    drained = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: drained.append(profiler.steps_done))
    _work(profiler, first + 2)
    assert drained == [first - 1, first + 1]  # after step first - 1 (steps count from 0), and after the last


# ---- the kernel-category breakdown -----------------------------------------------------------------------

CUDA_KERNELS = {  # names as torch 2.x CUDA traces spell them (demangled, templates and all)
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
    "cublas": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
    "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, float, float, float, __nv_bfloat16, float, "
    "__nv_bfloat16, true, false, false>(cublasLt::cublasSplitKParams<float>, float const*)": "gemm",
    "triton_tem_fused_addmm_gelu_0": "gemm",
    "triton_tem_fused_flex_attention_0": "attention",  # FlexAttention's forward and backward are inductor templates
    "triton_tem_fused_flex_attention_backward_zeros_2": "attention",
    "_residual_layer_norm_bwd_kernel": "norm_elementwise",  # mlmtrain.kernels
    "_bias_gelu_fwd_kernel": "norm_elementwise",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t, "
    "Flash_kernel_traits<64, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, false, true, true, false, "
    "false>(pytorch_flash::Flash_fwd_params)": "attention",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<cute::tuple<>, "
    "flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> > > > > >"
    "(flash::FlashAttnFwdSm90::Params)": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)": (
        "attention"
    ),
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, "
    "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)": (
        "norm_elementwise"
    ),
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<c10::BFloat16, float>(long, long, "
    "c10::BFloat16 const*, c10::BFloat16 const*, float const*, float const*, c10::BFloat16*, c10::BFloat16*)": (
        "norm_elementwise"
    ),
    "triton_per_fused_add_native_layer_norm_native_layer_norm_backward_7": "norm_elementwise",
    "triton_poi_fused_gelu_gelu_backward_5": "norm_elementwise",
    "triton_poi_fused__scaled_dot_product_flash_attention_clone_3": "norm_elementwise",  # a layout copy
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
    "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >"
    "(int, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}, "
    "std::array<char*, 2ul>)": "norm_elementwise",
    "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, "
    "bool>(at::cuda::detail::TensorInfo<c10::BFloat16 const, unsigned int>, at::PhiloxCudaState)": "norm_elementwise",
    "triton_red_fused__log_softmax_nll_loss_forward_3": "reduction",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, "
    "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, unsigned "
    "int, float, 4, 4>)": "reduction",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
    "namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": "reduction",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
    "(at::native::ADAM_MODE)1, false>, double*, double, double, double, double, double, bool, float*, float*>"
    "(at::native::(anonymous namespace)::TensorListMetadata<4>, ...)": "optimizer",
    "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>(float const*, "
    "at::native::TensorListAddresses, int)": "optimizer",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    # torch's rowwise-scaled fp8 GEMM (train.fp8 = rowwise): its epilogue's template names Sm90RowBroadcast
    "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int>, cutlass::gemm::"
    "collective::CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarpSpecializedPingpongFP8FastAccum<4>>, "
    "cutlass::epilogue::collective::CollectiveEpilogue<cutlass::epilogue::fusion::Sm90EVT<cutlass::epilogue::fusion"
    "::Sm90ColBroadcast<0, float>, cutlass::epilogue::fusion::Sm90RowBroadcast<0, float> > >, void> >"
    "(cutlass::gemm::kernel::GemmUniversal<...>::Params)": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "attention",  # pytorch/kineto#1022
    "_mask_apply_kernel": "other",
    "void (anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>"
    "(at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, long, long)": "other",
}
HOST_OPS = {
    "aten::mm": "gemm",
    "aten::addmm": "gemm",
    "aten::scaled_dot_product_attention": "attention",
    "aten::native_layer_norm": "norm_elementwise",
    "aten::gelu": "norm_elementwise",
    "aten::add_": "norm_elementwise",
    "aten::_log_softmax": "reduction",
    "aten::sum": "reduction",
    "aten::_fused_adamw_": "optimizer",
    "aten::_foreach_norm": "optimizer",
    "aten::embedding": "other",
    "c10d::allreduce_": "communication",  # gloo's, on the CPU: not a reduction
    "gloo:all_reduce": "communication",
    "aten::broadcast_tensors": "other",  # shapes made to match: no collective (aten has none: c10d's are c10d::)
    "aten::broadcast_to": "other",
}


@pytest.mark.parametrize("name", [*CUDA_KERNELS, *HOST_OPS])
def test_kernel_category_of_real_names(name):
    assert kernel_category(name, "cpu_op" if name in HOST_OPS else "kernel") == {**CUDA_KERNELS, **HOST_OPS}[name]


def _x(cat, name, ts, dur, tid=7, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_categories_of_a_cuda_trace():
    """Two steps of device work on stream 7 (100 us each, 20 us idle in each), an NCCL kernel overlapping
    compute on stream 20, copies; the host-side events must not count."""
    gemm, attn = "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "flash_fwd_kernel"
    events = [_x("user_annotation", f"ProfilerStep#{i}", 1000 + 200 * i, 150, tid=1) for i in (3, 4)]
    events += [_x("cpu_op", "aten::mm", 1000, 100, tid=1), _x("cuda_runtime", "cudaLaunchKernel", 1001, 5, tid=1)]
    for start in (2000, 2120):  # one step: memcpy 10, gemm 40, attention 20, [idle 20], layer norm 10
        events += [
            _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", start, 10),
            _x("kernel", gemm, start + 10, 40),
            _x("kernel", attn, start + 50, 20),
            _x("kernel", "triton_per_fused_native_layer_norm_0", start + 90, 10),
            _x("kernel", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", start + 20, 30, tid=20),  # overlaps the gemm
            _x("gpu_user_annotation", "forward", start + 10, 60),
            _x("gpu_user_annotation", "backward", start + 70, 30),
        ]
    report = kernel_categories({"traceEvents": events}, source="t.json")
    c = report["categories"]
    assert report["timeline"] == "device" and report["steps"] == 2
    assert report["step_ms"] == pytest.approx(0.110)  # 2000 .. 2220 us over 2 steps
    assert report["busy_ms"] == pytest.approx(0.080)  # 10 + 40 + 20 + 10: the NCCL kernel overlaps the gemm
    assert c["gemm"]["ms"] == pytest.approx(0.040) and c["gemm"]["pct"] == pytest.approx(100 * 40 / 110)
    assert c["attention"]["ms"] == pytest.approx(0.020) and c["norm_elementwise"]["ms"] == pytest.approx(0.010)
    assert c["copy"]["ms"] == pytest.approx(0.010) and c["communication"]["ms"] == pytest.approx(0.030)
    assert c["idle"]["ms"] == pytest.approx(0.030)  # 20 us in each step + the 20 us between them, over 2 steps
    assert c["gemm"]["top"] == [{"name": gemm, "ms": pytest.approx(0.040), "count": 1.0}]
    assert c["reduction"]["ms"] == 0 and c["optimizer"]["ms"] == 0 and c["other"]["ms"] == 0
    assert phase_times({"traceEvents": events}) == {"forward": pytest.approx(0.060), "backward": pytest.approx(0.030)}
    assert "GEMM" in profiling.format_categories(report) and "device time" in profiling.format_categories(report)


def test_host_self_times_count_nested_operators_once():
    """aten::linear (10 us) holding aten::addmm (8 us); SDPA (20 us) holding a bmm (15 us) that counts as attention."""
    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 50, tid=1),
        _x("cpu_op", "aten::linear", 0, 10, tid=1),
        _x("cpu_op", "aten::addmm", 1, 8, tid=1),
        _x("cpu_op", "aten::scaled_dot_product_attention", 20, 20, tid=1),
        _x("cpu_op", "aten::bmm", 22, 15, tid=1),
    ]
    report = kernel_categories({"traceEvents": events})
    c = report["categories"]
    assert report["timeline"] == "host" and report["step_ms"] == pytest.approx(0.050)
    assert c["gemm"]["ms"] == pytest.approx(0.010) and c["attention"]["ms"] == pytest.approx(0.020)
    assert c["idle"]["ms"] == pytest.approx(0.020)


def test_idle_gaps_take_the_loop_threads_phase_and_no_instant_splits_a_gap():
    """Autograd launches the backward from its own thread: the phase is the loop thread's at the launch. A
    zero-length device event (a memset) inside a 90 us gap does not cut it into two uncounted halves."""
    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1),
        _x("user_annotation", "backward", 0, 1000, tid=1),
        _x("cuda_runtime", "cudaLaunchKernel", 240, 5, tid=2, correlation=1),  # the autograd thread
        _x("kernel", "k", 100, 50, stream=7),
        _x("gpu_memset", "Memset (Device)", 190, 0, stream=7),
        _x("kernel", "k", 240 + 10, 50, correlation=1, stream=7),
    ]
    gaps = kernel_categories({"traceEvents": events})["idle_gaps"]
    assert gaps["count"] == 1 and gaps["ms"] == pytest.approx(0.100)
    assert gaps["top"][0]["phase"] == "backward" and gaps["top"][0]["kind"] == "host late"


def test_idle_gaps_are_put_down_to_what_the_host_was_doing():
    """One traced step on the device (stream 7) with five gaps: the host launched late from aten::mm in the
    forward (100 us), it came out of a cudaStreamSynchronize under aten::item and launched (60 us), the work was
    launched long before (a device-side wait, 80 us), the work has no launch in the trace (70 us), and two kernels
    of one CUDA graph replay, which share their cudaGraphLaunch's correlation, have a gap between them (90 us); a
    20 us gap is launch spacing and does not count, nor is one of 10 us before the replay."""

    def launch(ts, corr, dur=5, name="cudaLaunchKernel", cat="cuda_runtime"):
        return _x(cat, name, ts, dur, tid=1, correlation=corr)

    def kernel(ts, dur, corr=None):
        return _x("kernel", "triton_poi_fused_add_0", ts, dur, **({"correlation": corr} if corr else {}), stream=7)

    events = [
        _x("user_annotation", "ProfilerStep#3", 900, 1600, tid=1),
        _x("user_annotation", "forward", 900, 700, tid=1),
        _x("user_annotation", "optimizer", 1600, 900, tid=1),
        _x("cpu_op", "aten::linear", 1180, 30, tid=1),
        _x("cpu_op", "aten::mm", 1195, 10, tid=1),  # innermost at the late launch
        _x("cpu_op", "aten::item", 1700, 120, tid=1),
        _x("cpu_op", "aten::_local_scalar_dense", 1705, 110, tid=1),
        _x("cuda_runtime", "cudaStreamSynchronize", 1710, 100, tid=1),  # ends 1810 as the device goes idle
        _x("cpu_op", "aten::add", 1840, 10, tid=1),
        _x("cuda_driver", "cuLaunchKernel", 1000, 30, tid=1, correlation=99),  # long, but not near a gap
        launch(950, 1),
        launch(1198, 2),
        launch(1845, 3, name="cuLaunchKernel", cat="cuda_driver"),
        launch(960, 4),
        launch(970, 5),
        launch(2130, 6, name="cudaGraphLaunch"),
        kernel(1000, 100, corr=1),  # busy 1000..1100
        kernel(1200, 100, corr=2),  # gap 100: launched at 1198, after the device went idle at 1100
        kernel(1320, 490, corr=5),  # gap 20: launch spacing, not counted
        kernel(1870, 50, corr=3),  # gap 60 after 1810: the host waited in the synchronize, then launched
        kernel(2000, 50, corr=4),  # gap 80: launched at 960, long before
        kernel(2120, 30),  # gap 70: no launch
        kernel(2160, 50, corr=6),  # gap 10: the replay's first kernel
        kernel(2300, 20, corr=6),  # gap 90 inside the replay: launched at 2130, before the gap
    ]
    report = kernel_categories({"traceEvents": events})
    gaps = report["idle_gaps"]
    assert gaps["min_gap_us"] == 50 and gaps["count"] == 5 and gaps["ms"] == pytest.approx(0.400)
    by_kind = {c["kind"]: c for c in gaps["top"]}
    kinds = ["host late", "graph replay", "device wait", "unknown", "host blocked"]  # by ms
    assert [c["kind"] for c in gaps["top"]] == kinds
    assert by_kind["host late"] == {"kind": "host late", "phase": "forward", "op": "aten::mm", "waited_in": None,
                                    "call": "cudaLaunchKernel", "ms": pytest.approx(0.100), "count": 1}  # fmt: skip
    replay = by_kind["graph replay"]
    assert (replay["phase"], replay["op"], replay["call"], replay["ms"]) == ("optimizer", None, "cudaGraphLaunch",
                                                                           pytest.approx(0.090))  # fmt: skip
    blocked = by_kind["host blocked"]
    assert (blocked["phase"], blocked["op"], blocked["ms"]) == ("optimizer", "aten::add", pytest.approx(0.060))
    assert blocked["waited_in"] == "cudaStreamSynchronize in aten::_local_scalar_dense"
    assert blocked["call"] == "cuLaunchKernel" and by_kind["unknown"]["call"] is None
    assert by_kind["device wait"]["ms"] == pytest.approx(0.080) and by_kind["unknown"]["ms"] == pytest.approx(0.070)
    # the loop thread: 1600 us per step, of them the synchronize (100) and the long driver call (30)
    assert gaps["host"] == {"step_ms": pytest.approx(1.6), "waiting_ms": pytest.approx(0.130)}
    text = profiling.format_categories(report)
    assert "idle gaps of >= 50 us: 0.40 ms in 5.0 gaps per step" in text
    assert (
        "host blocked in optimizer, cuLaunchKernel from aten::add, after waiting in cudaStreamSynchronize in " in text
    )
    assert "host late in forward, cudaLaunchKernel from aten::mm" in text and "1.60 ms per step, 0.13 of them" in text
    assert "graph replay in optimizer, cudaGraphLaunch from no operator" in text


@pytest.mark.parametrize("spec", ["5:3", "5:5", "a:b", "3", "3:", ":3", "2:4:6", " 2:4", "+2:4", "2_0:30", "２:４"])
def test_profile_steps_are_plain_a_colon_b(spec):
    from mlmtrain.config import profile_range

    with pytest.raises(UserError, match="--profile-steps"):
        profile_range(spec)
    assert profile_range("0:2") == (0, 2) and profile_range("") is None


def _gaps(events):
    from mlmtrain.profiling import kernel_categories

    return kernel_categories({"traceEvents": events})["idle_gaps"]


def test_a_gap_of_exactly_min_gap_us_counts():
    """A gap of exactly MIN_GAP_US counts (the documented ">= 50 us")."""
    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1),
        _x("user_annotation", "forward", 0, 1000, tid=1),
        _x("kernel", "k", 100, 100, stream=7),
        _x("kernel", "k", 250, 100, stream=7),  # idle 200..250: exactly 50 us
    ]
    gaps = _gaps(events)
    assert gaps["count"] == 1 and gaps["ms"] == pytest.approx(0.050)


def test_kernels_inside_a_longer_one_on_another_stream_make_no_gap():
    """Short kernels inside a long one on another stream (NCCL beside compute) leave no gap: the busy interval ends
    where the longest kernel so far ends."""
    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1),
        _x("user_annotation", "forward", 0, 1000, tid=1),
        _x("kernel", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0, 1000, stream=20),
        _x("kernel", "k", 100, 10, stream=7),
        _x("kernel", "k", 300, 10, stream=7),
        _x("kernel", "k", 600, 10, stream=7),
    ]
    gaps = _gaps(events)
    assert gaps["count"] == 0 and gaps["ms"] == 0


def test_a_launch_within_the_slack_before_the_gap_is_host_late():
    """A launch a few microseconds before the device went idle (within SLACK_US, the clocks' skew) is the host
    coming late, not a wait on the device."""
    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1),
        _x("user_annotation", "forward", 0, 1000, tid=1),
        _x("kernel", "k", 0, 100, stream=7),  # the device goes idle at 100
        _x("cuda_runtime", "cudaLaunchKernel", 95, 3, tid=1, correlation=1),  # 5 us before: clock skew
        _x("kernel", "k", 200, 50, stream=7, correlation=1),
    ]
    (cause,) = _gaps(events)["top"]
    assert cause["kind"] == "host late"


def test_host_waiting_counts_only_the_part_of_a_call_inside_the_traced_steps():
    """A runtime call that straddles the traced step's edges counts only its part inside the step as waiting."""
    steps = [_x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1)]
    events = [
        *steps,
        _x("cuda_runtime", "cudaStreamSynchronize", 900, 300, tid=1),  # 100 us inside, 200 after the step
        _x("cuda_runtime", "cudaMemcpyAsync", -50, 100, tid=1),  # 50 us inside, 50 before
        _x("cuda_runtime", "cudaFree", 400, 40, tid=1),  # wholly inside
    ]
    device = [_x("kernel", "k", 0, 10, stream=7)]
    host = idle_gaps(events, device, steps, PHASES)["host"]
    assert host == {"step_ms": pytest.approx(1.0), "waiting_ms": pytest.approx(0.190)}


def test_busy_time_counts_partly_overlapping_kernels_once():
    """Two streams' kernels that partly overlap are busy time once: busy_ms and idle are the union's."""
    from mlmtrain.profiling import kernel_categories

    events = [
        _x("user_annotation", "ProfilerStep#0", 0, 1000, tid=1),
        _x("user_annotation", "forward", 0, 1000, tid=1),
        _x("kernel", "nvjet_tst_128x256", 0, 600, stream=7),
        _x("kernel", "ncclDevKernel_AllReduce", 400, 600, stream=20),  # overlaps 400..600
    ]
    report = kernel_categories({"traceEvents": events})
    assert report["busy_ms"] == pytest.approx(1.0) and report["categories"]["idle"]["ms"] == pytest.approx(0.0)


def test_a_window_from_step_0_names_no_evaluation_after_step_0(tmp_path):
    """A profile window from step 0 names no evaluation or save "after step 0": none runs before the first step."""
    from mlmtrain.config import TrainSpec
    from mlmtrain.profiling import start_profiler

    logged = []
    spec = TrainSpec(profile_steps="0:2", max_steps=9, eval_every=3, checkpoint_every=4)
    start_profiler(spec, 0, tmp_path, torch.device("cpu"), 0, 1, logged.append).close()
    assert not any("after step 0" in line for line in logged), logged
