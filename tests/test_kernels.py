import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nanoseek.model import kernels

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def ops():
    assert kernels.load(), kernels._state.get("error")
    return torch.ops.nanoseek


@pytest.fixture(scope="module")
def generic_ops():
    """The same source built without its AVX-512 path, registered as torch.ops.nanoseek_generic."""
    torch.ops.load_library(str(kernels.build(("NANOSEEK_GENERIC", "NANOSEEK_OPS=nanoseek_generic"))))
    return torch.ops.nanoseek_generic


def reference(q, k, v, mask, scale):
    """float64 attention: q (B, H, Dk), k (Hkv, B, S, Dk), v (Hkv, B, S, Dv), mask (B, S) -> (B, H, Dv)."""
    G = q.shape[1] // k.shape[0]
    k, v = (t.double().repeat_interleave(G, 0).transpose(0, 1) for t in (k, v))       # (B, H, S, D)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k) * scale
    probs = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", probs, v)


def inputs(B, H, Hkv, S, Dk, Dv, dtype, capacity_pad=5):
    """Strided like a decode mirror's entries: k and v are slices of one (2*Hkv, B, capacity, D) buffer."""
    q = torch.randn(B, H, Dk, dtype=dtype)
    kv = torch.randn(2 * Hkv, B, S + capacity_pad, max(Dk, Dv), dtype=dtype)
    k, v = kv[:Hkv, :, :S, :Dk], kv[Hkv:, :, :S, :Dv]
    mask = torch.rand(B, S) < 0.7
    mask[0] = False                                # a row that sees no key gives zeros
    mask[-1, : S // 2] = True
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, Dk, Dv", [(9, 3, 64, 64), (8, 2, 32, 32), (7, 1, 48, 16), (4, 4, 80, 64),
                                            (6, 2, 20, 12)])
def test_decode_attention_matches_a_float64_reference(ops, generic_ops, dtype, H, Hkv, Dk, Dv):
    # G = 3, 4, 7 and 1 cover query heads padded to groups of four; head dims not a multiple of 16
    # (20, 12) take the plain C++ loops, the others the AVX-512 path where the CPU has it
    q, k, v, mask = inputs(5, H, Hkv, 37, Dk, Dv, dtype)
    q = torch.cat([q, q], -1)[..., :Dk]                      # strided like a fused projection's q
    ref = reference(q, k, v, mask, 0.3)
    tol = 5e-6 if dtype == torch.float32 else 2e-2
    for impl in (ops, generic_ops):
        out = impl.decode_attention(q, k, v, mask, 0.3)
        assert out.shape == (5, H, Dv) and out.dtype == dtype
        assert (out.double() - ref).abs().max() < tol
        assert out[0].abs().max() == 0


def test_decode_attention_rejects_mismatched_inputs_with_a_message(ops):
    q, k, v, mask = inputs(2, 6, 2, 9, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ops.decode_attention(q, k, v, mask[:, :5], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.decode_attention(q, k.double(), v, mask, 1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask, 1.0)


def test_model_attention_takes_the_kernel_for_decode_and_agrees_with_the_torch_path(ops, monkeypatch):
    from nanoseek.model.attention import _attend_cached, _attend_grouped
    q, k, v, mask = inputs(4, 9, 3, 30, 64, 64, torch.float32)
    q4 = q.unsqueeze(2)                                     # (B, H, T=1, D)
    calls, real = [], kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        out = _attend_cached(q4, k, v, mask.unsqueeze(1), 0.125)
        torch_path = _attend_grouped(q4, k, v, mask.unsqueeze(1), 0.125)
    assert calls == [1]
    assert (out[1:] - torch_path[1:]).abs().max() < 1e-5          # row 0 sees nothing: the torch path gives NaN
    qg = q4.requires_grad_()
    assert not kernels.decode_attention_applies(qg, k, v)         # autograd keeps the torch path
    assert not kernels.decode_attention_applies(q4.detach().expand(4, 9, 2, 64), k, v)   # two query tokens


def test_decode_attention_compiles_with_dynamic_shapes(ops):
    f = torch.compile(lambda q, k, v, m: kernels.decode_attention(q, k, v, m, 0.5) * 2, dynamic=True, fullgraph=True)
    for B, S in ((3, 17), (5, 40)):
        q, k, v, mask = inputs(B, 6, 2, S, 16, 16, torch.float32)
        mask[0, 0] = True
        out = f(q.unsqueeze(2), k, v, mask.unsqueeze(1))
        assert (out.squeeze(2).double() - 2 * reference(q, k, v, mask, 0.5)).abs().max() < 1e-5


def test_a_failed_build_says_why_and_load_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match=r"compiling nanoseek.s C\+\+ kernels failed"):
        kernels.build()
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.load() is False and "failed" in kernels._state["error"]
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("NANOSEEK_KERNELS", "0")
    assert kernels.load() is False and not kernels.loaded()


def test_the_first_build_says_so_and_a_cached_one_is_silent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    calls = []

    def compiler(command, **kwargs):           # in place of the minute-long compile: writes the library
        calls.append(command)
        Path(command[command.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(kernels.subprocess, "run", compiler)
    path = kernels.build()
    err = capsys.readouterr().err
    assert "building the C++ kernels" in err and str(tmp_path) in err and "built in" in err
    assert kernels.build() == path and len(calls) == 1
    assert capsys.readouterr().err == ""
