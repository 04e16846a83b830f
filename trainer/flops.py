"""FLOPs and device peaks for MFU.

MFU = model FLOPs of the real tokens per second / the device's peak. Model FLOPs count what the
algorithm must compute: encoder matmuls on real tokens (not the [PAD] tail), bidirectional attention over
each segment (sum of len^2, not halved), and the vocab head on the masked positions only (the expected
`mask_prob` share of the tokens the masker may select: no [CLS], [SEP] or [UNK]), forward + backward = 3 x
forward (`model_flops_per_token`).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from mlmtrain.model import BertConfig

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, by precision (fp32 = TF32
# tensor cores), for the model names torch.cuda.get_device_name gives: whole words, the first match wins (an
# "L40S" is no "L4", an "H100 PCIe" no SXM H100, an "RTX A1000" no A100); a GPU not listed gets no MFU rather
# than another card's. Override with `train.peak_tflops` (e.g. the matmul rate `mlmtrain bench` measures).
PEAK_TFLOPS = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # SXM
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},  # SXM and PCIe alike
    "L40S": {"bf16": 362.05, "fp16": 362.05, "fp32": 183.0},
    "L40": {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
}


def model_flops_per_token(config: BertConfig, seq_len_stats, head_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per real token, counting matmuls only.

    6 x matmul parameters (encoder: 4C^2 + 2CI per layer) + 6 x head_fraction x head parameters (C^2 + CV),
    plus attention 12 x layers x C x S (QK^T and AV, fwd+bwd, bidirectional so not halved), where S is the
    context length a token attends over. `seq_len_stats` is either that mean context length (a number) or the
    segment lengths themselves (then S = sum(len^2) / sum(len), the token-weighted mean). `head_fraction` is
    the share of tokens the vocab head runs on: 1.0 for a full head (transformers), the masked fraction (about
    0.15) for our masked-only head."""
    C, I, V, nl = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    if isinstance(seq_len_stats, (int, float)):
        context = float(seq_len_stats)
    else:
        lengths = torch.as_tensor(seq_len_stats, dtype=torch.float64)
        context = float((lengths * lengths).sum() / lengths.sum().clamp(min=1))
    encoder_params = nl * (4 * C * C + 2 * C * I)
    head_params = C * C + C * V
    return 6 * encoder_params + 6 * head_fraction * head_params + 12 * nl * C * context


def peak_tflops_for(device: torch.device, precision: str) -> float:
    """The table's peak for this GPU and precision; 0.0 (MFU not reported) for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return 0.0
    return peak_tflops_named(torch.cuda.get_device_name(device), precision)


def peak_tflops_named(name: str, precision: str) -> float:
    """The table's peak for the GPU model `name` (as torch.cuda.get_device_name says it), or 0.0."""
    for model, peaks in PEAK_TFLOPS.items():
        if re.search(rf"(?<!\w){re.escape(model)}(?!\w)", name, re.IGNORECASE):
            return peaks[precision]
    return 0.0


def train_flops_per_batch(config: BertConfig, batch, mask_prob: float) -> float:
    """Training FLOPs of one packed batch's real segments (host-side numbers only: no device sync)."""
    if batch.segment_lengths is not None:  # rows: the real segments sit between the rows' [PAD] tails
        lengths = batch.segment_lengths.astype(np.float64)
    else:
        lengths = np.diff(batch.cu_seqlens.numpy()[: batch.num_segments + 1]).astype(np.float64)  # real segments
    # the head runs on the selected share of the tokens the masker may select ([CLS], [SEP], [UNK] never are)
    head_fraction = mask_prob * batch.num_maskable_tokens / max(batch.num_real_tokens, 1)
    return model_flops_per_token(config, lengths, head_fraction=head_fraction) * batch.num_real_tokens
