"""Compiled training (train/compiled.py): the default's choice, the same step as eager, eager after a
failed compile."""

import logging
import math

import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.model.presets import small_deepseek_v3, tiny_deepseek_v3, tiny_llama
from nanoseek.train.compiled import TrainingBlock, compile_choice
from nanoseek.train.loop import Session, TrainConfig, TrainState, train_step
from nanoseek.train.optim import build_optimizer

CPU = torch.device("cpu")


def _state(model, compile="off"):
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=0, compile=compile)
    return TrainState(model, build_optimizer(model, cfg.lr, cfg.weight_decay), cfg, Session(CPU, None))


def _batch(seed=0):
    ids = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _moe_model():
    """Every layer MoE (one block type, so one compile): MLA, the gate, the eager expert dispatch."""
    torch.manual_seed(0)
    return Transformer(tiny_deepseek_v3(n_dense_layers=0, n_mtp_layers=0))


def test_auto_compiles_models_of_a_million_parameters_on_the_cpu_only():
    with torch.device("meta"):
        small, tiny = Transformer(small_deepseek_v3()), Transformer(tiny_llama())
    assert compile_choice("auto", small, CPU)[0]
    on, why = compile_choice("auto", tiny, CPU)
    assert not on and "parameters" in why
    assert compile_choice("on", tiny, CPU) == (True, "asked for")
    assert compile_choice("off", small, CPU) == (False, "asked for")
    assert not compile_choice("auto", small, torch.device("cuda"))[0]
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compile_choice("yes", small, CPU)
    assert not _state(Transformer(tiny_llama())).compiled        # tiny presets (every other test) train eager


def test_mtp_runs_its_block_through_the_given_seam():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3())
    ids = _batch()["input_ids"]
    hidden = model.hidden_states(ids)
    calls = []

    def block(layer, *args):
        calls.append(layer)
        return layer(*args)
    for plain, through in zip(model.mtp_logits(ids, hidden), model.mtp_logits(ids, hidden, block=block)):
        assert torch.equal(plain, through)
    assert calls == [m.block for m in model.mtp]


def test_compiled_step_equals_eager_within_rounding():
    torch._dynamo.reset()
    eager, compiled = _moe_model(), _moe_model()
    se, sc = _state(eager), _state(compiled, compile="on")
    assert sc.compiled and isinstance(sc.loss_module.block, TrainingBlock)
    for seed in range(2):
        me, mc = train_step(se, [_batch(seed)]), train_step(sc, [_batch(seed)])
        assert math.isclose(me["loss"], mc["loss"], rel_tol=1e-5)
        assert me["expert_load_max_over_mean"] == mc["expert_load_max_over_mean"]   # routing reported once
        if seed == 0:      # the first moment after one step is (1 - β1) · the gradient
            for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(se.optimizer.state[pe]["exp_avg"], sc.optimizer.state[pc]["exp_avg"],
                                           atol=1e-7, rtol=1e-3, msg=name)
    assert sc.loss_module.block.compiled
    for a, b in zip(eager.buffers(), compiled.buffers()):       # the expert biases moved alike
        torch.testing.assert_close(a, b)


def test_a_failed_compile_trains_eager_with_one_warning(caplog):
    torch._dynamo.reset()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")
    eager, compiled = _moe_model(), _moe_model()
    se, sc = _state(eager), _state(compiled)
    sc.loss_module.block = TrainingBlock(backend=broken)
    with caplog.at_level(logging.WARNING, logger="nanoseek.train"):
        for seed in range(2):
            me, mc = train_step(se, [_batch(seed)]), train_step(sc, [_batch(seed)])
            assert me["loss"] == mc["loss"] and me["expert_load_max_over_mean"] == mc["expert_load_max_over_mean"]
    assert not sc.loss_module.block.compiled
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "torch.compile failed, training runs eager" in caplog.records[0].message
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a, b)
