"""Quantised linears (nanoseek/model/quant.py): int4 weight-only, int8 W8A8; accuracy, paths, quantize_."""

import copy

import pytest
import torch
from torch import nn

from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama
from nanoseek.model.quant import QuantLinear, dequantize_int4, quantize_, quantize_int4


def _linear(K=128, N=96, bias=False, std=0.02):
    lin = nn.Linear(K, N, bias=bias)
    nn.init.normal_(lin.weight, std=std)
    if bias:
        nn.init.normal_(lin.bias, std=0.5)
    return lin


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits, bound", [(4, 0.12), (8, 0.02)])
def test_close_to_dense_on_gaussian_weights(bits, bound):
    # Gaussian rows are the hard case. int4 min/max over 32 values spans ~4σ, so the step is ~0.27σ
    # and the rounding error σ·0.27/√12 ≈ 0.08 of the output (measured 0.076-0.082); int8 per-row
    # absmax ~2.7σ over 128 values gives ~0.006 for the weight and as much again for the per-token
    # activation (measured 0.008-0.010).
    lin = _linear()
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert _rel(QuantLinear.from_linear(lin, bits)(x), lin(x)) < bound


def test_int4_exact_on_the_4bit_grid():
    # a Q4_1-style weight: w = d·q + m per group of 32, d and m bf16-representable
    N, K, G = 96, 128, 32
    q = torch.randint(0, 16, (N, K))
    q[:, ::G], q[:, 1::G] = 0, 15          # every group spans the full range, as min/max quantisation sees it
    d = (torch.rand(N, K // G) * 0.01 + 0.001).bfloat16().float()
    m = (torch.randn(N, K // G) * 0.05).bfloat16().float()
    w = (q.float().view(N, K // G, G) * d[..., None] + m[..., None]).view(N, K)
    qq, s, z = quantize_int4(w, G, scale_dtype=torch.float32)
    assert torch.equal(qq, q) and (dequantize_int4(qq, s, z, G) - w).abs().max() < 1e-6
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(3, K).bfloat16()
    with torch.no_grad():
        y = QuantLinear.from_linear(lin, 4)(x)
    ref = x.float() @ w.t()
    # only bf16 output rounding (2^-9 relative) and the bf16 zero point (8·d + m rounded) remain
    assert _rel(y, ref) < 4e-3


def test_int4_and_its_int8_copy_agree():
    lin = _linear(bias=True)
    ql = QuantLinear.from_linear(lin, 4, int8_above=8)
    x = torch.randn(16, 128).bfloat16()
    with torch.no_grad():
        small = torch.cat([ql(x[i:i + 4]) for i in range(0, 16, 4)])   # 4 rows: int4 kernel
        big = ql(x)                                                    # 16 rows: int8 of the same weights
    assert ql.qweight is not None and ql.qweight.dtype == torch.int8
    assert _rel(small, big) < 2e-2          # int8 rounding of weights and activations (measured ~0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_do_not_depend_on_the_batch(dtype):
    # per-token activation scales and exact int32 accumulation: a row alone or among 63 others
    # gives the same bits (what seeded sampling under continuous batching relies on)
    ql = QuantLinear.from_linear(_linear(bias=True), 8)
    assert ql.qweight.dtype == torch.int8
    x = torch.randn(64, 128).to(dtype) * torch.logspace(-2, 2, 64).unsqueeze(1).to(dtype)
    with torch.no_grad():
        alone = torch.cat([ql(x[i:i + 1]) for i in range(64)])
        assert torch.equal(alone, ql(x))
        assert torch.equal(ql(x[:1] * 0), ql.bias.to(dtype).expand(1, -1))     # an all-zero row: no 0/0


def test_int8_copy_is_used_only_above_the_threshold(monkeypatch):
    ql = QuantLinear.from_linear(_linear(), 4, int8_above=8)
    used = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: used.append(1) or real(*a))
    with torch.no_grad():
        ql(torch.randn(2, 4, 128))          # 8 rows: kernel
        ql(torch.randn(3, 3, 128))          # 9 rows: int8
    assert used == [1]
    no_copy = QuantLinear.from_linear(_linear(), 4, int8_above=None)
    assert no_copy.qweight is None and no_copy(torch.randn(64, 128)).shape == (64, 96)


@pytest.mark.parametrize("packed_prefill", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_rows_take_the_prepacked_int8_matmul_with_the_same_integers(dtype, packed_prefill, monkeypatch):
    from nanoseek.model import kernels, quant
    if not (kernels.load() and kernels.pack_int8(torch.ones(16, 16, dtype=torch.int8)) is not None):
        pytest.skip(f"no prepacked int8 matmul here: {kernels._state.get('error')}")
    monkeypatch.setattr(quant, "PACKED_PREFILL", packed_prefill)     # what a CPU with AMX tiles sets
    ql = QuantLinear.from_linear(_linear(bias=True), 8).to(dtype)
    # decode rows (one token each, up to PACKED_ROWS of them) take it; prefills and big batches
    # only where PACKED_PREFILL (AMX) says so
    decode, prefill, big = (torch.randn(*s, 128, dtype=dtype) for s in ((20, 1), (10, 2), (65, 1)))
    with torch.no_grad():
        expected = ql(decode), ql(prefill), ql(big)
        ql.int8_handle = kernels.pack_int8(torch.zeros_like(ql.qweight))   # routes visibly: zero output
        assert (ql(decode) == ql.bias.to(dtype)).all()
        for x, want in ((prefill, expected[1]), (big, expected[2])):
            if packed_prefill:
                assert (ql(x) == ql.bias.to(dtype)).all()
            else:
                assert torch.equal(ql(x), want)
        ql.int8_handle = kernels.pack_int8(ql.qweight)
        got = ql(decode)
    # the same integers; the two scales multiply in another order, so a float32 result may differ
    # in its last bit, and a bf16 one (rarely) by one bf16 step
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert torch.allclose(got, expected[0], rtol=rtol, atol=1e-6)
    assert (got != expected[0]).float().mean() < (0.5 if dtype == torch.float32 else 0.05)
    with pytest.raises(RuntimeError, match="unknown weight handle"):
        torch.ops.nanoseek.int8_linear(decode[:, 0], torch.tensor(10**6), ql.scales)


def test_pack_int8_gives_every_int8_layer_a_handle_once():
    from nanoseek.model import kernels
    from nanoseek.model.quant import pack_int8_
    if not (kernels.load() and kernels.pack_int8(torch.ones(16, 16, dtype=torch.int8)) is not None):
        pytest.skip(f"no prepacked int8 matmul here: {kernels._state.get('error')}")
    model = Transformer(tiny_llama(n_layers=2)).eval()
    n = quantize_(model, bits=8)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert pack_int8_(model) == n == len(layers) and all(m.int8_handle is not None for m in layers)
    assert pack_int8_(model) == 0                            # already packed: nothing repacked


@pytest.mark.parametrize("bits", [4, 8])
def test_bias_shapes_and_dtypes(bits):
    lin = _linear(bias=True)
    ql = QuantLinear.from_linear(lin, bits)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y, ref = ql(x), lin(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float32      # float32 in, float32 out
    assert _rel(y, ref) < (0.05 if bits == 4 else 0.01)               # the bias dominates here
    assert ql(x.bfloat16()).dtype == torch.bfloat16


def test_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantLinear.from_linear(_linear(K=48), 4)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantLinear.from_linear(_linear(), 4, group_size=16)
    with pytest.raises(ValueError, match="divisible by 16"):
        QuantLinear.from_linear(_linear(N=40), 4)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear.from_linear(_linear(), 3)
    assert QuantLinear.from_linear(_linear(K=48, N=40), 8).qweight.shape == (40, 48)   # int8: any shape


def _snap_to_grid(model):
    """Put every weight quantize_ will replace on the int4 grid, so quantising loses nothing but bf16."""
    with torch.no_grad():
        for module in list(model.layers) + list(model.mtp):
            for lin in module.modules():
                if isinstance(lin, nn.Linear) and lin.out_features % 16 == 0:
                    lin.weight.copy_(dequantize_int4(*quantize_int4(lin.weight, 32), 32))


def _greedy(model, ids, steps):
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[:, -steps:]


def _dense_routing_v3():
    """Every token to every expert: routing has no top-k ties to flip under bf16 noise, unlike top-2."""
    return tiny_deepseek_v3(n_expert_groups=1, n_limited_groups=1, n_activated_experts=8)


@pytest.mark.parametrize("make_cfg, expected", [(tiny_llama, 8), (_dense_routing_v3, 69)])
def test_quantize_model_keeps_logits_and_greedy_tokens(make_cfg, expected):
    model = Transformer(make_cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():        # larger weights than init: logits with a clear argmax
            if p.dim() == 2:
                p.normal_(0, 0.08)
    _snap_to_grid(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids)
    ref_tokens = _greedy(model, ids, 6)
    packed, mixed = copy.deepcopy(model), copy.deepcopy(model)
    assert quantize_(packed, bits=4, int8_above=None) == expected
    assert quantize_(mixed, bits=4) == expected
    assert type(packed) is Transformer and packed.embed.weight.dtype == torch.float32
    assert packed.head is None or type(packed.head) is nn.Linear          # the output head stays dense
    if make_cfg is tiny_llama:           # q/k/v and gate/up are fused before quantising
        assert isinstance(packed.layers[0].attn.wqkv, QuantLinear) and not hasattr(packed.layers[0].attn, "wq")
        assert isinstance(packed.layers[0].ffn.w13, QuantLinear) and not hasattr(packed.layers[0].ffn, "w1")
    with torch.no_grad():
        # 24 rows > 8 (every expert gets all of them here): int8 of the same grid weights
        assert _rel(mixed(ids), ref) < 0.03
        # the packed kernel runs bf16 activations: measured 0.004-0.011 on such models
        assert _rel(packed(ids), ref) < 0.03
    assert (_greedy(packed, ids, 6) == ref_tokens).float().mean() >= 0.65       # a near-tie may flip one sequence early
    if make_cfg is _dense_routing_v3:
        attn = packed.layers[0].attn
        assert isinstance(attn.wkv_b, nn.Linear) and isinstance(attn.wo, QuantLinear)
        assert isinstance(attn.wkv_a, nn.Linear)          # 40 outputs: not int4-packable, kept dense
        assert isinstance(packed.mtp[0].eh_proj, QuantLinear)
        assert isinstance(packed.layers[1].ffn.experts[0].w13, QuantLinear)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_head_and_fused_model_close_on_random_weights(bits):
    model = Transformer(tiny_llama()).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(ids)
        assert quantize_(model, bits=bits, head=True) == 9               # 2 layers x (qkv, o, gate/up, down) + head
        assert isinstance(model.head, QuantLinear) and model.embed.weight.dtype == torch.float32   # tied: a copy
        assert _rel(model(ids), ref) < (0.12 if bits == 4 else 0.03)


def test_llm_quantization_option():
    from types import SimpleNamespace

    from nanoseek import LLM
    tokenizer = SimpleNamespace(eos_token_ids=[1])     # enough to build the engine; nothing is decoded
    llm = LLM(Transformer(tiny_llama()).eval(), tokenizer=tokenizer, device="cpu", quantization="int4",
              num_blocks=16)
    assert isinstance(llm.model.layers[0].attn.wqkv, QuantLinear) and llm.engine.model is llm.model
    assert isinstance(llm.model.head, QuantLinear)
    with pytest.raises(ValueError, match="int4"):
        LLM(Transformer(tiny_llama()), tokenizer=tokenizer, device="cpu", quantization="fp8")
