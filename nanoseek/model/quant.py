"""Weight-only quantised linears for fast CPU decoding (inference only).

At batch 1 a decode step is memory-bound: every weight streams from DRAM once per token, so
fewer bytes per weight is the speed-up. PyTorch ships CPU kernels for two layouts:
- int4: `_weight_int4pack_mm_for_cpu`, asymmetric groups along K, w = (q - 8)·scale + zero,
  q in 0..15; here min/max per group of `group_size` (the Q4_1 scheme of GGUF: a Q4_1 checkpoint
  with groups of 32 requantises to the same integers, only the bf16 rounding of scale/zero differs);
- int8: `_weight_int8pack_mm`, symmetric per output row, w = q·scale, q in -127..127.
Both kernels want bf16 activations and bf16 scales (their float32 paths are ~10-30x slower than
bf16 dense), so float32 inputs are cast to bf16 for the kernel and back.

Large batches are cache-hot and compute-bound, where these kernels lose (int8 ~2x slower than a
bf16 matmul at 32 rows): above `keep_dense_above` rows the layer uses a dense copy of the
*dequantised* weight in the model's dtype, so both paths compute the same function up to
rounding. That copy costs the full dense size again (bf16: 2 bytes/param on top of 0.5 for int4,
1 for int8); `keep_dense_above=None` drops it and always runs the packed kernel.

`quantize_(model)` swaps the nn.Linear modules of the blocks (attention, MLPs, experts, shared
experts, MTP blocks) in place; the embedding, the output head and MoE gates stay as they are, and
so does MLA's `wkv_b`, whose weight `MLA.attend_absorbed` reads directly. There are no gradients
through the packed buffers: training needs the original model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA

KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)     # what _weight_int4pack_mm_for_cpu accepts


def quantize_int4(w: torch.Tensor, group_size: int = 32, scale_dtype=KERNEL_DTYPE):
    """Min/max asymmetric 4-bit groups along K: w (N, K) -> q (N, K) int32 in 0..15, scale, zero (N, K/g).

    Scale and zero are rounded to `scale_dtype` *before* q is chosen, so q is the best integer
    for the parameters the kernel will actually see.
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).to(scale_dtype)
    zero = (lo + 8 * scale.float()).to(scale_dtype)            # the kernel's zero sits at q = 8
    s, base = scale.float(), zero.float() - 8 * scale.float()  # base: the value of q = 0
    safe = torch.where(s > 0, s, torch.ones_like(s))           # constant group: scale 0, any q works
    q = ((g - base.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)
    return q.to(torch.int32).reshape(N, K), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 32):
    """The kernel's formula in float32: w = (q - 8)·scale + zero, per group along K."""
    N, K = q.shape
    g = (q.float() - 8).reshape(N, K // group_size, group_size)
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(N, K)


def quantize_int8(w: torch.Tensor, scale_dtype=KERNEL_DTYPE):
    """Symmetric per-row int8: w (N, K) -> q (N, K) int8, scale (N,) (rounded before q is chosen)."""
    scale = (w.float().abs().amax(dim=1) / 127).to(scale_dtype)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale.float()))
    q = (w.float() / safe.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed int4 groups or int8 rows; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 keep_dense_above: int | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.keep_dense_above = bits, group_size, keep_dense_above

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                    keep_dense_above: int | None = 8) -> QuantLinear:
        """Quantise `linear`; ValueError when its shape does not fit the kernel (keep it dense then)."""
        N, K = linear.weight.shape
        _check_shape(N, K, bits, group_size)
        layer = cls(K, N, bits, group_size, keep_dense_above)
        w = linear.weight.detach()
        if bits == 4:
            q, scale, zero = quantize_int4(w, group_size)
            # the CPU packing wants the (N, K) int32 values 0..15; inner_k_tiles is unused on CPU
            layer.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            layer.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous())
            dense = dequantize_int4(q, scale, zero, group_size)
        else:
            q, scale = quantize_int8(w)
            layer.register_buffer("qweight", q)
            layer.register_buffer("scales", scale)
            dense = q.float() * scale.float().unsqueeze(1)
        use_dense = keep_dense_above is not None
        layer.register_buffer("dense_weight", dense.to(w.dtype) if use_dense else None, persistent=False)
        layer.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        return layer

    def _apply(self, fn, recurse=True):
        # model.to(dtype) may move the dense copy and bias, but the kernel's scales stay bf16
        super()._apply(fn, recurse)
        for name in ("scales_and_zeros", "scales"):
            t = getattr(self, name, None)
            if t is not None and t.dtype != KERNEL_DTYPE:
                setattr(self, name, t.to(KERNEL_DTYPE))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense_weight is not None and x2.shape[0] > self.keep_dense_above:
            y = F.linear(x2, self.dense_weight.to(x.dtype), None)   # cache-hot batch: dense is faster
        else:
            xk = x2.to(KERNEL_DTYPE).contiguous()
            if self.bits == 4:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.qweight, self.group_size,
                                                              self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int8pack_mm(xk, self.qweight, self.scales)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, keep_dense_above={self.keep_dense_above}")


def _check_shape(N: int, K: int, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if K % group_size:
            raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}")
        if N % 16:   # the CPU int4 packing works on tiles of 16 output rows
            raise ValueError(f"int4 needs out_features divisible by 16, got {N}")


def quantize_(model: nn.Module, bits: int = 4, group_size: int = 32, keep_dense_above: int | None = 8) -> int:
    """Replace, in place, the nn.Linear modules inside `model.layers` and `model.mtp`; return how many.

    Layers the kernel cannot take (shape checks in `_check_shape`) stay dense, as do MLA's `wkv_b`
    (read as `.weight` by the absorbed decode path), the embedding, the output head and MoE gates.
    """
    replaced = 0
    roots = list(model.layers) + list(getattr(model, "mtp", []))
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear) or (isinstance(parent, MLA) and name == "wkv_b"):
                    continue
                try:
                    setattr(parent, name, QuantLinear.from_linear(child, bits, group_size, keep_dense_above))
                    replaced += 1
                except ValueError:
                    pass          # shape the kernel refuses: this layer keeps its dense weight
    return replaced
