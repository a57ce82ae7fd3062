"""Training losses against hand computations: masked cross-entropy, MTP (V3 §2.2), sequence balance."""

import math

import torch

from nanoseek.model import Transformer
from nanoseek.model.moe import Routing
from nanoseek.model.presets import tiny_deepseek_v3
from nanoseek.train.losses import IGNORE, balance_loss, cross_entropy, cross_entropy_sum, mtp_loss


def _nll(row: torch.Tensor, target: int) -> float:
    """-log softmax(row)[target], written out."""
    exps = [math.exp(v) for v in row.tolist()]
    return -math.log(exps[target] / sum(exps))


def test_cross_entropy_counts_only_labelled_positions():
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[1, IGNORE, 0]])
    total, n = cross_entropy_sum(logits, labels)
    assert n == 2 and math.isclose(total.item(), 2 * math.log(2), rel_tol=1e-6)
    assert cross_entropy(logits, torch.full((1, 3), IGNORE)).item() == 0.0


def test_mtp_loss_equals_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V, lam = 2, 5, 7, 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = IGNORE
    depths = [torch.randn(B, T - k, V, generator=g) for k in (1, 2)]
    per_depth = []
    for k, logits in enumerate(depths, 1):
        terms = [_nll(logits[b, i], int(labels[b, i + k])) for b in range(B) for i in range(T - k)
                 if labels[b, i + k] != IGNORE]          # position i predicts t_{i+k+1} = labels[i+k]
        per_depth.append(sum(terms) / len(terms))
    expected = lam / 2 * sum(per_depth)
    assert math.isclose(mtp_loss(depths, labels, lam).item(), expected, rel_tol=1e-5)


def test_mtp_gradients_reach_the_mtp_module_only_through_its_loss():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3())
    ids = torch.randint(0, 256, (2, 12))
    hidden = model.hidden_states(ids[:, :-1])
    loss = mtp_loss(model.mtp_logits(ids[:, :-1], hidden), ids[:, 1:], 0.3)
    loss.backward()
    mtp = model.mtp[0]
    for p in (mtp.eh_proj.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.block.attn.wo.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0      # the shared embedding and head learn from it too


def test_sequence_balance_loss_equals_a_hand_computation():
    # one sequence of T = 2 tokens, E = 2 experts, K = 1: both tokens pick expert 0
    scores = torch.tensor([[0.6, 0.2], [0.5, 0.5]])
    routing = Routing(scores, torch.tensor([[0], [0]]), (1, 2))
    f = [2 / (1 * 2) * 2, 0.0]                                       # E/(K·T) · count
    p = [(0.6 / 0.8 + 0.5 / 1.0) / 2, (0.2 / 0.8 + 0.5 / 1.0) / 2]    # mean normalised score
    expected = 0.01 * (f[0] * p[0] + f[1] * p[1])
    assert math.isclose(balance_loss([routing], 0.01).item(), expected, rel_tol=1e-6)
    assert math.isclose(balance_loss([routing, routing], 0.01).item(), 2 * expected, rel_tol=1e-6)
    assert balance_loss([], 0.01).item() == 0.0


def test_cross_entropy_sum_in_blocks_equals_torch_with_gradients():
    """cross_entropy_sum works a block of rows at a time (a few rows when V is large): its sum and
    its gradient equal F.cross_entropy's on float32 copies of the logits, for float32 and bf16."""
    g = torch.Generator().manual_seed(0)
    V = 2**17                                                    # 8 rows a block: 20 rows make 3 blocks
    labels = torch.randint(0, V, (4, 5), generator=g)
    labels[1, 2] = labels[3, 0] = IGNORE
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(4, 5, V, generator=g)).to(dtype)
        ours_in, ref_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ours, n = cross_entropy_sum(ours_in, labels)
        ref = torch.nn.functional.cross_entropy(ref_in.float().reshape(-1, V), labels.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
        (0.5 * ours).backward()
        (0.5 * ref).backward()
        assert n == 18 and math.isclose(ours.item(), ref.item(), rel_tol=1e-6)
        assert ours_in.grad.dtype == dtype and ours_in.grad[1, 2].abs().max() == 0
        assert (ours_in.grad.float() - ref_in.grad.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 4e-3)
