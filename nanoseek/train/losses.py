"""Training losses as pure functions: masked cross-entropy, multi-token prediction, MoE balance.

Labels follow one convention everywhere: `labels[:, t]` is the token that follows `input_ids[:, t]`,
and -100 (IGNORE) marks positions that take no loss (padding, prompts in SFT). Every loss returns a
*sum* over its tokens together with the count, or a mean, as its docstring says: the loop divides
sums by the token count of the whole optimiser step (all micro-batches, all ranks), so gradient
accumulation and data parallelism give the same update as one big batch.

    ce_sum, n = cross_entropy_sum(logits, labels)               # logits (B, T, V), labels (B, T)
    depth_sums = mtp_loss_sums(model.mtp_logits(ids, hidden), labels)

GRPO's pieces (token log-probs, group advantages, the clipped objective, k3 KL) and distillation's
KL follow in their own sections; nothing here knows about optimisers or models.
"""

from __future__ import annotations

import torch

from ..model.moe import Routing, sequence_balance_loss

IGNORE = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    logits (B, T, V) any float dtype (computed in float32), labels (B, T) with IGNORE where masked.
    Example: one position, logits [0, 0] over 2 tokens, label 1 -> (log 2, 1).
    """
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return _ChunkedCrossEntropy.apply(flat, targets), int((labels != IGNORE).sum())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), reduction="sum") a block of rows at a time, in float32.

    The plain form writes a float32 copy of all the logits, its log-softmax and their gradients:
    five (N, V) float32 passes through memory. Here each block's float32 work fits in cache, only
    the per-row log-sum-exp (N,) is kept for backward, and the gradient is written once, in the
    logits' dtype. CPU, 2,048 × 16,384 bf16 logits (deepseek_v3_100m): forward + backward
    ~410 -> ~130 ms of CPU time, and ~270 MB less held until backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, 2**20 // logits.shape[1])                  # ~4 MiB of float32 per block
        valid, safe = labels != IGNORE, labels.clamp_min(0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        work = logits.new_empty((min(rows, logits.shape[0]), logits.shape[1]), dtype=torch.float32)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            block = _as_float(work, logits[start:end])                              # (rows, V)
            picked[start:end] = block.gather(1, safe[start:end, None]).squeeze(1)
            peak = block.amax(dim=1)
            lse[start:end] = block.sub_(peak[:, None]).exp_().sum(dim=1).log_().add_(peak)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows = rows
        return ((lse - picked) * valid).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        out, rows = torch.empty_like(logits), ctx.rows
        work = logits.new_empty((min(rows, logits.shape[0]), logits.shape[1]), dtype=torch.float32)
        scale = valid * grad                                                         # (N,)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            p = _as_float(work, logits[start:end]).sub_(lse[start:end, None]).exp_()   # softmax (rows, V)
            p.scatter_add_(1, safe[start:end, None], p.new_full((p.shape[0], 1), -1.0))  # - one-hot
            out[start:end] = p.mul_(scale[start:end, None])
        return out, None


def _as_float(work: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """block (n, V) converted into the reused float32 buffer `work` (rows >= n, V): a fresh 4 MiB
    float32 tensor per block measured 5x slower than the conversion itself (its pages fault in)."""
    return work[:block.shape[0]].copy_(block)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (0 when none is labelled)."""
    total, n = cross_entropy_sum(logits, labels)
    return total / max(n, 1)


def mtp_targets(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth k (V3 §2.2): position i predicts t_{i+k+1}, which is labels[:, i+k].

    labels (B, T) -> (B, T - k). A masked label stays masked: SFT prompts take no MTP loss either.
    """
    return labels[:, depth:]


def mtp_loss_sums(mtp_logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Per depth k = 1..D, the summed cross-entropy of `mtp_logits[k-1]` (B, T-k, V) on its targets.

    The MTP loss of V3 eq. 25 is L_MTP = λ/D · Σ_k L_k with each L_k a mean over tokens; the loop
    forms it from these sums as λ/D · Σ_k sum_k / n_tokens (see `mtp_loss`).
    """
    return [cross_entropy_sum(logits, mtp_targets(labels, k))[0] for k, logits in enumerate(mtp_logits, 1)]


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, weight: float) -> torch.Tensor:
    """λ × the mean over depths of each depth's mean cross-entropy (V3 §2.2, eq. 24-25)."""
    if not mtp_logits:
        return labels.new_zeros((), dtype=torch.float32)
    per_depth = [cross_entropy(logits, mtp_targets(labels, k)) for k, logits in enumerate(mtp_logits, 1)]
    return weight * torch.stack(per_depth).mean()


def balance_loss(routings: list[Routing], alpha: float) -> torch.Tensor:
    """The complementary sequence-wise balance loss (V3 eq. 17-20), summed over MoE layers.

    Each layer's term is α Σ_i f_i P_i averaged over sequences (model/moe.py); a perfectly balanced
    layer contributes α. With α = 1e-4 (V3's "extremely small" value) it only stops extreme
    imbalance inside a single sequence; the bias rule does the real balancing.
    """
    if not routings or alpha == 0:
        return torch.zeros(())
    return torch.stack([sequence_balance_loss(r, alpha) for r in routings]).sum()


# ---- GRPO (DeepSeekMath §4.1, R1 eq. 1-3) ------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target_t | context_<t) per position: logits (B, T, V), targets (B, T) -> (B, T) float32.

    Masked targets (IGNORE) get log-prob 0; they are masked again by the caller's loss mask.
    Computed as logit[target] - logsumexp(logits), which never materialises log_softmax's (B, T, V).
    """
    logits = logits.float()
    safe = targets.clamp_min(0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(targets == IGNORE, 0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the model's next-token distribution per position: (B, T, V) -> (B, T) float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO's outcome advantages (R1 eq. 3): A_i = (r_i - mean(r)) / std(r) within each group.

    rewards (P, G): P prompts, G samples each -> (P, G). std is the sample standard deviation (as
    TRL's), plus `eps`, so a group whose rewards are all equal gets zeros, never NaN: it carries no
    signal. scale=False gives Dr. GRPO's unscaled r - mean (no difficulty bias from the std).
    Example: rewards [[1, 0, 0, 1]] -> mean 0.5, std 0.577 -> [[0.866, -0.866, -0.866, 0.866]].
    """
    if rewards.shape[-1] < 2:
        raise ValueError("group advantages need at least 2 samples per prompt (group_size >= 2)")
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    return centred / (rewards.std(dim=-1, keepdim=True) + eps) if scale else centred


def signal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Which groups carry a learning signal (not every reward equal): (P, G) -> (P,) bool.

    DAPO's dynamic sampling drops the others: with β = 0 their advantages are all zero, so training
    on them costs a forward and backward and teaches nothing.
    """
    return (rewards.max(dim=-1).values - rewards.min(dim=-1).values) > 0


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) by Schulman's k3 estimator (R1 eq. 2): exp(d) - d - 1, d = ref - logp.

    Unbiased and never negative. Example: logp = log 0.5, ref = log 0.25 -> 0.5 - log 0.5 - 1 = 0.193.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss_sums(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                   beta: float = 0.0, ref_logprobs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The clipped GRPO objective per token, summed over the masked completion tokens.

    logprobs, old_logprobs, ref_logprobs, mask: (B, T); advantages: (B,), one per completion (or all
    of them flattened to the N completion tokens, advantages then (N,) too).
    Per token: ρ = π_θ / π_old = exp(logp - old), loss_t = -min(ρ·A, clip(ρ, 1-ε, 1+ε_high)·A)
    + β·KL_k3(π_θ || π_ref). Returned sums are divided by the caller by the number of completion
    tokens of the whole step (token-level normalisation, DAPO §3.3): every token weighs the same,
    so long answers are not averaged down as the per-sequence 1/|o_i| of R1 eq. 1 would.
    Worked example: ρ = 1.5, A = 1, ε = 0.2 -> min(1.5, 1.2) = 1.2, loss -1.2, the token counts as
    clipped; ρ = 1.5, A = -1 -> min(-1.5, -1.2) = -1.5, loss 1.5 (clipping never hides a worsening).
    Returns {"loss", "policy", "kl", "clipped"} sums (kl is 0 when beta == 0).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    # one advantage per completion (B,) against (B, T) tokens, or already one per token
    A = (advantages if advantages.shape == logprobs.shape else advantages.unsqueeze(-1)).to(logprobs.dtype)
    unclipped, clipped = ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + high) * A
    policy = -torch.minimum(unclipped, clipped)
    was_clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + high) & (A > 0))
    kl = k3_kl(logprobs, ref_logprobs) if beta > 0 and ref_logprobs is not None else torch.zeros_like(policy)
    per_token = policy + beta * kl
    return {"loss": (per_token * mask).sum(), "policy": (policy * mask).sum(), "kl": (kl * mask).sum().detach(),
            "clipped": (was_clipped.to(mask.dtype) * mask).sum().detach()}


# ---- distillation (R1 §2.4 distils by SFT alone; logit KD is the optional extra) -------------------

def kd_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) of the next-token distributions at the labelled positions.

    Per position t with labels[:, t] != IGNORE: Σ_v p_T(v) (log p_T(v) - log p_S(v)), p = softmax of
    the logits (B, T, V) in float32; the teacher's side carries no gradient. Forward KL is Hinton's
    soft-target loss: the student is pulled toward every token the teacher finds likely, not only
    the sampled one. Returns (sum, count) like `cross_entropy_sum`, so the loop divides by the step's
    labelled-token total. Example: teacher logits [0, 0], student [log 3, 0] -> p_T = (1/2, 1/2),
    p_S = (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3) = 0.1438.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation by logits needs one vocabulary")
    keep = labels != IGNORE                                    # (B, T): only the assistant's tokens
    student = torch.log_softmax(student_logits[keep].float(), dim=-1)            # (N, V)
    teacher = torch.log_softmax(teacher_logits[keep].detach().float(), dim=-1)   # (N, V)
    kl = (teacher.exp() * (teacher - student)).sum()
    return kl, int(keep.sum())
