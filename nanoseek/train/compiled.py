"""torch.compile for training: each block's forward and backward compiled once per block type.

What is compiled is `Block.forward`, as the engine does (engine/compiled.py): every layer of a
kind (dense, MoE, the MTP block) runs one graph with its own weights as inputs, so a model of 8
layers traces two or three blocks, not eight. Inductor fuses what eager runs as one pass per op
(RMSNorm's float32 round trip, rotary's slices, SwiGLU's gate, the residual adds) and keeps fewer
activations for the backward. The routed experts' dispatch (MoE.routed) stays eager: how many rows
each expert gets is data, and a graph would be traced again for every new count.

Measured on an Intel Xeon (2 cores, bf16 autocast, 16 × 128 tokens; docs/benchmarks.md): a
small_deepseek_v3 step 1.29× faster, deepseek_v3_100m 1.2–1.4×, alternating with eager in one
process. The first steps pay the compile (tens of seconds on 2 cores), read back from the on-disk
cache by later runs. Below MIN_PARAMS (the tiny test presets) a step takes milliseconds and the
compile would never pay back, so `auto` leaves those eager.

A compile that fails leaves the run eager with one warning: the backward is compiled with the
forward (force_non_lazy_backward_lowering), so a failure surfaces inside the block call, where it
is caught, and not in loss.backward().
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

from ..engine.compiled import use_disk_cache
from ..model.transformer import Block

log = logging.getLogger("nanoseek.train")

COMPILES = ("auto", "on", "off")
MIN_PARAMS = 1_000_000         # auto: models below this train eager
RECOMPILE_LIMIT = 16           # block types (dense, MoE, MTP) × shapes (a short last batch, MTP's T - k)


def compile_choice(setting: str, model: nn.Module, device: torch.device) -> tuple[bool, str]:
    """(compile, why) for the `compile` setting: auto is on for models of ≥ MIN_PARAMS on the CPU
    (where it was measured), given a C++ compiler for inductor's kernels."""
    if setting not in COMPILES:
        raise ValueError(f"compile must be one of {', '.join(COMPILES)}, got {setting!r}")
    if setting != "auto":
        return setting == "on", "asked for"
    if device.type != "cpu":
        return False, f"measured only on the CPU, not on {device.type}"
    n = sum(p.numel() for p in model.parameters())
    if n < MIN_PARAMS:
        return False, f"{n / 1e6:.2f}M parameters: a step takes too little for the compile to pay back"
    if not (shutil.which("c++") or shutil.which("g++")):
        return False, "inductor needs a C++ compiler: none found"
    return True, f"{n / 1e6:.1f}M parameters on the CPU"


class TrainingBlock:
    """block(layer, x, rope, positions, cache, routing): Block.forward compiled for training, the
    seam Transformer.hidden_states and mtp_logits take; eager from the first failed compile on."""

    def __init__(self, backend="inductor"):
        use_disk_cache()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._functorch.config.force_non_lazy_backward_lowering = True
        self.fn = torch.compile(Block.forward, backend=backend, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self.fn is not None

    def __call__(self, layer, x, rope, positions, cache=None, routing=None):
        if self.fn is not None:
            seen = len(routing) if routing is not None else 0
            try:
                return self.fn(layer, x, rope, positions, cache, routing)
            except torch._dynamo.exc.TorchDynamoException as e:     # what the compiler raises
                log.warning("torch.compile failed, training runs eager from now on: %s: %s", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                self.fn = None
                if routing is not None:
                    del routing[seen:]      # the failed call may have reported its routing already
        return layer(x, rope, positions, cache, routing)
