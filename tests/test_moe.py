import torch

from nanoseek.model.moe import (Gate, MoE, Routing, expert_load, group_rows, padded_rows, sequence_balance_loss,
                                 update_expert_bias)
from nanoseek.model.presets import tiny_deepseek_v3


def _moe(**overrides):
    moe = MoE(tiny_deepseek_v3(**overrides))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def test_fast_path_equals_reference_loop():
    for overrides in [{}, {"score_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False},
                      {"n_expert_groups": 1, "n_limited_groups": 1, "n_shared_experts": 0}]:
        moe = _moe(**overrides)
        x = torch.randn(3, 7, 64)
        with torch.no_grad():
            assert (moe(x) - moe.forward_reference(x)).abs().max() < 1e-5


def test_bias_steers_selection_but_not_gate_values():
    gate = Gate(tiny_deepseek_v3(n_expert_groups=1, n_limited_groups=1))
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(5, 64)
    gate.bias[3] = 100.0                                   # expert 3 always wins selection
    weights, indices, scores = gate(x)
    assert (indices == 3).any(dim=1).all()
    raw = scores.gather(1, indices)
    assert torch.allclose(weights, raw / raw.sum(1, keepdim=True) * gate.route_scale)


def test_group_limited_routing_stays_in_top_groups():
    cfg = tiny_deepseek_v3(n_activated_experts=2, n_expert_groups=4, n_limited_groups=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    _, indices, _ = gate(torch.randn(32, 64))
    groups = indices // (cfg.n_routed_experts // cfg.n_expert_groups)
    assert (groups == groups[:, :1]).all()                 # both picks from the single kept group


def test_update_expert_bias_sign_rule():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 4, 0]), gamma=0.001)   # mean 4
    assert torch.allclose(bias, torch.tensor([-0.001, 0.001, 0.0, 0.001]))


def test_expert_load_and_balance_loss():
    B, T, E = 2, 4, 4
    # perfectly balanced routing with uniform scores: f_i = 1, P_i = 1/E  ->  L = alpha
    indices = torch.tensor([[0, 1], [2, 3]] * (B * T // 2))
    routing = Routing(torch.full((B * T, E), 0.5), indices, (B, T))
    assert expert_load(routing, E).tolist() == [4, 4, 4, 4]
    assert abs(sequence_balance_loss(routing, alpha=0.1).item() - 0.1) < 1e-6
    # everything on expert 0 with its score dominant: loss grows
    skewed = Routing(torch.tensor([[0.9, 0.1, 0.1, 0.1]] * (B * T)), torch.tensor([[0, 1]] * (B * T)), (B, T))
    assert sequence_balance_loss(skewed, alpha=0.1) > 0.1


def test_balance_loss_has_gradient_to_gate():
    moe = _moe()
    routing = []
    moe(torch.randn(2, 5, 64), routing)
    sequence_balance_loss(routing[0]).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_padded_rows_example():
    rows, padded = padded_rows(torch.tensor([0, 0, 0, 1]), torch.tensor([3, 1]), 2)
    assert padded.tolist() == [4, 2] and rows.tolist() == [0, 1, 2, 4]
    assert group_rows(4096, 8) == 128 and group_rows(4096, 16) == 64 and group_rows(8, 8) == 16


def test_training_path_equals_inference_loop_with_gradients():
    """With grad enabled (training) the MoE takes one grouped matmul over padded expert blocks; its
    output and every gradient equal the per-expert loop's, in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    moe = _moe()
    x = torch.randn(3, 37, 64)
    for amp, tol in ((False, 1e-5), (True, 3e-2)):
        results = []
        for grouped in (True, False):
            moe.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            moe._grouped = (lambda _x: True) if grouped else (lambda _x: False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = moe(xg)
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append([y.detach().float(), xg.grad] + [p.grad.clone() for p in moe.parameters()])
        del moe._grouped
        for a, b in zip(*results):
            assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())
    assert moe._grouped(x.requires_grad_(True))       # the real rule picks the grouped path when training
    with torch.no_grad():
        assert not moe._grouped(x)


def test_routed_gradients_equal_the_token_by_token_reference():
    """The dispatch and combine write their own backward (gathers, no scatter): every gradient, on
    both paths, equals plain autograd through forward_reference's per-token loop, in float32."""
    torch.manual_seed(1)
    moe = _moe()
    x = torch.randn(2, 9, 64)
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)
    grads = {}
    for path in ("reference", "grouped", "loop"):
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        moe._grouped = lambda _x, path=path: path == "grouped"
        y = moe.forward_reference(xg) if path == "reference" else moe(xg)
        (y * weight).sum().backward()
        grads[path] = [xg.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]
    del moe._grouped
    for path in ("grouped", "loop"):
        for a, b in zip(grads[path], grads["reference"]):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
