"""torch.compile for the engine: one compiled block for every layer, its artifacts cached on disk.

Compiling the whole forward traced all 30 of SmolLM2's layers once per shape class (five
classes, see Engine._run): a first start took over ten minutes on 2 CPU cores, and a second one
still minutes, because dynamo and AOTAutograd trace again in every process. Here `Block.forward`
is what gets compiled, once per shape class: every layer runs the same graph with its own
weights as inputs (dynamo inlines nn.Modules and lifts their parameters; the model gives each
block its own cache layer and int8 handles are tensors, so no layer number becomes a constant).
Tracing one block instead of thirty is what makes starting cheap; inductor's compiled code and
AOTAutograd's graphs go to an on-disk cache (~/.cache/nanoseek/inductor, or
$TORCHINDUCTOR_CACHE_DIR), keyed by torch's version, the traced graph and inductor's settings,
so a torch or model-code change recompiles and anything else is read back.

A compile that fails, at start or later on a new shape, leaves the engine eager with one warning.
"""

from __future__ import annotations

import os

import torch
import torch.fx.experimental._config as fx_config

from ..model import kernels
from ..model.transformer import Block

# shape classes a block is compiled for (Engine.warmup), times block types (dense and MoE layers)
RECOMPILE_LIMIT = 16


def use_disk_cache() -> None:
    """Point inductor's and AOTAutograd's caches at ~/.cache/nanoseek/inductor (or the folder the
    user chose in $TORCHINDUCTOR_CACHE_DIR), and keep float attributes constant: the setup every
    nanoseek compile (the engine's, training's: train/compiled.py) shares."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    # torch writes its default (a folder in /tmp) into the environment the first time it reads it,
    # e.g. when an earlier import touched inductor: that one is replaced, a folder the user chose is kept
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(kernels.cache_dir().parent / "inductor")
    # float attributes (attention scale, norm eps) as constants from the start: left symbolic, dynamo
    # traced two of the five frames twice, restarting once it found it had to specialise them
    torch._dynamo.config.specialize_float = True


def compiled_block():
    """Block.forward compiled with dynamic shapes: call it as block(layer, x, rope, positions, cache, routing)."""
    use_disk_cache()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # no duck sizing: dynamo would give equal sizes one symbol, and a paged forward's 32 keys traced
    # beside rotary's 32 frequencies became the constant 32 (every other key count recompiled)
    fx_config.use_duck_shape = False
    # size_asserts off: the generated wrapper otherwise re-checks every input's sizes and strides
    # (dynamo's guards already did) and every extern kernel's output, ~660 Python calls a decode
    # step, 0.8 of 2.4 ms of the wrapper's time per SmolLM2 token
    return torch.compile(Block.forward, dynamic=True, options={"size_asserts": False})


def cache_counters() -> dict[str, int]:
    """How often this process's compiles were served from the on-disk caches, and missed them."""
    from torch._dynamo.utils import counters
    names = ("fxgraph_cache_hit", "fxgraph_cache_miss")
    inductor = {k: int(counters["inductor"][k]) for k in names}
    aot = {f"autograd_cache_{k}": int(counters["aot_autograd"][f"autograd_cache_{k}"]) for k in ("hit", "miss")}
    return inductor | aot
