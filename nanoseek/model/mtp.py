"""Multi-token prediction module (DeepSeek-V3 §2.2): one extra depth predicts token i+k+1.

Module k combines, for each position i, the previous depth's hidden state h^{k-1}_i with the
embedding of token i+k:  h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), runs one full
transformer block (its own attention cache layer: n_layers + k - 1), and predicts through the
shared output head after its own final norm (`shared_head.norm`). The embedding comes first in the
concatenation and h^0 is the main model's *normed* final hidden state: that is how DeepSeek's
released MTP weights are used by vLLM and SGLang (the paper's equation lists h first).
The embedding and output head are the main model's (shared parameters, as DualPipe places them).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)          # shared_head.norm

    def forward(self, prev_hidden, next_embeds, rope, positions, cache=None, routing=None, block=None):
        """prev_hidden (B, T, D) normed h^{k-1}_i, next_embeds (B, T, D) Emb(t_{i+k}) -> normed h^k_i.
        `block`, if given, runs the block as block(self.block, x, ...) (Transformer.hidden_states' seam)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(prev_hidden)], dim=-1))
        h = self.block(x, rope, positions, cache, routing) if block is None else \
            block(self.block, x, rope, positions, cache, routing)
        return self.norm(h)
