"""BERT encoder + masked-only MLM head, read top to bottom.

Post-LayerNorm like BERT, exact GELU, learned absolute positions, token types (all 0: MLM only, no NSP),
decoder tied to the word embeddings. Every module and parameter carries the Hugging Face name
(`bert.encoder.layer.{i}.attention.self.query`, `cls.predictions.bias`, ...) so a state dict moves to and
from `transformers.BertForMaskedLM` with no key mapping.

Two entry points:
- packed (the training path): flat [T] tokens of whole segments ([CLS] sentence [SEP], or with pack =
  "document" several sentences of one document), `cu_seqlens` marking segment starts, position ids restarting
  at 0 per segment; attention never crosses a segment boundary. Logits are
  computed only at `masked_positions` (a fixed-size gathered index), so the C x V projection runs on ~15%
  of tokens and every shape is static for torch.compile.
- padded (`forward_padded`): [B, L] ids + attention mask -> [B, L, V], as transformers does it.

Attention (attention.py) is chosen once per forward from `attn_impl`, device and dtype: flash varlen or the
padded SDPA reference on flat batches; FlexAttention, the segment-attention kernel or the dense-mask reference
on rows (`segment_ids`). The work around the matmuls runs as `FastPaths` says (fast_paths.py). A Linear swapped
for another module (torchao's Float8Linear) runs as itself: q/k/v then run as three matmuls. Under bf16
autocast the logits come back in bf16 (a bf16 decoder matmul); `mlm_loss_sum` upcasts to fp32 first.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlmtrain.attention import attention_for, choose_impl, padded_attention, takes_qkv
from mlmtrain.config import MODEL_SIZES, SHAPE_DIMS
from mlmtrain.errors import UserError
from mlmtrain.fast_paths import FastPaths, bias_then_gelu, post_ln_residual, set_fast_paths
from mlmtrain.preflight import check_model_fields

# ----------------------------------------------------------------------------------------------------------
# config


@dataclass
class BertConfig:
    """The BertConfig fields our model uses, with Hugging Face's names and defaults."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: pick a head count that divides it."
            )
        if self.vocab_size < 1 or self.max_position_embeddings < 1:
            raise UserError(
                f"vocab_size ({self.vocab_size}) and max_position_embeddings ({self.max_position_embeddings}) "
                "must both be positive."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_size(cls, name: str, vocab_size: int, **overrides) -> BertConfig:
        if name not in MODEL_SIZES:
            raise UserError(f"unknown model size {name!r}: choose one of {', '.join(MODEL_SIZES)}.")
        return cls(vocab_size=vocab_size, **{**MODEL_SIZES[name], **overrides})

    @classmethod
    def from_spec(cls, spec, vocab_size: int, pad_token_id: int) -> BertConfig:
        """From the run config's `model` section (a preset size, its overrides) and the tokenizer's sizes."""
        return cls(
            vocab_size=vocab_size,
            **spec.dims(),
            max_position_embeddings=spec.max_position_embeddings,
            type_vocab_size=spec.type_vocab_size,
            layer_norm_eps=spec.layer_norm_eps,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
            initializer_range=spec.initializer_range,
            pad_token_id=pad_token_id,
        )

    @classmethod
    def from_dict(cls, d: dict, source: str = "the model config") -> BertConfig:
        """From a checkpoint's or transformers' config dict: extra keys ignored, the rest checked (`source`)."""
        check_model_fields(d, source)
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})

    def to_hf_dict(self) -> dict:
        """A complete transformers `config.json` for `BertForMaskedLM` (absolute positions, exact GELU)."""
        return {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            **dataclasses.asdict(self),
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
            "is_decoder": False,
            "add_cross_attention": False,
            "classifier_dropout": None,
            "use_cache": True,
        }


# The config fields that fix the weights' shapes: a checkpoint fits a model iff these agree.
SHAPE_FIELDS = ("vocab_size", *SHAPE_DIMS)
# Tied parameters as transformers declares them (`_tied_weights_keys`): alias -> the tensor it IS.
# Saved files hold only the right-hand names, as transformers itself writes them.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Buffers some transformers versions put in state dicts; we derive them, so they are dropped on load.
HF_BUFFER_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def drop_tied_aliases(state_dict: dict) -> dict:
    """The state dict as saved: each tied tensor once, under the name transformers stores it by."""
    return {k: v for k, v in state_dict.items() if k not in TIED_KEYS}


# ----------------------------------------------------------------------------------------------------------
# modules (names are transformers')


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    fast = FastPaths()  # set by fast_paths.set_fast_paths

    def forward(self, input_ids, position_ids):  # (..., ) -> (..., C)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings.weight[0]  # every token is type 0 (no NSP): no gather needed
        x = self.LayerNorm(x)
        if self.fast.residual_dtype == "compute" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the residual stream starts here
        return self.dropout(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        C = config.hidden_size
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.attention_dropout = config.attention_probs_dropout_prob  # a float: SDPA applies it

    def forward(self, x, attend):  # x (..., C); attend(q, k, v, dropout_p) on (..., H, D); the kernel's: attend(qkv)
        if type(self.query) is nn.Linear:
            # one (C, 3C) matmul, not three (C, C) (3% of a base step); the parameters keep transformers' names
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3C, C)
            b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # (3C,)
            qkv = F.linear(x, w, b).unflatten(-1, (3, self.num_heads, self.head_dim))  # (..., 3, H, D)
            if takes_qkv(attend):  # one gradient, no stack
                return attend(qkv).flatten(-2)  # (..., C); it has no dropout
            q, k, v = qkv.unbind(-3)  # 3 x (..., H, D)
        else:  # a swapped-in Linear (torchao's Float8Linear) must run as itself, or its matmul would be skipped
            q, k, v = (m(x).unflatten(-1, (self.num_heads, self.head_dim)) for m in (self.query, self.key, self.value))
            if takes_qkv(attend):
                return attend(torch.stack([q, k, v], dim=-3)).flatten(-2)
        out = attend(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)  # (..., H, D)
        return out.flatten(-2)  # (..., C)


class BertSelfOutput(nn.Module):  # attention.output
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    fast = FastPaths()  # set by fast_paths.set_fast_paths

    def forward(self, h, residual, port=None):  # -> (y, y's gradient port): fast_paths.post_ln_residual
        return post_ln_residual(h, self.dense, residual, self.dropout, self.LayerNorm, self.fast, port)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, attend, port=None):
        return self.output(self.self(x, attend), x, port)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    fast = FastPaths()  # set by fast_paths.set_fast_paths

    def forward(self, x):  # (..., C) -> (..., I)
        return bias_then_gelu(x, self.dense, self.fast)


class BertOutput(nn.Module):  # the MLP's down projection
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    fast = FastPaths()  # set by fast_paths.set_fast_paths

    def forward(self, h, residual, port=None):  # (..., I), (..., C) -> (..., C) and its gradient port
        return post_ln_residual(h, self.dense, residual, self.dropout, self.LayerNorm, self.fast, port)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, attend, port=None):  # x and its gradient port -> the same for the layer's output
        x, port = self.attention(x, attend, port)
        return self.output(self.intermediate(x), x, port)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attend):
        port = None  # x's gradient port (fast_paths.post_ln_residual): the embeddings' output has none
        for layer in self.layer:
            x, port = layer(x, attend, port)
        return x


class BertModel(nn.Module):  # `bert.` (no pooler: BertForMaskedLM has none)
    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids, position_ids, attend):
        return self.encoder(self.embeddings(input_ids, position_ids), attend)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):  # `cls.predictions`
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # weight tied by BertForMaskedLM
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one tensor, two names, as transformers

    def forward(self, x):  # (..., C) -> (..., V)
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):  # `cls`
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


# ----------------------------------------------------------------------------------------------------------
# the model


class BertForMaskedLM(nn.Module):
    def __init__(self, config: BertConfig, attn_impl: str = "auto", fast: FastPaths | None = None):
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl  # "auto" | "varlen" | "sdpa" | "flex" | "triton"; read at each forward
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied
        self.apply(self._init_weights)
        self.fast = set_fast_paths(self, fast or FastPaths())  # how the sublayers run; fast_paths.set_fast_paths

    def _init_weights(self, module):
        """BERT's: Linear/Embedding weights ~ N(0, 0.02), biases 0, LayerNorm 1/0, the [PAD] row 0."""
        std = self.config.initializer_range
        if module is self.cls.predictions.decoder:
            return  # its weight is the word embedding and its bias cls.predictions.bias: initialised there
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, masked_positions, segment_ids=None):
        """Packed MLM forward.

        input_ids, position_ids: (T,) int64 or int32; cu_seqlens: (S+1,) int32, starting at 0 and ending at T,
        may end in repeated values (empty segments) so S stays fixed; max_seqlen: python int >= the longest segment;
        masked_positions: (M,) int64 in [0, T) (padded slots may point at any valid token; their labels are
        -100); segment_ids: (R, L) int32, R * L = T, for rows of whole segments (RowPacker). Returns logits (M, V)
        at the masked positions only: fp32, or the autocast dtype under autocast."""
        T = input_ids.shape[0]
        # Linear outputs take the autocast dtype when autocast is on; the flash path needs fp16/bf16.
        compute_dtype = (
            torch.get_autocast_dtype(input_ids.device.type)
            if torch.is_autocast_enabled(input_ids.device.type)
            else self.bert.embeddings.word_embeddings.weight.dtype
        )
        impl = choose_impl(self.attn_impl, input_ids.device, compute_dtype, rows=segment_ids is not None)
        attend = attention_for(impl, cu_seqlens, max_seqlen, T, segment_ids)  # layout built once, for every layer
        hidden = self.bert(input_ids, position_ids, attend)  # (T, C)
        hidden = hidden.index_select(0, masked_positions)  # (M, C)
        return self.cls(hidden)  # (M, V)

    def forward_padded(self, input_ids, attention_mask):
        """(B, L) ids + (B, L) mask (1 = real token) -> logits (B, L, V), as transformers' BertForMaskedLM with
        right padding (positions 0..L-1 in every row)."""
        B, L = input_ids.shape
        position_ids = torch.arange(L, device=input_ids.device).expand(B, L)  # (B, L)
        key_mask = attention_mask.bool()  # (B, L)
        hidden = self.bert(input_ids, position_ids, functools.partial(padded_attention, key_mask=key_mask))  # (B, L, C)
        return self.cls(hidden)  # (B, L, V)

    # ---- state dicts in transformers' layout

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """What transformers writes to model.safetensors: tied aliases stored once, contiguous, detached."""
        return {k: v.detach().contiguous() for k, v in drop_tied_aliases(self.state_dict()).items()}

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a transformers-layout state dict (with or without the tied aliases and position buffers).
        Raises UserError naming the first mismatched keys or shapes, so a wrong checkpoint is a sentence."""
        sd = {k: v for k, v in state_dict.items() if k not in HF_BUFFER_KEYS}
        for alias, source in TIED_KEYS.items():
            if alias not in sd and source in sd:
                sd[alias] = sd[source]
        expected = self.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise UserError(
                f"the weights do not match a BertForMaskedLM: {len(missing)} missing keys {missing[:3]} and "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}; pass a checkpoint written by mlmtrain "
                "or a transformers BertForMaskedLM."
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise UserError(
                    f"weight {k} has shape {tuple(v.shape)} but the config gives {tuple(expected[k].shape)}: "
                    "the config.json does not belong to these weights (check vocab_size and the model size)."
                )
        self.load_state_dict(sd, strict=True)


def mlm_loss_sum(logits, masked_labels):
    """(M, V) logits, (M,) labels with -100 in padded/unused slots (transformers' ignore label, the masking
    kernel's IGNORE_INDEX: this module imports no kernel) -> (summed CE in fp32, number of targets).

    Both are 0-dim tensors (no host sync). Callers divide: with gradient accumulation, by the target count
    over all micro-batches, so every masked token weighs the same."""
    loss_sum = F.cross_entropy(logits.float(), masked_labels, ignore_index=-100, reduction="sum")
    return loss_sum, (masked_labels != -100).sum()


def hf_tensor_shapes(config: BertConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional): tensor name -> shape of this config's weights in transformers' layout. Required is
    what `hf_state_dict` saves; optional are the tied aliases and the buffers some transformers versions save.
    Read off a model built on the meta device, so the model itself is the only source of names and shapes."""
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    required = {k: tuple(v.shape) for k, v in model.hf_state_dict().items()}
    state = model.state_dict()
    optional = {k: tuple(state[k].shape) for k in TIED_KEYS}
    optional |= {k: (1, config.max_position_embeddings) for k in HF_BUFFER_KEYS}
    return required, optional
