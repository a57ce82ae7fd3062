"""Quantised linears for fast CPU inference (no gradients: training needs the original model).

At batch 1 a decode step is memory-bound: every weight streams from DRAM once per token, so
fewer bytes per weight is the speed-up. Two schemes, each on a CPU kernel PyTorch ships:
- int4, weight-only: `_weight_int4pack_mm_for_cpu`, asymmetric groups along K,
  w = (q - 8)·scale + zero, q in 0..15; min/max per group of `group_size` (GGUF's Q4_1 scheme: a
  Q4_1 checkpoint with groups of 32 requantises to the same integers, only the bf16 rounding of
  scale/zero differs). The kernel wants bf16 activations; it wins at a few rows and loses at
  many (414 µs at 32 rows against 142 for int8 below), so above `int8_above` rows the layer
  runs the int8 scheme on an int8 copy of the *dequantised* weight (1 more byte per parameter).
- int8, weights and activations (W8A8, "dynamic" quantisation): symmetric per output row for
  the weight, per token (row of x) for the activation, an exact int32 `torch._int_mm` (VNNI),
  then both scales. Measured on a 1536x576 layer with DRAM-streamed weights: 53 / 142 / 712 µs
  at 1 / 32 / 256 rows, against 253 / 276 / 1174 µs in bf16. Per-token scales and integer
  accumulation make a row's result independent of the other rows in the batch. On CPU the engine
  also reorders each int8 weight once for oneDNN (model/kernels.py): decode rows, up to
  PACKED_ROWS of them, multiply the same integers through it (the two scales apply in another
  order: a few bf16 results in a million differ from _int_mm's, by one bf16 step).

`quantize_(model)` swaps the nn.Linear modules of the blocks (attention, MLPs, experts, shared
experts, MTP blocks) in place, fusing projections that read the same input (GQA's q/k/v, the
MLPs' gate/up) into one kernel call; optionally the output head too. The embedding and MoE
gates stay as they are, and so does MLA's `wkv_b`, whose weight `MLA.attend_absorbed` reads.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .attention import GQA, MLA
from .layers import MLP, apply_keeping_dtypes

KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)     # what _weight_int4pack_mm_for_cpu accepts
FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}   # the projections quantize_ fuses, and their parts


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


def quantize_rows_int8(x: torch.Tensor):
    """Per-row symmetric int8 (weight rows, or activation tokens): x (M, K) -> q (M, K) int8 in
    -127..127, scale (M, 1) float32 with x ≈ q·scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)
    # |x·127/amax| <= 127 up to float32 rounding, which round() cannot push past 127
    return (xf * (127 / amax)).round_().to(torch.int8), amax / 127


# rows up to which the prepacked oneDNN int8 matmul beats torch._int_mm on the same integers: with
# weights from DRAM, 30 SmolLM2 layers took 8.8 / 14.8 ms against 10.3 / 17.6 at 9 / 32 rows, but
# 279 against 265 ms at 1,024 (AMD Zen 4, docs/benchmarks.md)
PACKED_ROWS = 64
# On a CPU with AMX tiles oneDNN's prepacked kernel wins at every size: SmolLM2's fused gate/up
# (3072 x 576) at 1,024 rows took 1.71 ms against 3.0 for torch._int_mm alone, and a 32-prompt
# prefill went 1.03 -> 0.73 s (Intel Xeon, docs/benchmarks.md), so prefill rows take it there too
PACKED_PREFILL = torch.cpu._is_amx_tile_supported()


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed int4 groups or int8 rows; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 int8_above: int | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.int8_above = bits, group_size, int8_above
        # qweight reordered for oneDNN (kernels.pack_int8), set by the engine: its handle as a 0-dim int64
        # tensor, which a compiled layer takes as an input (an int would be a constant of each layer's graph)
        self.int8_handle: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                    int8_above: int | None = 8) -> QuantLinear:
        """Quantise `linear`; ValueError when its shape does not fit the kernel (keep it dense then).
        `int8_above` (int4 only): above this many rows use an int8 copy; None: no copy."""
        return cls.from_weight(linear.weight, linear.bias, bits, group_size, int8_above)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4, group_size: int = 32,
                    int8_above: int | None = 8) -> QuantLinear:
        N, K = w.shape
        _check_shape(N, K, bits, group_size)
        layer = cls(K, N, bits, group_size, int8_above if bits == 4 else None)
        w = w.detach()
        int8 = w
        if bits == 4:
            q, scale, zero = quantize_int4(w, group_size)
            # the CPU packing wants the (N, K) int32 values 0..15; inner_k_tiles is unused on CPU
            layer.register_buffer("qweight4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            layer.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous())
            int8 = None if int8_above is None else dequantize_int4(q, scale, zero, group_size)
        q8, scale8 = quantize_rows_int8(int8) if int8 is not None else (None, None)
        layer.register_buffer("qweight", q8)
        layer.register_buffer("scales", None if scale8 is None else scale8.view(-1))    # (N,)
        layer.register_buffer("bias", None if bias is None else bias.detach().clone())
        return layer

    def _apply(self, fn, recurse=True):
        # model.to(dtype) may move the bias, but the kernels' scales keep their dtype and values
        return apply_keeping_dtypes(self, fn, recurse, {"scales_and_zeros": KERNEL_DTYPE, "scales": torch.float32})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.bits == 4 and (self.qweight is None or x2.shape[0] <= self.int8_above):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE).contiguous(), self.qweight4,
                                                          self.group_size, self.scales_and_zeros).to(x.dtype)
        elif self.int8_handle is not None and (PACKED_PREFILL or (x.dim() == 2 or x.shape[-2] == 1)
                                               and x2.shape[0] <= PACKED_ROWS):
            # decode rows (one token each; any rows with AMX), the same integers as below through prepacked weights
            y = torch.ops.nanoseek.int8_linear(x2, self.int8_handle, self.scales)
        else:
            xq, x_scale = quantize_rows_int8(x2)
            # convert once, then same-dtype in-place scaling: int32 x float32 broadcasting takes
            # TensorIterator's unvectorised mixed-dtype path, 16x slower at 1024 rows
            y = torch._int_mm(xq, self.qweight.t()).float().mul_(x_scale).mul_(self.scales).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, int8_above={self.int8_above}")


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


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing the concatenation of the outputs of `linears` (same input)."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight.data.copy_(weight)
    if fused.bias is not None:
        fused.bias.data.copy_(torch.cat(biases))
    return fused


def _quantize_one(module: nn.Module, bits, group_size, int8_above) -> nn.Module:
    """QuantLinear of module's weight (and bias), or module itself when the kernel refuses the shape."""
    try:
        return QuantLinear.from_weight(module.weight, getattr(module, "bias", None), bits, group_size, int8_above)
    except ValueError:
        return module


def quantize_(model: nn.Module, bits: int = 4, group_size: int = 32, int8_above: int | None = 8,
              head: bool = False) -> int:
    """Quantise, in place, the nn.Linear modules inside `model.layers` and `model.mtp`; return how many
    QuantLinear modules the model has afterwards.

    GQA's wq/wk/wv become one `wqkv` and each MLP's w1/w3 one `w13` first (model code uses the
    fused module when it is set): one activation quantisation and one kernel call instead of
    three. Layers the kernel cannot take (shape checks in `_check_shape`) stay dense, as do MLA's
    `wkv_b`, the embedding and MoE gates; `head=True` also quantises the output head (the tied
    embedding's copy when there is no separate head: lookups keep the dense table).
    """
    roots = list(model.layers) + list(getattr(model, "mtp", []))
    for root in roots:
        for module in list(root.modules()):
            if isinstance(module, GQA) and module.wqkv is None:
                module.wqkv = _fuse([module.wq, module.wk, module.wv])
                del module.wq, module.wk, module.wv
            elif isinstance(module, MLP) and module.w13 is None:
                module.w13 = _fuse([module.w1, module.w3])
                del module.w1, module.w3
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and not (isinstance(parent, MLA) and name == "wkv_b"):
                    setattr(parent, name, _quantize_one(child, bits, group_size, int8_above))
    if head:
        quantized = _quantize_one(model.head if model.head is not None else model.embed, bits, group_size, int8_above)
        if isinstance(quantized, QuantLinear):     # else a vocabulary the kernel refuses: the head stays dense
            model.head = quantized
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def pack_int8_(model: nn.Module) -> int:
    """Give every QuantLinear with int8 weights a oneDNN-prepacked copy (model/kernels.py), which
    its forward uses for decode rows; returns how many were packed. Needs the kernels loaded."""
    from . import kernels
    packed = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.qweight is not None and module.int8_handle is None:
            module.int8_handle = kernels.pack_int8(module.qweight)
            packed += module.int8_handle is not None
    return packed


def _source_linear(source: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) in `source` (the unquantised model) that QuantLinear `name` of its
    quantize_ copy was made from: a fused projection concatenates its parts', as _fuse did."""
    if name == "head":
        lin = source.head if source.head is not None else source.embed
        return lin.weight, getattr(lin, "bias", None)
    parent_name, _, attr = name.rpartition(".")
    parent = source.get_submodule(parent_name)
    linears = [getattr(parent, a) for a in FUSED.get(attr, (attr,))]
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return torch.cat([lin.weight for lin in linears]), bias


INT4_PACK_ROWS = 64     # int4_quantize_pack_ packs whole blocks of this many output rows


@functools.cache
def _fast_int4_pack() -> bool:
    """Whether the C++ kernels' int4_quantize_pack_ (csrc/int4_pack.cpp) may requantise int4 layers:
    loaded, and packing as this torch build does (AVX512 builds pack rows in blocks of 64, AVX2
    ones in blocks of 32), checked once on a random weight against the torch path."""
    from . import kernels
    if not kernels.load():
        return False
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    q, scale, zero = quantize_int4(w, 32)
    packed, sz = torch.empty(128, 32, dtype=torch.uint8), torch.empty(2, 128, 2, dtype=KERNEL_DTYPE)
    torch.ops.nanoseek.int4_quantize_pack_(w, 32, packed, sz)
    return (torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            and torch.equal(sz, torch.stack([scale.t(), zero.t()], dim=-1)))


def _requantize_int4_(module: QuantLinear, weight: torch.Tensor) -> None:
    """New int4 integers, scales and zeros of `weight` in `module`'s buffers, as from_weight would give."""
    for buffer in (module.qweight4, module.scales_and_zeros):
        _unpark(buffer)
    if module.qweight is None and module.out_features % INT4_PACK_ROWS == 0 and _fast_int4_pack():
        torch.ops.nanoseek.int4_quantize_pack_(weight, module.group_size, module.qweight4, module.scales_and_zeros)
        return
    fresh = QuantLinear.from_weight(weight, None, 4, module.group_size, module.int8_above)
    module.qweight4.copy_(fresh.qweight4)
    module.scales_and_zeros.copy_(fresh.scales_and_zeros)
    if module.qweight is not None:         # its int8 copy, for batches above int8_above rows
        module.qweight, module.scales = fresh.qweight, fresh.scales
        if module.int8_handle is not None:
            from . import kernels
            kernels.repack_int8(module.int8_handle, module.qweight)


@torch.no_grad()
def refresh_copy_(quantized: nn.Module, source: nn.Module) -> int:
    """Bring `quantized` (a copy of `source`, maybe through quantize_, maybe in another dtype) back
    to `source`'s current weights, in place: int8 and int4 layers requantised (prepacked oneDNN
    handles included) to exactly the integers quantize_ would give, every other weight (norms,
    embedding, gate biases, a plain copy's linears) copied, parked ones re-allocated. For a
    rollout copy of a model being trained. Returns the layers requantised."""
    from . import kernels
    n = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        weight, bias = _source_linear(source, name)
        if module.bits == 4:
            _requantize_int4_(module, weight)
        else:
            module.qweight, scales = quantize_rows_int8(weight)
            module.scales = scales.view(-1)
            if module.int8_handle is not None:
                kernels.repack_int8(module.int8_handle, module.qweight)
        if bias is not None:
            module.bias = bias.detach().to(module.bias.dtype)
        n += 1
    quantized_names = {name for name, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    originals = dict(source.named_parameters()) | dict(source.named_buffers())
    for name, tensor in [*quantized.named_parameters(), *quantized.named_buffers()]:
        module_name, _, kind = name.rpartition(".")
        if module_name in quantized_names:
            continue
        if name in originals:
            value = originals[name]
        elif module_name.rpartition(".")[2] in FUSED:       # fused, left dense (the kernel refused its shape)
            value = _source_linear(source, module_name)[0 if kind == "weight" else 1]
        else:
            continue
        _unpark(tensor)
        tensor.copy_(value)
    return n


def _unpark(tensor: torch.Tensor) -> None:
    """Give a tensor park_copy_ freed its memory back (the tensor stays the same object)."""
    storage = tensor.untyped_storage()
    if storage.size() == 0 and tensor.numel():
        storage.resize_(tensor.numel() * tensor.element_size())


@torch.no_grad()
def park_copy_(quantized: nn.Module) -> None:
    """Free the weights of a refresh_copy_-able copy until its next refresh_copy_: int8 integers and
    their packed handles, and the storage of the int4 buffers and dense parameters. Those stay the
    same tensors (storage resized to nothing, as FSDP frees a shard), so the parameters' version
    counters keep counting up and an engine that watches them sees the refresh."""
    from . import kernels
    int4 = []
    for module in quantized.modules():
        if isinstance(module, QuantLinear) and module.bits == 4:
            int4 += [module.qweight4, module.scales_and_zeros]
        if isinstance(module, QuantLinear) and module.qweight is not None:
            module.qweight = torch.empty(0, dtype=torch.int8)
            if module.int8_handle is not None:
                kernels.free_int8(module.int8_handle)
    for t in [*quantized.parameters(), *int4]:
        if t.is_contiguous() and t.storage_offset() == 0:
            t.untyped_storage().resize_(0)
