"""The model against transformers' BertForMaskedLM (fp32, CPU) and against itself across attention paths.

Parity bound: <= 1e-4 max abs logit difference in fp32. Shapes are deliberately odd (hidden 48,
3 heads, vocab 97, sentence lengths 1..max) so layout bugs cannot hide behind powers of two."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from mlmtrain.errors import UserError
from mlmtrain.flops import model_flops_per_token
from mlmtrain.model import (
    MODEL_SIZES,
    TIED_KEYS,
    BertConfig,
    BertForMaskedLM,
    mlm_loss_sum,
)

transformers = pytest.importorskip("transformers")

ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def odd_config(**overrides) -> BertConfig:
    return BertConfig(
        **{
            **dict(
                vocab_size=97,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=80,
                max_position_embeddings=40,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            **overrides,
        }
    )


def random_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every Linear bias drawn at random (BERT's init makes them 0, which a dropped bias would not change)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


def hf_twin(model: BertForMaskedLM):
    """transformers' BertForMaskedLM with our config and our weights (sdpa attention, eval mode)."""
    hf_config = transformers.BertConfig(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    hf = transformers.BertForMaskedLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def packed_batch(sentences: list[torch.Tensor], empty_tail: int = 2):
    """Flat ids, restarting positions, cu_seqlens (int32) with `empty_tail` empty segments at the end."""
    lengths = torch.tensor([len(s) for s in sentences])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (S+1,)
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:].repeat(empty_tail)])  # (S+1+empty,)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])  # (T,)
    return torch.cat(sentences), position_ids, cu_seqlens


def random_sentences(gen, vocab_size: int, lengths: list[int]) -> list[torch.Tensor]:
    return [torch.randint(5, vocab_size, (n,), generator=gen) for n in lengths]


def report(a, b) -> str:
    d = (a.float() - b.float()).abs()
    return f"max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


# ---------------------------------------------------------------------------------------------- names, ties


def test_state_dict_matches_transformers_keys_and_ties():
    model = BertForMaskedLM(odd_config())
    hf = transformers.BertForMaskedLM(
        transformers.BertConfig(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    )
    ours, theirs = model.state_dict(), hf.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    result = hf.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    saved = model.hf_state_dict()
    assert not set(TIED_KEYS) & set(saved) and "bert.embeddings.position_ids" not in saved
    unique = {id(p): p for p in model.parameters()}.values()  # the tied decoder weight counted once
    assert sum(p.numel() for p in unique) == sum(v.numel() for v in saved.values())


def test_loads_a_transformers_state_dict():
    torch.manual_seed(1)
    config = odd_config()
    hf = transformers.BertForMaskedLM(
        transformers.BertConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    ).eval()
    sd = hf.state_dict()
    sd["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]  # older HF files
    for alias in TIED_KEYS:  # the on-disk form stores ties once
        sd.pop(alias)
    model = BertForMaskedLM(config).eval()
    model.load_hf_state_dict(sd)
    ids = torch.randint(5, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours, theirs = model.forward_padded(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=ATOL[torch.float32]), report(ours, theirs)


def test_load_rejects_wrong_weights_with_a_sentence():
    model = BertForMaskedLM(odd_config())
    sd = model.hf_state_dict()
    with pytest.raises(UserError, match="missing keys"):
        model.load_hf_state_dict({k: v for k, v in sd.items() if "layer.1." not in k})
    bigger = BertForMaskedLM(odd_config(vocab_size=98)).hf_state_dict()
    with pytest.raises(UserError, match=r"\(98, 48\).*\(97, 48\)"):
        model.load_hf_state_dict(bigger)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_logits_equal_transformers_per_sentence(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BertForMaskedLM(odd_config()).eval()
    hf = hf_twin(model)
    lengths = [1, 7, 37, 2, 23, 13]  # includes a 1-token sentence
    sentences = random_sentences(gen, 97, lengths)
    input_ids, position_ids, cu_seqlens = packed_batch(sentences)
    T = input_ids.numel()
    masked = torch.randperm(T, generator=gen)[: T // 3]
    masked_positions = torch.cat([masked, torch.zeros(5, dtype=torch.long)])  # padded slots point at token 0
    with torch.no_grad():
        ours = model(input_ids, position_ids, cu_seqlens, max(lengths), masked_positions)  # (M, V)
        expected = torch.empty(T, 97)
        pad_to = max(lengths) + 3  # each sentence alone, padded as transformers users do (<= 40 positions)
        for s, start in zip(sentences, cu_seqlens[:-1].tolist()):
            ids = F.pad(s, (0, pad_to - len(s)))[None]
            mask = (torch.arange(pad_to) < len(s)).long()[None]
            expected[start : start + len(s)] = hf(input_ids=ids, attention_mask=mask).logits[0, : len(s)]
    assert ours.shape == (masked_positions.numel(), 97)
    ref = expected[masked_positions]
    assert torch.allclose(ours, ref, atol=ATOL[torch.float32], rtol=0), report(ours, ref)


def test_packed_batch_has_no_cross_contamination():
    gen = torch.Generator().manual_seed(3)
    model = BertForMaskedLM(odd_config()).eval()
    sentences = random_sentences(gen, 97, [5, 17, 1, 30, 9])
    input_ids, position_ids, cu_seqlens = packed_batch(sentences, empty_tail=3)
    with torch.no_grad():
        together = model(input_ids, position_ids, cu_seqlens, 30, torch.arange(input_ids.numel()))
        alone = torch.cat([model(*packed_batch([s], empty_tail=0), len(s), torch.arange(len(s))) for s in sentences])
        # change every other sentence: sentence 1's logits must not move
        others = [s if i == 1 else torch.randint(5, 97, s.shape, generator=gen) for i, s in enumerate(sentences)]
        changed = model(packed_batch(others, 3)[0], position_ids, cu_seqlens, 30, torch.arange(input_ids.numel()))
    assert torch.allclose(together, alone, atol=1e-5, rtol=0), report(together, alone)
    s1 = slice(5, 22)
    assert torch.allclose(together[s1], changed[s1], atol=1e-5, rtol=0), report(together[s1], changed[s1])


def test_forward_padded_equals_transformers():
    gen = torch.Generator().manual_seed(4)
    model = BertForMaskedLM(odd_config()).eval()
    hf = hf_twin(model)
    ids = torch.randint(5, 97, (4, 19), generator=gen)
    mask = (torch.arange(19)[None] < torch.tensor([[19], [3], [11], [1]])).long()
    with torch.no_grad():
        ours, theirs = model.forward_padded(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=ATOL[torch.float32], rtol=0), report(ours[real], theirs[real])


def test_every_padded_row_has_a_key_even_for_an_empty_segment():
    """The padded reference gives each empty segment one dummy key: an all-masked softmax row is NaN on some
    backends (torch's CPU SDPA returns 0 there, so the gradient test below cannot see its absence)."""
    from mlmtrain.attention import packed_layout

    cu_seqlens = torch.tensor([0, 4, 4, 5, 5, 17, 17, 17], dtype=torch.int32)
    gather_index, key_mask, scatter_index = packed_layout(cu_seqlens, 12, 17)  # (S, L), (S, L), (T,)
    assert key_mask.shape == (7, 12) and key_mask.any(dim=1).all()
    assert key_mask.sum(dim=1).tolist() == [4, 1, 1, 1, 12, 1, 1]  # real keys, or the one dummy
    assert sorted(scatter_index.tolist()) == scatter_index.tolist() and scatter_index.unique().numel() == 17


def test_gradients_equal_transformers_and_are_finite_with_empty_segments():
    gen = torch.Generator().manual_seed(5)
    model = BertForMaskedLM(odd_config())
    hf = hf_twin(model).train()  # dropout is 0 in odd_config: train mode is deterministic
    lengths = [4, 1, 12]
    sentences = random_sentences(gen, 97, lengths)
    input_ids, position_ids, cu_seqlens = packed_batch(sentences, empty_tail=0)
    cu_seqlens = torch.tensor([0, 4, 4, 5, 5, 17, 17, 17], dtype=torch.int32)  # empty segments in the middle too
    labels = torch.randint(5, 97, (17,), generator=gen)
    loss_sum, n = mlm_loss_sum(model(input_ids, position_ids, cu_seqlens, 12, torch.arange(17)), labels)
    (loss_sum / n).backward()
    L = max(lengths)
    ids = torch.stack([F.pad(s, (0, L - len(s))) for s in sentences])
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    hf_labels = torch.full((3, L), -100)
    for i, (start, n_i) in enumerate(zip([0, 4, 5], lengths)):
        hf_labels[i, :n_i] = labels[start : start + n_i]
    hf(input_ids=ids, attention_mask=mask, labels=hf_labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-3), (
            f"{name}: {report(p.grad, theirs[name].grad)}"
        )


def test_int32_ids_as_the_packer_emits_them():
    gen = torch.Generator().manual_seed(11)
    model = BertForMaskedLM(odd_config()).eval()
    input_ids, position_ids, cu_seqlens = packed_batch(random_sentences(gen, 97, [8, 3, 21]))
    masked = torch.tensor([0, 9, 31])
    with torch.no_grad():
        wide = model(input_ids, position_ids, cu_seqlens, 21, masked)
        narrow = model(input_ids.int(), position_ids.int(), cu_seqlens, 21, masked.int())
    assert torch.equal(wide, narrow)


def test_fused_qkv_equals_separate_projections():
    """The one (C, 3C) matmul gives exactly what transformers' three query/key/value Linear layers give."""
    from mlmtrain.model import BertSelfAttention

    config = odd_config()
    attention = BertSelfAttention(config)
    x = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(6))
    seen = {}

    def attend(q, k, v, dropout_p):
        seen.update(query=q, key=k, value=v)
        return q

    with torch.no_grad():
        attention(x, attend)
        for name, got in seen.items():
            want = getattr(attention, name)(x).unflatten(-1, (config.num_attention_heads, config.head_dim))
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (name, report(got, want))


# ---------------------------------------------------------------------------------------------- behaviour


def test_init_is_berts():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_size("mini", 1000))
    q = model.bert.encoder.layer[0].attention.self.query
    assert abs(q.weight.std().item() - 0.02) < 1e-3 and q.bias.abs().max() == 0
    assert model.bert.embeddings.word_embeddings.weight[0].abs().max() == 0  # [PAD] row
    ln = model.bert.embeddings.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert model.cls.predictions.bias.abs().max() == 0


def test_dropout_default_on_and_switchable_off():
    gen = torch.Generator().manual_seed(7)
    input_ids, position_ids, cu_seqlens = packed_batch(random_sentences(gen, 97, [9, 6]))
    args = (input_ids, position_ids, cu_seqlens, 9, torch.arange(15))
    noisy = BertForMaskedLM(odd_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)).train()
    assert BertConfig().hidden_dropout_prob == 0.1 and BertConfig().attention_probs_dropout_prob == 0.1
    assert not torch.equal(noisy(*args), noisy(*args))
    quiet = BertForMaskedLM(odd_config()).train()
    assert torch.equal(quiet(*args), quiet(*args))


def test_mlm_loss_sum_ignores_padding_and_upcasts():
    logits = torch.randn(6, 11, dtype=torch.bfloat16)
    labels = torch.tensor([1, 2, -100, 4, -100, 10])
    loss_sum, n = mlm_loss_sum(logits, labels)
    assert loss_sum.dtype == torch.float32 and n.item() == 4
    expected = F.cross_entropy(logits.float()[labels != -100], labels[labels != -100], reduction="sum")
    assert torch.allclose(loss_sum, expected)


def test_bf16_autocast_on_cpu_gives_bf16_logits():
    gen = torch.Generator().manual_seed(8)
    model = BertForMaskedLM(odd_config()).eval()
    input_ids, position_ids, cu_seqlens = packed_batch(random_sentences(gen, 97, [9, 6]))
    with torch.no_grad():
        ref = model(input_ids, position_ids, cu_seqlens, 9, torch.arange(15))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids, position_ids, cu_seqlens, 9, torch.arange(15))
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=ATOL[torch.bfloat16] * 4, rtol=0.05), report(low, ref)


def test_attn_impl_override_is_checked():
    model = BertForMaskedLM(odd_config(), attn_impl="varlen")
    input_ids, position_ids, cu_seqlens = packed_batch([torch.tensor([5, 6, 7])])
    with pytest.raises(ValueError, match="CUDA"):
        model(input_ids, position_ids, cu_seqlens, 3, torch.arange(3))


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward like inductor would
    (dynamo + AOTAutograd) without inductor's ~20 s CPU code generation."""
    gen = torch.Generator().manual_seed(9)
    model = BertForMaskedLM(odd_config()).eval()
    input_ids, position_ids, cu_seqlens = packed_batch(random_sentences(gen, 97, [9, 6, 12]))
    masked, labels = torch.tensor([0, 4, 20, 26, 0]), torch.tensor([5, 6, 7, 8, -100])

    def step(input_ids, position_ids, cu_seqlens, masked, labels):
        loss_sum, n = mlm_loss_sum(model(input_ids, position_ids, cu_seqlens, 12, masked), labels)
        return loss_sum / n

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids, position_ids, cu_seqlens, masked, labels)
    loss.backward()
    assert torch.allclose(loss, step(input_ids, position_ids, cu_seqlens, masked, labels), atol=1e-6)


# ---------------------------------------------------------------------------------------------- config, FLOPs


def test_config_sizes_and_errors():
    assert set(MODEL_SIZES) == {"tiny", "mini", "small", "base", "large"}
    base = BertConfig.from_size("base", 30000)
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    large = BertConfig.from_size("large", 30000, hidden_dropout_prob=0.0)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert large.hidden_dropout_prob == 0.0
    with pytest.raises(UserError, match="unknown model size 'huge'"):
        BertConfig.from_size("huge", 100)
    with pytest.raises(UserError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    hf = transformers.BertConfig(**{k: v for k, v in base.to_hf_dict().items() if k != "architectures"})
    assert BertConfig.from_dict(hf.to_dict()) == base


def test_flops_formula():
    c = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2)
    matmul = 2 * (4 * 64 + 2 * 8 * 32)
    head = 64 + 8 * 100
    assert model_flops_per_token(c, 10) == 6 * matmul + 6 * head + 12 * 2 * 8 * 10
    # lengths [2, 4]: tokens of the 4-long segment attend over 4 keys -> token-weighted mean (4 + 16) / 6
    assert model_flops_per_token(c, [2, 4], head_fraction=0.15) == pytest.approx(
        6 * matmul + 6 * 0.15 * head + 12 * 2 * 8 * (20 / 6)
    )


# ---------------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_fp32_reference_on_gpu(dtype):
    """Flash varlen forward/backward under autocast vs the fp32 SDPA reference, empty segments included."""
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    config = BertConfig.from_size(
        "mini", 1000, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    ref = BertForMaskedLM(config, attn_impl="sdpa").cuda()
    fast = BertForMaskedLM(config, attn_impl="varlen").cuda()
    fast.load_state_dict(ref.state_dict())
    lengths = [1, 128, 37, 2, 64, 5]
    input_ids, position_ids, cu_seqlens = packed_batch(random_sentences(gen, 1000, lengths), empty_tail=3)
    T = input_ids.numel()
    masked = torch.randperm(T, generator=gen)[: T // 4]
    labels = torch.randint(5, 1000, masked.shape, generator=gen)
    batch = [t.cuda() for t in (input_ids, position_ids, cu_seqlens)]
    ref_logits = ref(*batch, 128, masked.cuda())
    with torch.autocast("cuda", dtype=dtype):
        fast_logits = fast(*batch, 128, masked.cuda())
    assert fast_logits.dtype == dtype
    tol = ATOL[dtype] * max(1.0, ref_logits.abs().max().item())
    assert torch.allclose(fast_logits.float(), ref_logits, atol=tol, rtol=0), report(fast_logits, ref_logits)
    # fp16 needs loss scaling, as the trainer's GradScaler does: small attention gradients underflow
    # fp16 otherwise (seen on an H200: 6.7% relative error on layer 0's query weight without it)
    scale = 1024.0 if dtype == torch.float16 else 1.0
    for logits in (ref_logits, fast_logits):
        loss_sum, n = mlm_loss_sum(logits, labels.cuda())
        (loss_sum / n * scale).backward()
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        g, h = p.grad, fast_params[name].grad.float()
        assert torch.isfinite(h).all(), name
        if name.endswith("attention.self.key.bias"):
            # softmax is shift-invariant per query and the key bias shifts a query's scores by a constant,
            # so this gradient is exactly 0 in exact arithmetic: both sides hold only rounding noise
            # (seen on an H200: |g| ~ 1e-11 fp32, |h| ~ 4e-7 bf16), and a relative error is meaningless; the
            # fp16 loss scale multiplies that noise too (4-8e-5 in a CPU emulation of flash's rounding at x1024)
            assert h.abs().max() < 1e-4 * scale and g.abs().max() < 1e-4 * scale, report(g, h)
            continue
        rel = ((g - h).norm() / g.norm().clamp(min=1e-12)).item()  # relative L2 error of the whole tensor
        assert rel <= 0.05, f"{name}: relative error {rel:.3g}, {report(g, h)}"


@requires_cuda
def test_auto_picks_varlen_under_autocast_on_gpu(monkeypatch):
    import mlmtrain.attention as attention_module

    calls = []
    real = attention_module.varlen_attention
    monkeypatch.setattr(attention_module, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = BertForMaskedLM(odd_config(hidden_size=64, num_attention_heads=4)).cuda().eval()
    batch = [t.cuda() for t in packed_batch([torch.tensor([5, 6, 7]), torch.tensor([8, 9])])]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(*batch, 3, torch.arange(5, device="cuda"))
    assert calls


def test_bench_model_smoke():
    """benchmarks/bench_model.py runs end to end and counts real tokens only (tiny, CPU, one repeat)."""
    from mlmtrain.benchmarks.bench_model import run

    rows = run("tiny", 512, "cpu", "fp32", repeats=1, warmup=0, vocab_size=300, hf_batch_size=8)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"ours", "hf"}
    ours, hf = by_name["ours"], by_name["hf"]
    assert ours["real_tokens"] == hf["real_tokens"] <= 512 and ours["padded_tokens"] == 512
    assert hf["padded_tokens"] >= hf["real_tokens"] and ours["flops"] < hf["flops"]  # masked-only head
    assert all(r["tokens_per_s"]["median"] > 0 for r in rows)


def test_a_gpu_gets_its_own_datasheet_peak_or_none():
    """The peak is looked up by the whole model name: an L40S is no L4 (MFU 3x too high), an H100 PCIe or NVL no
    SXM H100 (MFU 0.76x / 0.84x), an RTX A1000 no A100; a GPU not in the table gets no MFU, not another card's."""
    from mlmtrain.flops import peak_tflops_named

    expected = {
        "NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA GH200 480GB": 989.4,
        "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.5, "NVIDIA H200 NVL": 835.5,
        "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05,
        "NVIDIA L4": 121.0, "NVIDIA A10": 125.0,
        "NVIDIA RTX A1000": 0.0, "NVIDIA A10G": 0.0, "NVIDIA GeForce RTX 4090": 0.0,
    }  # fmt: skip
    assert {name: peak_tflops_named(name, "bf16") for name in expected} == expected
    assert peak_tflops_named("NVIDIA L40S", "fp32") == 183.0


def test_which_attention_applies_dropout_to_its_probabilities():
    """Only the SDPA paths drop attention probabilities; a run on a fast kernel says so at its start."""
    from mlmtrain.attention import choose_impl, dropout_note, has_dropout

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # choose_impl reads the device's type only
    picked = {
        "cuda bf16 flat": choose_impl("auto", cuda, torch.bfloat16, rows=False, compiled=True),
        "cuda fp32 flat": choose_impl("auto", cuda, torch.float32, rows=False, compiled=True),
        "cuda bf16 rows compiled": choose_impl("auto", cuda, torch.bfloat16, rows=True, compiled=True),
        "cuda bf16 rows eager": choose_impl("auto", cuda, torch.bfloat16, rows=True, compiled=False),
        "cpu rows": choose_impl("auto", cpu, torch.float32, rows=True, compiled=True),
        "triton": choose_impl("triton", cuda, torch.bfloat16, rows=True, compiled=True),
    }
    flash = "varlen" if picked["cuda bf16 flat"] == "varlen" else "sdpa"
    assert picked == {"cuda bf16 flat": flash, "cuda fp32 flat": "sdpa", "cuda bf16 rows compiled": "flex",
                      "cuda bf16 rows eager": "sdpa", "cpu rows": "sdpa", "triton": "triton"}  # fmt: skip
    assert [has_dropout(impl) for impl in ("sdpa", "varlen", "flex", "triton")] == [True, False, False, False]
    assert dropout_note("flex", 0.1) == (
        "dropout 0.1 on hidden states only: flex attention has none on its probabilities (sdpa has)"
    )
    assert dropout_note("sdpa", 0.1) is None and dropout_note("flex", 0.0) is None


def test_auto_takes_flash_varlen_for_fp16_too():
    """Flat batches on CUDA take flash varlen in fp16 as in bf16, the SDPA reference in fp32 (choose_impl reads the
    device's type only: no CUDA call). Kills: att_fp16_not_flash."""
    from mlmtrain.attention import choose_impl

    cuda = torch.device("cuda")
    assert choose_impl("auto", cuda, torch.float16, rows=False, compiled=False) == "varlen"
    assert choose_impl("auto", cuda, torch.bfloat16, rows=False, compiled=False) == "varlen"
    assert choose_impl("auto", cuda, torch.float32, rows=False, compiled=False) == "sdpa"


def test_attention_for_binds_each_impl_to_its_layout():
    """attention_for: rows (segment_ids given) take the dense-mask row reference, flat batches the packed gather; the
    kernel path takes qkv whole and nothing else does. Kills: att_rows_sdpa_via_packed (rows through the packed
    S x max_seqlen gather: the same numbers, not the documented row path)."""
    from mlmtrain.attention import (
        attention_for,
        packed_sdpa_attention,
        row_sdpa_attention,
        takes_qkv,
        triton_row_attention,
    )

    segment_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 2, 5, 8], dtype=torch.int32)
    rows = attention_for("sdpa", cu_seqlens, 3, 8, segment_ids)
    flat = attention_for("sdpa", cu_seqlens, 3, 8)
    kernel = attention_for("triton", cu_seqlens, 3, 8, segment_ids)
    assert rows.func is row_sdpa_attention and flat.func is packed_sdpa_attention
    assert kernel.func is triton_row_attention
    same = rows.keywords["same_segment"]  # built once per forward, for every layer: (R, 1, L, L)
    assert same.shape == (1, 1, 8, 8) and same[0, 0].sum() == 2 * 2 + 3 * 3 + 3 * 3 and same[0, 0, 1, 1]
    assert [takes_qkv(a) for a in (rows, flat, kernel)] == [False, False, True]


def test_eval_forward_applies_no_attention_dropout():
    """In eval mode the SDPA paths get dropout_p = 0 whatever the config says: two forwards of a model with
    attention dropout 0.1 (hidden dropout 0) give the same logits, flat and in rows.
    Kills: model_eval_attention_dropout (test_dropout_default_on_and_switchable_off runs train() only)."""
    from mlmtrain.model import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=80, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    ids = torch.randint(5, 97, (16,), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(9), torch.arange(7)])
    cu_seqlens = torch.tensor([0, 9, 16], dtype=torch.int32)
    segment_ids = torch.tensor([[0] * 9 + [1] * 7], dtype=torch.int32)
    with torch.no_grad():
        for rows in (None, segment_ids):
            args = (ids, positions, cu_seqlens, 9, torch.arange(16), rows)
            assert torch.equal(model(*args), model(*args))
        model.train()  # the same model in training does drop attention probabilities
        assert not torch.equal(model(*args), model(*args))


def test_forward_chooses_attention_by_the_autocast_dtype(monkeypatch):
    """The packed forward hands choose_impl the autocast dtype when autocast is on (flash needs fp16/bf16), the
    parameters' dtype otherwise. Kills: model_compute_dtype_ignores_autocast (on a GPU: bf16 autocast would take
    the SDPA reference instead of flash; the GPU test test_auto_picks_varlen_under_autocast_on_gpu sees it)."""
    import mlmtrain.model as model_module
    from mlmtrain.model import BertConfig, BertForMaskedLM

    seen = []
    real = model_module.choose_impl
    monkeypatch.setattr(
        model_module,
        "choose_impl",
        lambda impl, device, dtype, **kw: seen.append(dtype) or real(impl, device, dtype, **kw),
    )
    config = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=80, max_position_embeddings=40)  # fmt: skip
    model = BertForMaskedLM(config).eval()
    ids = torch.randint(5, 97, (6,))
    args = (ids, torch.arange(6), torch.tensor([0, 6], dtype=torch.int32), 6, torch.arange(6))
    with torch.no_grad():
        model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(*args)
    assert seen == [torch.float32, torch.bfloat16]
