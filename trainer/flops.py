"""FLOPs and device peaks for MFU.

MFU = model FLOPs of the real tokens per second / the device's peak. Model FLOPs count what the
algorithm must compute: encoder matmuls on real tokens (not the [PAD] tail), bidirectional attention over
each segment (sum of len^2, not halved), and the vocab head on the masked positions only (the expected
`mask_prob` share of real tokens), forward + backward = 3 x forward (`model.model_flops_per_token`).
"""

from __future__ import annotations

import numpy as np
import torch

from mlmtrain.model import BertConfig, model_flops_per_token

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, by precision. Override
# with `train.peak_tflops` (e.g. with the matmul rate `mlmtrain bench` measures on your card).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # fp32 row = TF32 tensor cores
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
}


def peak_tflops_for(device: torch.device, precision: str) -> float:
    """The table's peak for this GPU and precision; 0.0 (MFU not reported) for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return 0.0


def train_flops_per_batch(config: BertConfig, batch, mask_prob: float) -> float:
    """Training FLOPs of one packed batch's real segments (host-side numbers only: no device sync)."""
    cu = batch.cu_seqlens.numpy()[: batch.num_segments + 1]
    lengths = np.diff(cu).astype(np.float64)  # real segment lengths
    per_token = model_flops_per_token(config, lengths, head_fraction=mask_prob)
    return per_token * batch.num_real_tokens
