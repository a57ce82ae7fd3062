"""The shared training step: accumulation equals one big batch, the non-finite guard, bias balancing."""

import math

import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.model.moe import Gate, Routing, expert_load, update_expert_bias
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama
from nanoseek.train.loop import Session, TrainConfig, TrainState, train_step
from nanoseek.train.optim import build_optimizer, lr_at, param_groups

CPU = Session(torch.device("cpu"), None)


def _state(model, **overrides):
    cfg = TrainConfig(**{"steps": 10, "lr": 1e-2, "warmup_steps": 0, **overrides})
    return TrainState(model, build_optimizer(model, cfg.lr, cfg.weight_decay), cfg, CPU)


def _batch(rows: int, T: int = 16, seed: int = 0):
    ids = torch.randint(0, 256, (rows, T + 1), generator=torch.Generator().manual_seed(seed))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100                      # unequal token counts per micro-batch
    return {"input_ids": ids[:, :-1], "labels": labels}


def _split(batch, parts):
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


@pytest.mark.parametrize("preset", [tiny_llama, tiny_deepseek_v3])
def test_accumulated_micro_batches_equal_one_big_batch(preset):
    torch.manual_seed(0)
    a = Transformer(preset())
    b = Transformer(preset())
    b.load_state_dict(a.state_dict())
    batch = _batch(8)
    sa, sb = _state(a, bias_update_speed=0.0), _state(b, bias_update_speed=0.0)
    ma, mb = train_step(sa, [batch]), train_step(sb, _split(batch, 4))
    assert math.isclose(ma["loss"], mb["loss"], rel_tol=1e-5)
    assert math.isclose(ma["grad_norm"], mb["grad_norm"], rel_tol=1e-5)
    # AdamW's first moment after one step is (1 - β1) · the gradient: compare gradients through it
    # (the weights themselves moved by lr · sign(g), which flips for gradients within rounding of 0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(sa.optimizer.state[pa]["exp_avg"], sb.optimizer.state[pb]["exp_avg"],
                                   atol=1e-7, rtol=1e-4, msg=name)


def test_non_finite_gradient_skips_the_step_and_leaves_everything_untouched():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3())
    state = _state(model)
    train_step(state, [_batch(2)])                     # moments exist now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer.state[model.embed.weight].items()}
    hook = model.layers[0].attn.wo.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    metrics = train_step(state, [_batch(2, seed=1)])
    hook.remove()
    assert not metrics["finite"] and state.skipped_steps == 1 and metrics["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k           # weights and expert biases alike
    for k, v in state.optimizer.state[model.embed.weight].items():
        assert torch.equal(v, moments[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert train_step(state, [_batch(2, seed=2)])["finite"]      # and training goes on


def test_bias_update_moves_every_gate_by_gamma_and_gives_weights_no_gradient():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3())
    state = _state(model, lr=0.0, bias_update_speed=0.01)       # lr 0: only the bias rule acts
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    weights = [g.weight.detach().clone() for g in gates]
    metrics = train_step(state, [_batch(4)])
    for gate, w in zip(gates, weights):
        assert torch.equal(gate.weight, w)
        assert not gate.bias.requires_grad
        assert torch.all((gate.bias == 0) | ((gate.bias.abs() - 0.01).abs() < 1e-7))
        assert gate.bias.abs().sum() > 0
    assert len(metrics["expert_load_max_over_mean"]) == len(gates)   # main MoE layers + the MTP block


def test_bias_rule_balances_a_skewed_router_within_a_few_hundred_steps():
    torch.manual_seed(0)
    gate = Gate(tiny_deepseek_v3(n_expert_groups=1, n_limited_groups=1))
    torch.nn.init.normal_(gate.weight, std=0.02)
    direction = torch.randn(gate.weight.shape[1])
    with torch.no_grad():
        gate.weight[:2] += 0.03 * direction           # experts 0 and 1 win almost every token
    x = direction + 0.5 * torch.randn(512, gate.weight.shape[1])

    def imbalance():
        _, indices, _ = gate(x)
        load = expert_load(Routing(None, indices, (1, len(x))), 8).float()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(300):
        _, indices, _ = gate(x)
        update_expert_bias(gate.bias, expert_load(Routing(None, indices, (1, len(x))), 8), gamma=0.001)
    assert start > 3.0 and imbalance() < 1.5, (start, imbalance())
    assert gate.weight.grad is None


def test_param_groups_leave_norms_biases_and_embeddings_undecayed():
    model = Transformer(tiny_llama(qkv_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 and "embed" not in names[id(p)]
               for p in decay["params"])
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in undecayed and "norm.weight" in undecayed
    assert any(n.endswith(".bias") for n in undecayed)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, warmup=2, total=10, min_ratio=0.1) for s in range(11)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert math.isclose(lrs[10], 0.1)


@pytest.mark.parametrize("max_norm", [0.5, 1e6, math.inf])
def test_clip_gradients_equals_torch_clip_grad_norm_bit_for_bit(max_norm):
    from nanoseek.train.loop import clip_gradients
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    assert torch.equal(clip_gradients(ours, max_norm), torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
