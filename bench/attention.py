"""Decode attention: nanoseek's C++ kernel against its torch path, in one run (docs/benchmarks.md).

    nanoseek bench attention [--rows 32] [--dtype bfloat16]

SmolLM2-135M's shapes (9 query heads on 3 kv heads of 64, 30 layers) at one decode step of `rows`
sequences. Every layer has its own keys and values, laid out like the engine's decode mirror:
(2 x 3, rows, capacity, 64), each row seeing a prefix of the capacity. With 30 layers' worth the
entries come from DRAM, as in a real step. Reported: ms per step (all 30 layers), best of 7.
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


def main(argv=None, prog: str = "python -m bench.attention") -> dict:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--capacity", type=int, default=224, help="keys each row's entries hold")
    p.add_argument("--visible", type=int, nargs=2, default=(110, 208), help="range of keys a row sees")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    from nanoseek.model import kernels
    from nanoseek.model.attention import _attend_grouped
    if not kernels.load():
        raise SystemExit(f"the C++ kernels are unavailable: {kernels._state.get('error')}")
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
    print(f"{args.dtype}, {B} rows, {S} keys held, {visible.float().mean():.0f} visible on average, 30 layers: "
          f"torch path {result['torch_ms']:.2f} ms, kernel {result['kernel_ms']:.2f} ms "
          f"({result['torch_ms'] / result['kernel_ms']:.2f}x); largest difference {err:.1e}")
    return result


if __name__ == "__main__":
    main()
