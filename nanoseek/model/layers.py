"""Building blocks shared by every family: RMSNorm, rotary embeddings (plain, linear, Llama-3, YaRN)
and the SwiGLU MLP.

Rotary follows Hugging Face's semantics so that logits match transformers: YaRN's
`attention_factor` multiplies cos/sin (and thereby q·k of the rotated dims), while MLA's extra
softmax factor mscale(s, mscale_all_dim)² lives in attention.py. Angles are computed from explicit
positions on every call, so no position table hides in a buffer and any position can be served.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in float32 and cast back, as Llama and DeepSeek do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Also the expert type of DeepSeekMoE."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)   # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)   # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)   # up_proj
        self.w13 = None        # [w1; w3] in one module, set by model/quant.py's quantize_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(t) = 0.1·mscale·ln(s) + 1 (DeepSeek-V3 §4.3); 1 when there is no stretch."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim / 2,) and the cos/sin multiplier for cfg's rope scaling."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, factor, scaling), 1.0
    if kind == "yarn":
        return _yarn_frequencies(cfg, inv_freq, factor, scaling)
    raise ValueError(f"unsupported rope_type {kind!r} (nanoseek supports default, linear, llama3, yarn)")


def _llama3_frequencies(inv_freq: torch.Tensor, factor: float, s: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(cfg: ModelConfig, inv_freq: torch.Tensor, factor: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate slow dims by 1/factor, keep fast dims, ramp between."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    old_len = s.get("original_max_position_embeddings") or cfg.max_seq_len
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:   # dim index that completes `rotations` turns over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                      # 1: extrapolate (fast dims), 0: interpolate (slow dims)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def apply_keeping_dtypes(module: nn.Module, fn, recurse: bool, dtypes: dict[str, torch.dtype]) -> nn.Module:
    """nn.Module._apply for a module whose named tensors keep their dtype and values whatever fn
    casts to (model.to(bfloat16)): they only follow fn's device, learnt from an empty tensor, so a
    float32 value never passes through bfloat16 on its way back to float32."""
    kept = {name: getattr(module, name, None) for name in dtypes}
    nn.Module._apply(module, fn, recurse)
    for name, t in kept.items():
        if t is not None:
            setattr(module, name, t.to(device=fn(t.new_empty(0)).device, dtype=dtypes[name]))
    return module


class Rotary(nn.Module):
    """cos/sin for explicit positions. Non-persistent buffer: recomputed from the config, never saved."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # angles stay float32 whatever the model dtype (rounded through bf16, 0.3162 -> 0.3164 is
        # off by 0.4 rad at position 1,000)
        return apply_keeping_dtypes(self, fn, recurse, {"inv_freq": torch.float32})

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, rope_dim / 2): float32 angles, cast once to dtype
        (the activation dtype) so no layer casts them again."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D/2).

    interleave=True rotates pairs (x0, x1), (x2, x3), ... as DeepSeek's reference code does;
    False rotates (x_i, x_{i+D/2}) as Llama's `rotate_half`. Either way q and k share the layout,
    so q·k (all attention needs) is the same as Hugging Face's, which de-interleaves the output.
    """
    # angles are computed in float32; like transformers, the rotation itself runs in x's dtype
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
