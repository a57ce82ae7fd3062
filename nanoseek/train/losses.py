"""Training losses as pure functions: masked cross-entropy, multi-token prediction, MoE balance.

Labels follow one convention everywhere: `labels[:, t]` is the token that follows `input_ids[:, t]`,
and -100 (IGNORE) marks positions that take no loss (padding, prompts in SFT). Every loss returns a
*sum* over its tokens together with the count, or a mean, as its docstring says: the loop divides
sums by the token count of the whole optimiser step (all micro-batches, all ranks), so gradient
accumulation and data parallelism give the same update as one big batch.

    ce_sum, n = cross_entropy_sum(logits, labels)               # logits (B, T, V), labels (B, T)
    depth_sums = mtp_loss_sums(model.mtp_logits(ids, hidden), labels)

GRPO's losses (token log-probs, advantages, the clipped objective, k3 KL) live in grpo's section below
the training losses when that stage lands; nothing here knows about optimisers or models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import Routing, sequence_balance_loss

IGNORE = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    logits (B, T, V) any float dtype (computed in float32), labels (B, T) with IGNORE where masked.
    Example: one position, logits [0, 0] over 2 tokens, label 1 -> (log 2, 1).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


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
