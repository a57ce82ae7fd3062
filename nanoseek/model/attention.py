"""Attention: grouped-query (Llama, Qwen2) and Multi-head Latent Attention (DeepSeek-V2/V3).

MLA (DeepSeek-V2 §2.1) has two paths that compute the same function:
- naive (training, no cache): K and V are materialised per head from the latent through wkv_b;
- absorbed (any forward with a cache): W^UK is folded into the query and W^UV into the output, so
  attention runs against the cached [kv_norm(c_kv); k_pe] alone — an MQA with a 576-dim key and a
  512-dim value for V3 (DeepSeek-V2 App. C; FlashMLA's layout).
Shapes: B batch, T query tokens, S visible keys, H heads, C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .layers import RMSNorm, apply_rotary, yarn_mscale

MATMUL_MAX_T = 128     # CPU: up to this many tokens, two matmuls beat torch's flash kernel (see _attend)


def _attend(q, k, v, scale):
    """Causal SDPA over the same T tokens: q (B, H, T, D), k / v (B, Hkv, T, D) (no cache).

    On the CPU, MLA's shapes (Dv != Dqk) always take two matmuls (_attend_causal_matmul); GQA's do
    too up to MATMUL_MAX_T tokens, its kv heads repeated: forward + backward of SmolLM2's shapes
    (9 heads, 3 kv heads, D 64, bf16) took 1.3 against 4.2 ms at 4 × 64 tokens and 6.2 against
    18.5 at 8 × 128; at 16 × 256 the flash kernel won (55 against 81 ms with a masked_fill form).
    """
    if q.device.type == "cpu" and q.shape[2] > 1:
        if q.shape[-1] != v.shape[-1] and k.shape[1] == q.shape[1]:
            return _attend_causal_matmul(q, k, v, scale)
        if q.shape[2] <= MATMUL_MAX_T:
            repeat = q.shape[1] // k.shape[1]
            return _attend_causal_matmul(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _attend_causal_matmul(q, k, v, scale):
    """Causal attention as two matmuls for MLA's training forward on the CPU: q, k (B, H, T, Dqk),
    v (B, H, T, Dv) with Dv != Dqk (V3: 192 vs 128).

    torch's CPU flash kernel needs Dv == Dqk, so SDPA would take its math fallback, which computes
    the same thing in the same dtype (scores in q's dtype, softmax accumulating in float32) but
    with extra passes over the (B, H, T, T) scores (mask building, fully-masked-row checks):
    forward + backward 95 -> 50 ms at B 16, H 6, T 128 in bf16 (small preset), the same memory.
    The causal mask is the additive input of one baddbmm (scores = bias + scale·q kᵀ, the scale
    applied in the matmul's accumulator), not a masked_fill and its copy of the scores: 12.3 ->
    9.8 ms forward + backward at that shape.
    """
    B, H, T, D = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)      # 0 on and below the diagonal
    scores = torch.baddbmm(future.expand(B * H, T, T), q.reshape(B * H, T, D),
                           k.reshape(B * H, T, D).transpose(1, 2), alpha=scale)         # (B*H, T, T)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, T, -1)).view(B, H, T, -1)  # (B, H, T, Dv)


def _attend_cached(q, k, v, mask, scale):
    """q (B, H, T, D) against cached k / v, heads-major (Hkv, B, S, D) as caches return them
    (model/cache.py), under mask (B, T, S) -> (B, H, T, D). Decode (T = 1) on CPU takes the C++
    kernel when it is loaded (model/kernels.py)."""
    if kernels.decode_attention_applies(q, k, v):
        return kernels.decode_attention(q, k, v, mask, scale)
    if q.device.type == "cpu":
        return _attend_grouped(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.unsqueeze(1),
                                          scale=scale, enable_gqa=k.shape[0] != q.shape[1])


SCORES_BUDGET = 16 * 2**20     # bytes of scores (counted as float32) one _attend_grouped call materialises at most


def _attend_grouped(q, k, v, mask, scale):
    """Masked attention as two batched matmuls over (kv head, row) pairs, each serving its G query heads.

    On CPU, torch's masked SDPA is about 6x slower in bf16 than this for decode-shaped inputs
    (T = 1, measured at B = 32, S = 150); the softmax accumulates in float32. Caches hand k / v
    over heads-major, (Hkv, B, S, D), so the (Hkv * B, S, D) view below copies nothing; compiled,
    inductor then passes the gathered memory straight to bmm (a (B, S, Hkv, D) layout transposed
    back made it copy k and v element by element: 0.7 s of a 2,900-token prefill). Long prefills
    run in query chunks whose scores fit SCORES_BUDGET, each against the keys up to the last one
    it may see (causal: later chunks see more): a 1,000-token prompt measured 31 ms per layer in
    one piece (its 37 MB of scores fault in fresh pages), 15 ms in chunks; torch's causal SDPA
    takes 12 ms but cannot serve rows of different lengths.
    q (B, H, T, D), k / v (Hkv, B, S, D), mask (B, T, S) -> (B, H, T, D).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[0], k.shape[2]
    # not when compiling (tested first: `T > chunk` would itself be a guard): the chunk count and
    # the keys each chunk sees would be guards, so new prompt lengths would recompile; the step's
    # token budget bounds the scores instead
    chunk = max(1, SCORES_BUDGET // (4 * B * H * S))
    if not torch.compiler.is_compiling() and T > chunk:
        outs = []
        for t in range(0, T, chunk):
            m = mask[:, t:t + chunk]
            seen = int(m.any(1).any(0).nonzero().max()) + 1 if m.any() else 1    # keys any query here sees
            outs.append(_attend_grouped(q[:, :, t:t + chunk], k[:, :, :seen], v[:, :, :seen], m[..., :seen], scale))
        return torch.cat(outs, dim=2)
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, D).transpose(0, 1).reshape(Hkv * B, G * T, D)      # heads h = kv * G + g
    kg, vg = k.reshape(Hkv * B, S, D), v.reshape(Hkv * B, S, D)
    # scores stay in q's dtype: the CPU softmax of bf16 accumulates in float32 (bitwise what upcasting
    # first gives), and skipping the float32 copy saves three passes over the scores. baddbmm, not
    # bmm: inductor's attention pattern matcher rewrites bmm-softmax-bmm into an SDPA call that
    # fails on these grouped shapes
    scores = torch.baddbmm(q.new_zeros(()), qg, kg.transpose(1, 2), beta=0, alpha=scale)   # (Hkv*B, G*T, S)
    scores.view(Hkv, B, G, T, S).add_(_bias(mask).to(scores.dtype).view(1, B, 1, T, S))
    o = torch.bmm(scores.softmax(-1), vg)                                           # (Hkv*B, G*T, D)
    # (B, T, H, D) memory, returned as the (B, H, T, D) view callers expect
    return o.view(Hkv, B, G, T, D).permute(1, 3, 0, 2, 4).reshape(B, T, H, D).transpose(1, 2)


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, T, S) -> float32 0 / -inf to add to scores: adding it broadcast over heads
    measured ~10x faster on CPU than a broadcast masked_fill_."""
    return torch.where(mask, 0.0, float("-inf"))


class GQA(nn.Module):
    """Grouped-query attention with RoPE on the whole head (Llama, Qwen2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.scale = cfg.head_dim ** -0.5
        self.wqkv = None        # [wq; wk; wv] in one module, set by model/quant.py's quantize_

    def forward(self, x, rope, positions, cache=None):
        B, T, _ = x.shape
        cos, sin = rope
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None:
            q = apply_rotary(self.wq(x).view(B, T, H, D), cos, sin, interleave=False)
            k = apply_rotary(self.wk(x).view(B, T, Hkv, D), cos, sin, interleave=False)
            v = self.wv(x).view(B, T, Hkv, D)
        else:   # fused projection: q and k rotate in one call
            qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)
            qk = apply_rotary(qkv[:, :, : H + Hkv], cos, sin, interleave=False)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        if cache is None:
            o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale)
        else:
            kv, mask = cache.update(positions, torch.cat([k, v], dim=2))   # (2*Hkv, B, S, D)
            # attention runs in the cache's dtype (the engine's decode mirror may keep float32 for a lone row)
            o = _attend_cached(q.transpose(1, 2).to(kv.dtype), kv[:Hkv], kv[Hkv:], mask, self.scale).to(x.dtype)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE (DeepSeek-V2 §2.1.3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        qk_head_dim = cfg.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        else:   # query compression only saves training activations (V2 §2.1.2)
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, cfg.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, cfg.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_head_dim, cfg.dim, bias=False)
        # 1/sqrt(192) for V3, times YaRN's mscale² since sqrt(t) applies to both q and k (V3 §4.3)
        self.scale = qk_head_dim ** -0.5
        rs = cfg.rope_scaling or {}
        if rs.get("rope_type") == "yarn" and rs.get("mscale_all_dim"):
            self.scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2

    def forward(self, x, rope, positions, cache=None):
        B, T, _ = x.shape
        cos, sin = rope
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin, self.interleave)                       # (B, T, H, R)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)                                                      # (B, T, C)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)  # (B, T, R), shared by heads
        if cache is None:
            o = self.attend_naive(q_nope, q_pe, kv, k_pe)
        else:
            latent, mask = cache.update(positions, torch.cat([kv, k_pe], dim=-1))   # (1, B, S, C + R)
            o = self.attend_absorbed(q_nope, q_pe, latent[0], mask)
        return self.wo(o.reshape(B, T, -1))

    def attend_naive(self, q_nope, q_pe, kv, k_pe):
        """Causal attention over the same tokens with per-head K (B, S, H, 192) and V (B, S, H, 128)
        materialised; returns (B, T, H, v_head_dim)."""
        B, S, _ = kv.shape
        k_nope, v = self.wkv_b(kv).view(B, S, self.n_heads, -1).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale).transpose(1, 2)

    def attend_absorbed(self, q_nope, q_pe, latent, mask):
        """Attend against latent (B, S, C + R) with W^UK / W^UV absorbed; returns (B, T, H, v_head_dim)."""
        B, T, H, _ = q_nope.shape
        C = self.kv_lora_rank
        w = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, C)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]   # (H, dn, C), (H, dv, C)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                       # (B, T, H, C)
        q_all = torch.cat([q_lat, q_pe], dim=-1).reshape(B, T * H, C + self.qk_rope_head_dim).to(latent.dtype)
        if T == 1 and mask is not None and kernels.decode_attention_applies(q_all.unsqueeze(2), latent, latent):
            # decode: an MQA whose one kv head is the latent (model/kernels.py)
            o_lat = kernels.decode_attention(q_all.unsqueeze(2), latent.unsqueeze(0), latent[..., :C].unsqueeze(0),
                                             mask, self.scale)                                # (B, H, 1, C)
            return torch.einsum("bthc,hdc->bthd", o_lat.transpose(1, 2).to(q_nope.dtype), w_uv)
        scores = torch.bmm(q_all, latent.transpose(1, 2)).float() * self.scale     # (B, T*H, S)
        if mask is None:   # plain causal self-attention over the same T tokens
            mask = torch.ones(T, latent.shape[1], dtype=torch.bool, device=latent.device).tril().unsqueeze(0)
        scores = scores.view(B, T, H, -1).add_(_bias(mask).unsqueeze(2)).view(B, T * H, -1)
        probs = scores.softmax(dim=-1).to(latent.dtype)
        o_lat = torch.bmm(probs, latent[..., :C]).view(B, T, H, C).to(q_nope.dtype)  # weighted latents
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)                          # (B, T, H, dv)
