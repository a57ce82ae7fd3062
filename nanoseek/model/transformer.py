"""The one Transformer: DeepSeek-V3/V2 (MLA + DeepSeekMoE + MTP) and dense Llama / Qwen2.

Training, rollouts, eval and serving all run this class. Inference differs only through the
explicit `cache` argument (see model/cache.py); positions are explicit so a cached forward can
place new tokens anywhere. Run a tiny one:

    cfg = ModelConfig(model_type="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, inter_dim=128)
    logits = Transformer(cfg)(torch.tensor([[1, 2, 3]]))      # (1, 3, 256)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import GQA, MLA
from .config import ModelConfig
from .layers import MLP, RMSNorm, Rotary
from .moe import Gate, MoE
from .mtp import MTPModule


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.is_mla else GQA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, rope, positions, cache=None, routing=None):
        x = x + self.attn(self.attn_norm(x), rope, positions, cache)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, routing) if isinstance(self.ffn, MoE) else self.ffn(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_word_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        # MTP blocks are MoE when the main model is (V3's layer 61 is a full MoE layer)
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.is_moe))
                                 for k in range(cfg.n_mtp_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, zero biases, unit norms (V3 used std 0.006)."""
        if self.embed.weight.is_meta:   # shapes only (loading, parameter counts): nothing to fill
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Gate):     # a bare Parameter, not an nn.Linear
                nn.init.normal_(module.weight, std=self.cfg.init_std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                routing: list | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). `routing`, if a list, collects each MoE layer's Routing."""
        return self.logits(self.hidden_states(input_ids, positions, cache, routing))

    def hidden_states(self, input_ids, positions=None, cache=None, routing=None, block=None) -> torch.Tensor:
        """Final hidden states (B, T, D) after the last block, before the final norm.

        Each block gets its own layer of the cache (`cache.layer(i)`), so a block's code is the same
        for every layer: `block`, if given, runs each one as block(layer, x, rope, positions,
        layer_cache, routing) in place of Block.forward (the engine's compiled form of it, one graph
        that serves all layers)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i)
            x = layer(x, rope, positions, layer_cache, routing) if block is None else \
                block(layer, x, rope, positions, layer_cache, routing)
        return x

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ids (B, T) -> (B, T, D). With a tied head its gradient is sparse: the
        head's dense (V, D) gradient takes its T rows in place, where a dense one would be a zeroed
        (V, D) tensor plus a second (V, D) sum (SmolLM2: 113 MB each, ~0.35 s of a GRPO update on
        ~100 tokens). Untied, the gradient stays dense, as AdamW wants it."""
        sparse = self.head is None and torch.is_grad_enabled() and self.embed.weight.requires_grad
        return F.embedding(ids, self.embed.weight, sparse=sparse)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden)
        return h @ self.embed.weight.t() if self.head is None else self.head(h)

    def output_head(self, normed: torch.Tensor) -> torch.Tensor:
        """The shared output projection on already-normed states (what MTP modules share)."""
        return normed @ self.embed.weight.t() if self.head is None else self.head(normed)

    def mtp_forward(self, depth: int, prev_hidden, next_ids, positions, cache=None, routing=None, block=None):
        """One MTP depth (1-based): prev_hidden (B, T, D) normed h^{k-1}, next_ids (B, T) = t_{i+k}.

        Returns (logits (B, T, vocab) predicting t_{i+k+1}, normed h^k for the next depth).
        `block` runs the module's block as in hidden_states.
        """
        module = self.mtp[depth - 1]
        rope = self.rotary(positions, prev_hidden.dtype)
        h = module(prev_hidden, self.embed_tokens(next_ids), rope, positions, self.mtp_cache(cache, depth), routing, block)
        return self.output_head(h), h

    def mtp_cache(self, cache, depth: int):
        """The cache layer of MTP depth k (1-based): layer n_layers + k - 1, after the main layers."""
        return None if cache is None else cache.layer(self.cfg.n_layers + depth - 1)

    def mtp_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, routing=None, block=None) -> list[torch.Tensor]:
        """Training form (V3 §2.2): for depth k, logits (B, T-k, vocab) at i predict t_{i+k+1}."""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device).expand(input_ids.shape)
        prev, out = self.norm(hidden), []
        for k in range(1, len(self.mtp) + 1):
            logits, prev = self.mtp_forward(k, prev[:, : T - k], input_ids[:, k:], positions[:, : T - k],
                                            routing=routing, block=block)
            out.append(logits)
        return out

    # ------------------------------------------------------------------ accounting
    def num_params(self, active: bool = False, embedding: bool = True, mtp: bool = False) -> int:
        """Parameter count; `active=True` counts what one token uses (shared + top-k routed experts).

        Embedding and output head each count once (once in all when tied); MTP modules only on request.
        """
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not mtp:
                continue
            if name.startswith("embed.") and not embedding:
                continue
            total += p.numel()
        if active and self.cfg.is_moe:
            per_expert = 3 * self.cfg.dim * self.cfg.moe_inter_dim
            idle = self.cfg.n_routed_experts - self.cfg.n_activated_experts
            n_moe = sum(isinstance(b.ffn, MoE) for b in self.layers) + (len(self.mtp) if mtp else 0)
            total -= n_moe * idle * per_expert
        return total

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Matmul FLOPs per token: 2·N_active (non-embedding) + attention scores/values at mean length
        seq_len/2 (causal); ×3 for training (forward + backward), as in Kaplan/PaLM accounting."""
        c = self.cfg
        n = self.num_params(active=True, embedding=False)
        if self.head is None:   # tied: the embedding is not counted but the head matmul still runs
            n += c.vocab_size * c.dim
        qk, v = (c.qk_head_dim, c.v_head_dim) if c.is_mla else (c.head_dim, c.head_dim)
        attn = 2 * c.n_layers * c.n_heads * (qk + v) * seq_len / 2
        return int((2 * n + attn) * (3 if training else 1))

    def save_pretrained(self, folder, tokenizer=None, **kwargs) -> None:
        """Write a Hugging Face folder (config.json, safetensors, tokenizer files when given)."""
        from ..checkpoint.hf import save_hf_folder   # checkpoint depends on model, not the reverse
        save_hf_folder(self, folder, tokenizer=tokenizer, **kwargs)
