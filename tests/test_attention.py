import pytest
import torch

from nanoseek.model import DenseCache, Transformer
from nanoseek.model.cache import cache_entry_shapes
from nanoseek.model.presets import deepseek_v3_671b, tiny_deepseek_v3


def _mla_inputs(attn, x, positions, model):
    cos, sin = model.rotary(positions)
    from nanoseek.model.layers import apply_rotary
    B, T, _ = x.shape
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, attn.n_heads, -1)
    q_nope, q_pe = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    q_pe = apply_rotary(q_pe, cos, sin, attn.interleave)
    kv, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin, attn.interleave).squeeze(2)
    return q_nope, q_pe, attn.kv_norm(kv), k_pe


def test_naive_and_absorbed_mla_agree():
    cfg = tiny_deepseek_v3()
    model = Transformer(cfg).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 11, cfg.dim)
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        q_nope, q_pe, kv, k_pe = _mla_inputs(attn, x, positions, model)
        naive = attn.attend_naive(q_nope, q_pe, kv, k_pe)
        absorbed = attn.attend_absorbed(q_nope, q_pe, torch.cat([kv, k_pe], -1), mask=None)
    assert naive.shape == absorbed.shape == (2, 11, cfg.n_heads, cfg.v_head_dim)
    assert (naive - absorbed).abs().max() < 1e-5


def test_cached_prefill_uses_absorbed_path_and_matches_training_forward():
    cfg = tiny_deepseek_v3(q_lora_rank=0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (3, 17))
    with torch.no_grad():
        full = model(ids)                                   # naive, no cache
        cached = model(ids, torch.arange(17).expand(3, 17), DenseCache(cfg, 3, 17))   # absorbed
    assert (full - cached).abs().max() < 1e-4


def test_mla_cache_holds_only_latent_and_rope_key():
    """kv_lora_rank + qk_rope_head_dim values per token per layer: 576 for DeepSeek-V3."""
    assert cache_entry_shapes(deepseek_v3_671b()) == [(576,)]
    cfg = tiny_deepseek_v3(n_mtp_layers=0)
    cache = DenseCache(cfg, 1, 8)
    assert cache.nbytes_per_token() == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_bfloat16_forward_close_to_float32():
    cfg = tiny_deepseek_v3()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids).softmax(-1)
        low = model.to(torch.bfloat16)(ids).float().softmax(-1)
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32    # the balancing bias stays float32
    assert (ref - low).abs().max() < 0.05


def test_grouped_attention_matches_sdpa_on_strided_inputs():
    import torch.nn.functional as F

    from nanoseek.model.attention import _attend_grouped
    B, T, S, H, Hkv, D = 3, 4, 9, 6, 2, 8
    q = torch.randn(B, T, H, D).transpose(1, 2)             # strided, as GQA.forward passes them
    # heads-major views of (B, S, Hkv, D) memory, as DenseCache returns them
    k, v = torch.randn(B, S, Hkv, D).permute(2, 0, 1, 3), torch.randn(B, S, Hkv, D).permute(2, 0, 1, 3)
    mask = torch.rand(B, T, S) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.unsqueeze(1),
                                          scale=0.3, enable_gqa=True)
    assert (_attend_grouped(q, k, v, mask, 0.3) - want).abs().max() < 1e-5
    low = _attend_grouped(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3).float()
    assert (low - want).abs().max() < 0.05


def test_grouped_attention_in_query_chunks_matches_sdpa(monkeypatch):
    import torch.nn.functional as F

    from nanoseek.model import attention
    B, T, S, H, Hkv, D = 2, 37, 48, 6, 2, 8
    monkeypatch.setattr(attention, "SCORES_BUDGET", 4 * B * H * S * 5)      # chunks of 5 queries
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k, v = torch.randn(Hkv, B, S, D), torch.randn(Hkv, B, S, D)           # heads-major, as the paged cache
    positions = torch.tensor([list(range(5, 5 + T)), list(range(T))])    # causal, row offsets differ
    mask = torch.arange(S).view(1, 1, S) <= positions.unsqueeze(-1)
    want = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.unsqueeze(1),
                                          scale=0.3, enable_gqa=True)
    assert (attention._attend_grouped(q, k, v, mask, 0.3) - want).abs().max() < 1e-5


def test_absorbed_mla_decode_takes_the_kernel_and_agrees_with_the_matmul_path(monkeypatch):
    from nanoseek.model import kernels
    if not kernels.load():
        pytest.skip(f"C++ kernels unavailable: {kernels._state.get('error')}")
    cfg = tiny_deepseek_v3()
    model = Transformer(cfg).eval()
    attn = model.layers[0].attn
    positions = torch.tensor([[4], [9], [0]])
    latent = torch.randn(3, 12, cfg.kv_lora_rank + cfg.qk_rope_head_dim)            # keys 10, 11: not written yet
    mask = torch.arange(12).view(1, 1, 12) <= positions.unsqueeze(-1)                 # (B, T=1, S)
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        q_nope, q_pe, _, _ = _mla_inputs(attn, torch.randn(3, 1, cfg.dim), positions, model)
        fast = attn.attend_absorbed(q_nope, q_pe, latent, mask)
        monkeypatch.setattr(kernels, "decode_attention_applies", lambda *a: False)
        slow = attn.attend_absorbed(q_nope, q_pe, latent, mask)
    assert calls == [1] and fast.shape == slow.shape == (3, 1, cfg.n_heads, cfg.v_head_dim)
    assert (fast - slow).abs().max() < 1e-5


def test_training_attention_with_unequal_head_sizes_matches_sdpa():
    """MLA's no-cache path on the CPU (Dv != Dqk) runs two matmuls instead of SDPA's math fallback:
    same output and same gradients, in float32 and bf16."""
    from nanoseek.model.attention import _attend
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k = torch.randn(2, 3, 9, 12, dtype=dtype), torch.randn(2, 3, 9, 12, dtype=dtype)
        v, grad = torch.randn(2, 3, 9, 8, dtype=dtype), torch.randn(2, 3, 9, 8, dtype=dtype)
        results = []
        for attend in (_attend, lambda q, k, v, s: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=s)):
            inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = attend(*inputs, 0.3)
            out.backward(grad)
            results.append([out.detach()] + [t.grad for t in inputs])
        for ours, theirs in zip(*results):
            assert (ours.float() - theirs.float()).abs().max() <= tol * max(1.0, theirs.float().abs().max().item())
