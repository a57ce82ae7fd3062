"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 §2.1.2, V2 §2.2).

h' = u + shared(u) + Σ_i g_i · expert_i(u), with g from the Gate:
- scores s = softmax(u·e) (V2) or sigmoid(u·e) (V3);
- group-limited routing: experts split into `n_expert_groups`, only the best `n_limited_groups`
  groups compete (a group scores by its max (V2) or the sum of its top-2 bias-adjusted scores (V3));
- aux-loss-free balancing: a per-expert bias (`e_score_correction_bias`) is added for *selection
  only*; the gate value stays s_i. A trainer nudges it with `update_expert_bias` after each step.
- top-k gates optionally renormalised (`norm_topk_prob`) and scaled by `route_scale`.

`MoE.forward` groups tokens by expert (one matmul per active expert); `forward_reference` is a
plain per-token loop kept as the oracle. Routing is reported through an explicit `routing` list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


@dataclass
class Routing:
    """One MoE layer's routing for N = B*T tokens: what balance losses and bias updates need."""
    scores: torch.Tensor    # (N, E) affinities s (softmax or sigmoid), float32, with grad
    indices: torch.Tensor   # (N, K) selected experts
    batch_shape: tuple      # (B, T)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.topk_method = cfg.score_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # float32 buffer: updated by a sign rule, not by gradients; only V3-style routing has it
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts) if cfg.topk_method == "noaux_tc" else None)

    def _apply(self, fn, recurse=True):
        # keep the bias in float32 under model.to(bfloat16): γ = 0.001 steps vanish in bf16
        super()._apply(fn, recurse)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> gate weights (N, K) float32, expert indices (N, K), scores (N, E)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores.detach() if self.bias is None else scores.detach() + self.bias
        if self.n_groups > 1 and self.topk_method != "greedy":
            grouped = choice.view(x.shape[0], self.n_groups, -1)                   # (N, G, E/G)
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        # the reference code runs all shared experts as one MLP of n_shared × width
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        """x (B, T, D): tokens sorted by expert, one batched MLP call per expert that got tokens."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        if routing is not None:
            routing.append(Routing(scores, indices, tuple(shape[:-1])))
        K = indices.shape[1]
        flat = indices.flatten()                                   # (N*K,) slot -> expert
        order = flat.argsort(stable=True)
        token_of = order // K                                      # sorted slot -> token
        counts = torch.bincount(flat, minlength=self.n_routed_experts).tolist()
        xs = x[token_of]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](xs[start:start + n]))
                start += n
        routed = torch.cat(outs) * weights.flatten()[order].unsqueeze(1).to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, routed)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition, token by token: y_t = shared(x_t) + Σ_k g_tk · expert_{i_tk}(x_t)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, _ = self.gate(x)
        rows = []
        for t in range(x.shape[0]):
            y = self.shared_experts(x[t]) if self.shared_experts is not None else torch.zeros_like(x[t])
            for k in range(indices.shape[1]):
                y = y + weights[t, k].to(x.dtype) * self.experts[int(indices[t, k])](x[t])
            rows.append(y)
        return torch.stack(rows).view(shape)


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (E,), the load that the bias rule balances."""
    return torch.bincount(routing.indices.flatten(), minlength=n_experts)


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = 0.001) -> None:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_i -= γ if expert i is overloaded, += γ if under.

    Over/under is against the mean load of the batch, e.g. loads [6, 2] -> mean 4 -> bias += [-γ, +γ].
    """
    load = load.float()
    bias += gamma * torch.sign(load.mean() - load)


def sequence_balance_loss(routing: Routing, alpha: float = 1e-4) -> torch.Tensor:
    """Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over sequences.

    f_i = E / (K·T) Σ_t 1[i ∈ TopK_t],  P_i = 1/T Σ_t s_it / Σ_j s_jt,  L = α Σ_i f_i P_i.
    A perfectly balanced router gives f_i = 1 for every expert, so L = α.
    """
    B, T = routing.batch_shape
    scores = routing.scores.view(B, T, -1)
    E, K = scores.shape[-1], routing.indices.shape[-1]
    chosen = F.one_hot(routing.indices.view(B, T, K), E).sum(2).float()          # (B, T, E)
    f = chosen.sum(1) * E / (K * T)                                               # (B, E)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)                            # (B, E)
    return alpha * (f * p).sum(-1).mean()
