"""How a BERT sublayer's work around the matmuls runs: the same math with less memory traffic, chosen per run
(`model.residual_dtype`, `model.fused_ops`). None of it changes the parameters, the checkpoints or the export.

Under bf16 autocast the default keeps the residual stream in fp32: autocast runs `layer_norm` in fp32, so every
LayerNorm output, and with it every residual sum, is fp32, and each next matmul casts it to bf16 again.
`residual_dtype = "compute"` keeps the statistics and the residual sum in fp32 but hands the LayerNorm output on
in the autocast dtype. `fused_ops` chooses who fuses dropout + residual + LayerNorm and bias + GELU: inductor,
from the torch ops below (when compiled), or the hand-written Triton kernels of `mlmtrain.kernels`
(`residual_layer_norm`: the sum and statistics in fp32, the output in the promoted dtype, as below; `bias_gelu`:
exact GELU), which run their torch reference where Triton cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlmtrain.config import FUSED_OPS, RESIDUAL_DTYPES, check_rows_fit
from mlmtrain.errors import UserError
from mlmtrain.fp8 import check_fp8
from mlmtrain.kernels import triton_problem
from mlmtrain.kernels.bias_gelu import bias_gelu
from mlmtrain.kernels.residual_layer_norm import residual_layer_norm_routed
from mlmtrain.kernels.segment_attention import MAX_HEAD_DIM, MAX_ROW


@dataclass(frozen=True)
class FastPaths:
    # fp32: under autocast the residual stream stays fp32 (autocast runs layer_norm in fp32, so every LayerNorm
    # output and residual sum is fp32) | compute: LayerNorm outputs and the residual stream in the autocast
    # dtype, statistics and the residual sum still in fp32 (half the bytes through every sublayer boundary)
    residual_dtype: str = "fp32"
    # torch: torch ops (inductor fuses dropout + residual + LayerNorm and bias + GELU by itself when compiled) |
    # triton: the hand-written fused kernels of mlmtrain.kernels (residual_layer_norm, bias_gelu)
    fused_ops: str = "torch"


def set_fast_paths(model: nn.Module, fast: FastPaths) -> FastPaths:
    """Hand `fast` to every module of `model` that reads it (those with a class attribute `fast`)."""
    if fast.residual_dtype not in RESIDUAL_DTYPES or fast.fused_ops not in FUSED_OPS:
        raise ValueError(f"unknown fast paths {fast}")
    for module in model.modules():
        if isinstance(getattr(type(module), "fast", None), FastPaths):
            module.fast = fast
    return fast


def post_ln_residual(
    h, dense: nn.Module, residual, dropout: nn.Dropout, norm: nn.LayerNorm, fast: FastPaths, port=None
):
    """LayerNorm(dropout(dense(h)) + residual), BERT's post-LN sublayer output: the sum and the statistics in fp32,
    the output in the promoted dtype of dense(h) and residual (so the residual stream keeps its dtype: fp32 under
    autocast by default, the compute dtype with `residual_dtype="compute"`). The default is
    `norm(dropout(dense(h)) + residual)` itself. Returns (y, y's gradient port). With the Triton kernels the dense
    layer's bias is added in the LayerNorm kernel, which sums its gradient as it goes (unless the layer is not a
    plain Linear: `_plain_linear`), and the next post_ln_residual takes the port with y as its residual, so their
    backward adds y's two gradients in the kernel (`residual_layer_norm_routed`: a hook on y then sees only the
    next matmul's share); elsewhere the port is None."""
    if fast.fused_ops == "triton":
        plain = _plain_linear(dense) and dense.bias is not None
        x, x_bias = (F.linear(h, dense.weight), dense.bias) if plain else (dense(h), None)
        args = (norm.weight, norm.bias, norm.eps, dropout.p)
        return residual_layer_norm_routed(x, residual, port, *args, x_bias=x_bias, training=dropout.training)
    x = dense(h)
    if fast.residual_dtype == "fp32":  # as BERT writes it: the dtypes are autocast's (or FSDP's parameter dtype)
        return norm(dropout(x) + residual), None
    summed = dropout(x).float() + residual.float()  # in fp32, never rounded to the stream's dtype
    out = F.layer_norm(summed, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(torch.promote_types(x.dtype, residual.dtype)), None


def _plain_linear(module: nn.Module) -> bool:
    """Whether a fused kernel may take this layer's bias and run its matmul as F.linear: an nn.Linear itself (not
    a subclass or a swapped-in module such as torchao's Float8Linear), with no hooks that its own call would run."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def bias_then_gelu(x, dense: nn.Linear, fast: FastPaths):
    """GELU(dense(x)), exact: with fused_ops = "triton" the bias add and GELU are one kernel after the matmul (a
    layer that is not a plain Linear keeps its own bias: `_plain_linear`)."""
    if fast.fused_ops == "triton" and _plain_linear(dense):
        return bias_gelu(F.linear(x, dense.weight), dense.bias)
    return F.gelu(dense(x))


def check_speed_options(
    cfg, L: int, device: torch.device, precision: str, compiled: bool, T: int, world: int, head_dim: int
):
    """The speed options a run asks for (`cfg` a RunConfig: data.layout, model.attention, train.cuda_graphs,
    train.autotune, train.fp8), refused with one sentence where they cannot run, before any device work.
    L: the shards' max_seq_len; T: tokens per micro-batch; world: the number of processes; head_dim: the model's."""
    if cfg.data.layout == "rows":
        check_rows_fit(T, L)
    if cfg.model.attention == "varlen" and (device.type != "cuda" or precision not in ("bf16", "fp16")):
        raise UserError(
            f"model.attention = varlen is flash attention: it runs on a CUDA GPU in bf16 or fp16 (this run: {device}, "
            f"{precision}): leave model.attention = auto, which takes the SDPA reference where flash cannot run"
        )
    if cfg.model.attention == "flex" and (device.type != "cuda" or not compiled):
        raise UserError(
            f"model.attention = flex trains on a CUDA GPU under torch.compile only (FlexAttention has no backward on "
            f"the CPU and is fused only when compiled; this run: {device}, compile {'on' if compiled else 'off'}): "
            f"leave model.attention = auto, which takes the row SDPA reference where FlexAttention cannot run"
        )
    if cfg.model.attention == "triton":
        check_segment_attention(L, head_dim, device)
    if cfg.train.cuda_graphs:
        if device.type != "cuda" or not compiled:
            raise UserError(
                f"train.cuda_graphs replays the compiled step on a GPU: it needs a CUDA device and compile on "
                f"(this run: {device}, compile {'on' if compiled else 'off'})"
            )
        if world > 1:
            raise UserError("train.cuda_graphs is not wired for DDP/FSDP (several processes): run without it")
        if cfg.optim.grad_accum > 1:  # pytorch/pytorch#169545: the next replay overwrites the .grad it handed out
            raise UserError(
                f"train.cuda_graphs cannot accumulate gradients (optim.grad_accum = {cfg.optim.grad_accum}): each "
                f"micro-batch's backward replay reuses the memory of the gradients before it; use optim.grad_accum = "
                f"1 (raise data.tokens_per_batch instead) or leave train.cuda_graphs off"
            )
    if cfg.train.autotune and not compiled:
        raise UserError(
            f"train.autotune times the compiled step's kernel choices: it needs compile on (this run: {device}, "
            f"compile off; train.compile = auto compiles on CUDA only)"
        )
    check_fp8(cfg.train.fp8, device, precision, T)
    if cfg.train.fp8 != "off" and cfg.train.shard == "fsdp" and world > 1:
        raise UserError("train.fp8 is not wired for FSDP: use train.shard = ddp")


def compile_kwargs(train) -> dict:
    """torch.compile's settings for a TrainSpec. cuda_graphs: the compiled step replayed as CUDA graphs (one launch
    each for forward and backward instead of hundreds; mode="reduce-overhead"). autotune: inductor's max_autotune,
    which times each GEMM's choices (cuBLAS against Triton templates, which can take the bias and GELU in their
    epilogues), FlexAttention's tiles and the other kernels' launch configs at the first compile. Not
    mode="max-autotune": its coordinate-descent pass then recompiles every other kernel at neighbouring launch
    configs until none is faster: compile minutes no GPU run has measured."""
    if not train.autotune:
        return {"mode": "reduce-overhead"} if train.cuda_graphs else {}
    return {"options": {"max_autotune": True, "triton.cudagraphs": train.cuda_graphs}}


def fused_ops_note(fused_ops: str, device: torch.device) -> str | None:
    """One line for a run that asks for the Triton kernels where Triton cannot run: their torch references serve
    (the same math, unfused), so a timing of such a run is not one of the kernels."""
    why = triton_problem(device) if fused_ops == "triton" else None
    if why is None:
        return None
    return f"model.fused_ops = triton: the kernels cannot run on {device} ({why}); their torch references run"


def cpu_note(device: torch.device, precision: str, compiled: bool) -> str | None:
    """One line for a CPU run that asks for a GPU config's bf16/fp16 or compile (base_gpu.toml, say): the CPU
    defaults (fp32, eager) are what the CPU tests and the demo time."""
    asked = [f"precision {precision}"] * (precision != "fp32") + ["compile on"] * compiled
    if device.type != "cpu" or not asked:
        return None
    return (
        f"a CPU run with {' and '.join(asked)}: each compile takes tens of seconds, and bf16 matmuls are slower "
        "than fp32 on CPUs without AMX (docs/BENCHMARKS.md); train.precision = auto and train.compile = auto give "
        "fp32, eager"
    )


def check_segment_attention(L: int, head_dim: int, device: torch.device) -> None:
    """model.attention = triton: the kernel holds a row in one tile, and Triton must run on the device."""
    if L > MAX_ROW or head_dim > MAX_HEAD_DIM:
        raise UserError(
            f"model.attention = triton holds a row of at most {MAX_ROW} tokens and heads of at most {MAX_HEAD_DIM} "
            f"(these shards: max_seq_len {L}; this model: head size {head_dim}): use model.attention = flex or auto"
        )
    if why := triton_problem(device):
        raise UserError(f"model.attention = triton needs Triton on {device}: {why}; use model.attention = auto")
