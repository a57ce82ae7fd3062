"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 §2.1.2, V2 §2.2).

h' = u + shared(u) + Σ_i g_i · expert_i(u), with g from the Gate:
- scores s = softmax(u·e) (V2) or sigmoid(u·e) (V3);
- group-limited routing: experts split into `n_expert_groups`, only the best `n_limited_groups`
  groups compete (a group scores by its max (V2) or the sum of its top-2 bias-adjusted scores (V3));
- aux-loss-free balancing: a per-expert bias (`e_score_correction_bias`) is added for *selection
  only*; the gate value stays s_i. A trainer nudges it with `update_expert_bias` after each step.
- top-k gates optionally renormalised (`norm_topk_prob`) and scaled by `route_scale`.

`MoE.forward` groups tokens by expert: in training one grouped matmul covers every expert, at
inference one matmul runs per active expert; `forward_reference` is a plain per-token loop kept
as the oracle. Routing is reported through an explicit `routing` list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, apply_keeping_dtypes


@dataclass
class Routing:
    """One MoE layer's routing for N = B*T tokens: what balance losses and bias updates need."""
    scores: torch.Tensor    # (N, E) affinities s (softmax or sigmoid), float32, with grad
    indices: torch.Tensor   # (N, K) selected experts
    batch_shape: tuple      # (B, T)
    gate: nn.Module | None = None   # the Gate that routed them: whose bias this load balances


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
        return apply_keeping_dtypes(self, fn, recurse, {"bias": torch.float32})

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


def group_rows(n_slots: int, n_experts: int) -> int:
    """The multiple that training pads each expert's rows to: a quarter of the mean rows per expert,
    a power of two in [16, 128] (512 mean rows -> 128, 256 -> 64); padding costs ~1/8 more routed FLOPs.

    Why pad: bf16 matmuls on the CPU go through oneDNN, which builds and caches a kernel per shape.
    With a new row count per expert every step, the small preset's RSS grew without bound (~25 MB a
    step padded to 32 rows, ~90 MB unpadded; 2,048 tokens, 8 experts) and new shapes cost JIT
    compiles; padded to 128 it stayed flat over 30 steps.
    """
    mean = max(n_slots // max(n_experts, 1), 1)
    return min(128, max(16, 1 << max(mean.bit_length() - 3, 0)))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        # the reference code runs all shared experts as one MLP of n_shared × width
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        """x (B, T, D): tokens sorted by expert, then every expert's rows in one grouped matmul (training)
        or one batched MLP call per expert that got tokens (inference, quantized experts)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        if routing is not None:
            routing.append(Routing(scores, indices, tuple(shape[:-1]), self.gate))
        # the stacked expert weights are built here, not in routed: compiled, their casts and stacking
        # (and the backward's split of their gradients) fuse into one pass over the experts' weights
        y = self.routed(x, weights, indices, self._stacked_weights(x) if self._grouped(x) else None)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    @torch.compiler.disable
    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, stacked=None) -> torch.Tensor:
        """Σ_k g_tk · expert_{i_tk}(x_t) for x (N, D), gate weights and expert indices (N, K) -> (N, D);
        `stacked`: the experts' weights for the grouped matmul (_stacked_weights), None for the loop.

        Left to eager when the block around it is compiled (train/compiled.py): how many rows each
        expert gets is data, and a compiled graph would be traced again for every new count."""
        N, K = x.shape[0], indices.shape[1]
        flat = indices.flatten()                                   # (N*K,) slot t*K + k -> expert
        order = flat.argsort(stable=True)                          # slots sorted by expert
        counts = torch.bincount(flat, minlength=self.n_routed_experts)
        if stacked is not None:
            # each expert's rows padded (group_rows); a pad row holds slot N*K, which reads and weighs zero
            rows, counts = padded_rows(flat[order], counts, group_rows(N * K, self.n_routed_experts))
            row_slot = torch.full((int(counts.sum()),), N * K, dtype=order.dtype).index_copy_(0, rows, order)
        else:
            rows, row_slot = torch.arange(N * K, device=x.device), order
        slot_row = torch.empty_like(rows).index_copy_(0, order, rows)              # (N*K,) inverse of row_slot
        token_of = row_slot // K                                                   # (S,) N for pad rows
        dtype = stacked[0].dtype if stacked is not None else x.dtype
        # without gradients (the engine's steps) the math runs bare: the autograd Functions' bookkeeping
        # cost ~40 us a MoE layer of a one-token decode
        grad = torch.is_grad_enabled()
        xs = _Dispatch.apply(x, token_of, slot_row, dtype) if grad else _gather_tokens(x, token_of, N * K, dtype)
        if stacked is not None:
            out = self._experts_grouped(xs, counts, *stacked)
        else:   # split, not slices: a slice's backward writes a zero tensor of all N*K rows per expert
            out = torch.cat([self.experts[e](part) for e, part in enumerate(xs.split(counts.tolist())) if len(part)])
        if grad:
            return _Combine.apply(out, weights, slot_row, row_slot, x.dtype)
        return _combine(out, weights, slot_row)[0].to(x.dtype)

    def _grouped(self, x: torch.Tensor) -> bool:
        """Training on the CPU with plain float experts takes the grouped matmul. Inference keeps the
        per-expert loop: a decode step reaches a few experts, and stacking every expert's weights
        would copy them all (V3: 22 GB a layer). CUDA keeps the loop until the grouped path is
        measured there (its grouped_mm wants bf16 and aligned shapes)."""
        first = self.experts[0]
        return (torch.is_grad_enabled() and x.device.type == "cpu" and hasattr(F, "grouped_mm")
                and first.w13 is None and type(first.w1) is nn.Linear)

    def _stacked_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's weights stacked, [w1; w3] as (E, 2I, D) and w2 as (E, D, I), cast to the
        autocast dtype first (grouped_mm is not autocast-aware); their gradients flow back to each
        expert's nn.Linear through the stack."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        E, I = len(self.experts), self.experts[0].w1.out_features
        w13 = torch.cat([w.to(dtype) for e in self.experts for w in (e.w1.weight, e.w3.weight)]).view(E, 2 * I, -1)
        return w13, torch.stack([e.w2.weight.to(dtype) for e in self.experts])

    def _experts_grouped(self, xs: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
        """SwiGLU of every expert over its rows of xs (S, D) in the weights' dtype (grouped_mm does not
        cast), `counts[e]` rows each in expert order, in two grouped matmuls over the stacked weights (E, 2I, D) and (E, D, I).

        One call sees all groups (offs: cumulative row counts, int32): no per-expert Python, no slice
        per expert whose backward zero-fills every row.
        """
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # (S, I) each
        return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)               # (S, D)

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


class _Dispatch(torch.autograd.Function):
    """xs = [x; 0][token_of] in `dtype`: every slot's token row, grouped by expert (pad rows read the
    zero row). x (N, D), token_of (S,), slot_row (N*K,) -> (S, D).

    The backward is a gather too: token t's gradient sums its K rows slot_row[t*K : (t+1)*K], in
    float32. index_select's own backward fills a zero tensor and index_adds every row into it.
    """

    @staticmethod
    def forward(ctx, x, token_of, slot_row, dtype):
        ctx.save_for_backward(slot_row)
        ctx.x_dtype, ctx.k = x.dtype, slot_row.shape[0] // x.shape[0]
        return _gather_tokens(x, token_of, slot_row.shape[0], dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        mine = grad.index_select(0, slot_row).view(-1, ctx.k, grad.shape[1])      # (N, K, D)
        return mine.sum(1, dtype=torch.float32).to(ctx.x_dtype), None, None, None


class _Combine(torch.autograd.Function):
    """y_t = Σ_k w_tk · out[slot_row[t*K + k]], accumulated in float32 and returned in `dtype`.
    out (S, D) expert outputs in row order, weights (N, K) float32, row_slot (S,) the slot of each
    row (N*K for pad rows) -> (N, D).

    Each row of `out` serves one slot at most, so the backward gathers as well: row r's gradient is
    w · grad_y of its slot's token. Autograd's form of `out[slot_row] * w` then a float32 sum kept
    two (N, K, D) copies and ran four passes over them (2,048 tokens × 2 × 192: ~3 ms of a layer).
    """

    @staticmethod
    def forward(ctx, out, weights, slot_row, row_slot, dtype):
        y, mine = _combine(out, weights, slot_row)
        ctx.save_for_backward(mine, weights, row_slot)
        return y.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        mine, weights, row_slot = ctx.saved_tensors
        N, K = weights.shape
        grad = grad.to(mine.dtype)
        # (N, K): a multiply and a sum; a bmm of N (K, D) @ (D, 1) products measured 3x slower
        grad_w = (mine * grad.unsqueeze(1)).sum(-1, dtype=torch.float32).to(weights.dtype)
        padded = row_slot.shape[0] > N * K                  # pad rows hold slot N*K: weight and gradient 0
        w_row = _rows(weights.reshape(-1, 1), row_slot, padded)                              # (S, 1)
        grad_rows = _rows(grad, row_slot // K, padded)                                       # (S, D)
        return grad_rows.mul_(w_row.to(grad.dtype)), grad_w, None, None, None


def _gather_tokens(x: torch.Tensor, token_of: torch.Tensor, n_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """_Dispatch's forward: x (N, D) cast to dtype (N rows cast, not S), then its rows at token_of (S,);
    pad rows (S > n_slots = N*K) read index N, a zero row."""
    return _rows(x.to(dtype), token_of, padded=token_of.shape[0] > n_slots)


def _combine(out: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_Combine's forward: (y (N, D) float32 = Σ_k w_tk · out[slot_row[t*K + k]], the gathered rows (N, K, D))."""
    N, K = weights.shape
    mine = out.index_select(0, slot_row).view(N, K, -1)
    y = mine[:, 0].float() * weights[:, :1]
    for k in range(1, K):
        y.addcmul_(mine[:, k], weights[:, k:k + 1])
    return y, mine


def _rows(t: torch.Tensor, index: torch.Tensor, padded: bool) -> torch.Tensor:
    """t (M, D) gathered at index (S,); with `padded`, index M reads a zero row appended to t."""
    return (torch.cat([t, t.new_zeros(1, t.shape[1])]) if padded else t).index_select(0, index)


def padded_rows(sorted_experts: torch.Tensor, counts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each slot lands when every expert's block of rows is padded to a multiple of `multiple`.

    sorted_experts (S,) the expert of each slot, in expert order; counts (E,) slots per expert.
    Returns (row of each slot (S,), padded counts (E,)). Example: counts [3, 1], multiple 2 ->
    padded [4, 2], rows [0, 1, 2, 4] (rows 3 and 5 are padding).
    """
    padded = (counts + multiple - 1) // multiple * multiple
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)    # padded start - packed start, per expert
    return torch.arange(len(sorted_experts), device=counts.device) + shift[sorted_experts], padded


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
