"""FP8 training of the linear layers with torchao (`train.fp8`, one of torchao's recipes): each converted Linear
casts its operands to float8 and runs its matmuls on the FP8 tensor cores; everything else stays in bf16 autocast.
- `tensorwise`: one scale per tensor; the forward, the input gradient and the weight gradient all in float8.
- `rowwise`: one scale per row of each operand (per token, per output channel); all three matmuls in float8, so
  the weight gradient's operands are cast again along the token dimension (a second pass over each).
- `rowwise_with_gw_hp`: rowwise forward and input gradient, the weight gradient in bf16 from the unscaled
  operands: no cast along the token dimension (the casts left are per row, which a row's producer can fuse when
  compiled: the LayerNorm, GELU and their backwards with `model.fused_ops = torch`), two of the three matmuls in
  float8, and the weight gradient as accurate as without fp8.
The parameters stay fp32 master weights under their own names, so checkpoints and exports are the same files as
without fp8.

Converted: every Linear of the encoder (q, k and v too: the model calls a swapped Linear as itself instead of
concatenating the three weights) and the head's transform; not the vocab decoder, whose weight is the word
embedding, and no layer whose sizes are not multiples of 16 (FP8 GEMMs need them aligned). torchao is an
optional extra (`pip install -e ".[fp8]"`); it is imported here only when fp8 is asked for.
"""

from __future__ import annotations

import dataclasses

import torch

from mlmtrain.errors import UserError, missing_extra

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (L4) and Hopper (H100, H200) onwards


def check_fp8(recipe: str, device: torch.device, precision: str, tokens_per_batch: int) -> None:
    """One sentence for each reason this run cannot train in fp8, found before any device work."""
    if recipe == "off":
        return
    if device.type != "cuda":
        raise UserError(
            f"train.fp8 = {recipe} needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer: L4, "
            f"H100, H200); this run is on {device}. Leave train.fp8 = off."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise UserError(
            f"train.fp8 = {recipe} needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}. Leave train.fp8 = off."
        )
    if precision != "bf16":
        raise UserError(f"train.fp8 runs the rest of the model in bf16: use --precision bf16 (got {precision})")
    T = tokens_per_batch
    if T % 16:  # the batch's tokens are a size of every FP8 GEMM here (torchao's pad_inner_dim is off)
        raise UserError(
            f"train.fp8 needs data.tokens_per_batch to be a multiple of 16 (the batch's tokens are a size of the FP8 "
            f"matmuls, and FP8 GEMMs need aligned sizes), got {T}: e.g. {max(16, T // 16 * 16)}"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise missing_extra("train.fp8", "torchao", "fp8") from None


def fp8_linear_filter(module: torch.nn.Module, name: str) -> bool:
    """Whether torchao converts this Linear (see the module docstring)."""
    aligned = module.in_features % 16 == 0 and module.out_features % 16 == 0
    return aligned and name != "cls.predictions.decoder"


def convert_to_fp8(model: torch.nn.Module, recipe: str, emulate: bool = False) -> list[str]:
    """Swap the model's Linear layers for torchao's Float8Linear in place; returns the converted names.
    `emulate` runs the float8 casts with fp32 matmuls (any device: how the CPU tests check the numerics)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    before = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    convert_to_float8_training(model, config=config, module_filter_fn=fp8_linear_filter)
    return sorted(name for name, m in model.named_modules() if name in before and type(m) is not torch.nn.Linear)
