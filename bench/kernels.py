"""nanoseek's C++ kernels (model/kernels.py) against the torch paths they replace, in one run.

    nanoseek bench kernels [--rows 32] [--dtype bfloat16]

One decode step of `rows` sequences with SmolLM2-135M's shapes, 30 layers, each layer with its own
tensors so that they come from DRAM as in a real step. Reported: ms per step, best of 7.
- attention: 9 query heads on 3 kv heads of 64; keys and values laid out like the engine's decode
  mirror, (2 x 3, rows, capacity, 64), each row seeing a prefix of the capacity;
- int8 linears: the block's four (fused) projections, then the 49,152-token output head, as
  QuantLinear int8 layers with and without their oneDNN-prepacked weights.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def attention(args) -> dict:
    from nanoseek.model import kernels
    from nanoseek.model.attention import _attend_grouped
    torch.manual_seed(0)
    dtype, layers, H, Hkv, D, B, S = getattr(torch, args.dtype), 30, 9, 3, 64, args.rows, args.capacity
    kv = [torch.randn(2 * Hkv, B, S, D, dtype=dtype) for _ in range(layers)]
    q = [torch.randn(B, H, 1, D, dtype=dtype) for _ in range(layers)]
    visible = torch.randint(*args.visible, (B,))
    mask = (torch.arange(S).view(1, 1, S) < visible.view(B, 1, 1))                 # (B, T=1, S)

    def torch_path():
        return [_attend_grouped(q[i], kv[i][:Hkv], kv[i][Hkv:], mask, D ** -0.5) for i in range(layers)]

    def kernel():
        return [kernels.decode_attention(q[i], kv[i][:Hkv], kv[i][Hkv:], mask, D ** -0.5) for i in range(layers)]

    with torch.inference_mode():
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(torch_path(), kernel()))
        result = {"torch_ms": best_ms(torch_path), "kernel_ms": best_ms(kernel)}
    print(f"attention, {args.dtype}, {B} rows, {S} keys held, {visible.float().mean():.0f} visible on average: "
          f"torch path {result['torch_ms']:.2f} ms, kernel {result['kernel_ms']:.2f} ms "
          f"({result['torch_ms'] / result['kernel_ms']:.2f}x); largest difference {err:.1e}")
    return result


def int8_linears(args) -> dict:
    from nanoseek.model import kernels
    from nanoseek.model.quant import QuantLinear
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]       # wqkv, wo, gate_up, down
    layers = [[QuantLinear.from_weight(torch.randn(n, k) * 0.02, bits=8).to(dtype) for n, k in shapes]
              for _ in range(30)]
    head = QuantLinear.from_weight(torch.randn(49152, 576) * 0.02, bits=8).to(dtype)
    x = {k: torch.randn(args.rows, 1, k, dtype=dtype) for k in (576, 1536)}
    h = torch.randn(args.rows, 576, dtype=dtype)
    result, outputs = {}, {}
    with torch.inference_mode():
        for name in ("torch", "packed"):
            for layer in [*(lin for block in layers for lin in block), head]:
                layer.int8_handle = kernels.pack_int8(layer.qweight) if name == "packed" else None
            result[f"{name}_blocks_ms"] = best_ms(lambda: [lin(x[lin.in_features]) for block in layers for lin in block])
            result[f"{name}_head_ms"] = best_ms(lambda: head(h))
            outputs[name] = head(h)
    differ = int((outputs["torch"] != outputs["packed"]).sum())     # the two scales multiply in another order
    print(f"int8 linears, {args.dtype}, {args.rows} rows: 30 blocks' projections torch._int_mm "
          f"{result['torch_blocks_ms']:.2f} ms, prepacked {result['packed_blocks_ms']:.2f} ms; output head "
          f"{result['torch_head_ms']:.2f} against {result['packed_head_ms']:.2f} ms; {differ} of the head's "
          f"{outputs['torch'].numel()} outputs differ (rounding)")
    return result


def main(argv=None, prog: str = "python -m bench.kernels") -> dict:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--capacity", type=int, default=224, help="keys each row's entries hold")
    p.add_argument("--visible", type=int, nargs=2, default=(110, 208), help="range of keys a row sees")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    from nanoseek.model import kernels
    if not kernels.load():
        raise SystemExit(f"the C++ kernels are unavailable: {kernels._state.get('error')}")
    return {**attention(args), **int8_linears(args)}


if __name__ == "__main__":
    main()
