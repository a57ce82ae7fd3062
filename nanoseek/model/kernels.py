"""C++ kernels for the CPU, compiled on first use and loaded as torch ops (`torch.ops.nanoseek.*`).

- decode attention (csrc/decode_attention.cpp). At 32 concurrent decodes of SmolLM2-135M it
  replaces two batched matmuls and a softmax that read the cached keys and values at ~2.5x the
  time DRAM needs for them: bf16 bmm with 3 query rows per kv head (GQA) is dominated by
  per-matrix overhead, and every row attends to the decode batch's full capacity. The kernel
  reads each visible key and value once for all the query heads that share it, skips masked
  keys, and keeps the softmax in float32 registers: 30 layers went from 14.4 to 8.1 ms a step
  (B = 32, ~165 of 224 keys visible; `nanoseek bench kernels`, docs/benchmarks.md).
- int8 linear on prepacked weights (csrc/int8_linear.cpp): the W8A8 matmul of model/quant.py,
  the same integers, through oneDNN's u8 x s8 kernel on a weight reordered once into oneDNN's
  blocked layout (`pack_int8`) instead of torch._int_mm on the plain (N, K) weight. Used for
  decode rows up to quant.PACKED_ROWS, where it measured ~16% faster.
- int4 quantise-and-pack (csrc/int4_pack.cpp): a float weight to the int4 kernel's packed groups
  in one pass, into existing buffers, for a GRPO rollout copy requantised after every update.
- sampling (csrc/sampling.cpp): temperature / top-k / top-p / min-p and the draw for a batch of
  rows without sorting the vocabulary, the engine's `sample` on the CPU (engine/sampling.py).

Built with the C++ compiler torch.compile already needs (`c++`, or $CXX), against torch's headers,
into ~/.cache/nanoseek/kernels (or $NANOSEEK_CACHE/kernels) under a hash of the sources, torch's
version and the CPU's flags; about a minute the first time, announced on stderr. Without a
compiler, or with NANOSEEK_KERNELS=0, `load` returns False and the model keeps its torch paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_state: dict[str, bool | str] = {}      # "loaded": bool, "error": why not, "no_int8_pack": why not


def cache_dir() -> Path:
    root = os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek"
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def compile_flags(defines: tuple[str, ...] = ()) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-D{d}" for d in defines)]
            + [f"-I{p}" for p in include_paths()] + [f"-L{p}" for p in library_paths()] + ["-ltorch_cpu", "-lc10"])


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile SOURCES into one library (once per source, torch version, CPU and defines) -> its path.
    Raises RuntimeError with the compiler's message when it fails."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = compile_flags(defines)
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\n".join([*texts, torch.__version__, _cpu_flags(), compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"nanoseek_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The first build takes a minute or so: say so, instead of a silent wait inside the first LLM(...)
    print(f"nanoseek: building the C++ kernels for this CPU and torch {torch.__version__} (once; cached in "
          f"{target.parent}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:      # concurrent builds each rename whole
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *map(str, SOURCES), "-o", str(out), *flags], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling nanoseek's C++ kernels failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    print(f"nanoseek: C++ kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return target


def load() -> bool:
    """Build and load the kernels once per process; True when torch.ops.nanoseek is usable."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    _state["loaded"] = False
    if os.environ.get("NANOSEEK_KERNELS", "1") == "0":
        _state["error"] = "disabled by NANOSEEK_KERNELS=0"
        return False
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as e:
        _state["error"] = str(e)
        log.warning("nanoseek C++ kernels unavailable, the model keeps its torch paths: %s", e)
        return False

    @torch.library.register_fake("nanoseek::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[3])

    @torch.library.register_fake("nanoseek::int8_linear")
    def _(x, handle, w_scale):
        return x.new_empty(x.shape[0], w_scale.shape[0])

    _state["loaded"] = True
    return True


def loaded() -> bool:
    return bool(_state.get("loaded"))


def decode_attention(q, k, v, mask, scale: float):
    """q (B, H, 1, Dk) against k (Hkv, B, S, Dk), v (Hkv, B, S, Dv) under mask (B, 1, S) -> (B, H, 1, Dv)."""
    return torch.ops.nanoseek.decode_attention(q.squeeze(2), k, v, mask.squeeze(1), scale).unsqueeze(2)


def pack_int8(weight: torch.Tensor) -> torch.Tensor | None:
    """Reorder an int8 (N, K) weight into oneDNN's layout once; the handle `int8_linear` takes, or
    None where the kernels or oneDNN's int8 matmul are unavailable. The handle is a 0-dim int64
    tensor, not an int: a compiled layer takes it as an input, where an int would be a constant
    of the graph, a different one per layer (engine.py compiles one graph for every layer)."""
    if not loaded() or "no_int8_pack" in _state:
        return None
    try:
        return torch.tensor(torch.ops.nanoseek.int8_pack(weight))
    except RuntimeError as e:          # a torch build without oneDNN's quantized ops: say so once
        _state["no_int8_pack"] = str(e)
        log.warning("oneDNN int8 packing unavailable, int8 linears keep torch._int_mm: %s", e)
        return None


def repack_int8(handle: torch.Tensor, weight: torch.Tensor) -> None:
    """Put a new int8 (N, K) weight of the same layer in `handle`'s slot (a requantised rollout copy)."""
    torch.ops.nanoseek.int8_repack(int(handle), weight)


def free_int8(handle: torch.Tensor) -> None:
    """Drop `handle`'s packed weight (its memory); int8_linear refuses it until repack_int8."""
    torch.ops.nanoseek.int8_free(int(handle))


def decode_attention_applies(q, k, v) -> bool:
    """Whether the kernel serves this call: loaded, CPU, one query token, float32 / bfloat16, no autograd."""
    return (loaded() and q.device.type == "cpu" and q.shape[2] == 1 and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))
