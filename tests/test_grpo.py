"""GRPO: hand-computed advantages, clipped loss and k3 KL; ratio 1 on the first update; a tiny
model learns an easy task; resume replays bit for bit; two torchrun processes stay identical."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama
from nanoseek.train.bpe import padded_vocab, train_bpe
from nanoseek.train.grpo import (
    GRPOConfig,
    GRPOLoss,
    PromptCursor,
    apply_preset,
    completion_logprobs,
    main,
    parse_knobs,
    sequence_logprobs,
)
from nanoseek.train.losses import (
    IGNORE,
    group_advantages,
    grpo_loss_sums,
    k3_kl,
    signal_groups,
)
from nanoseek.train.rollout import Group, training_rows

ROOT = Path(__file__).resolve().parents[1]


def test_group_advantages_by_hand_and_zero_variance_gives_zeros():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    s = math.sqrt(1 / 3)                                        # sample std of [1, 0, 0, 1]
    expected = 0.5 / (s + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([expected, -expected, -expected, expected]))
    assert torch.equal(adv[1], torch.zeros(4)) and not adv.isnan().any()
    assert signal_groups(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).tolist() == [True, False]
    assert torch.equal(group_advantages(torch.tensor([[2.0, 0.0]]), scale=False), torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([[1.0]]))


def test_clipped_loss_with_token_level_sums_by_hand():
    # two completions: 2 tokens with A = +1 (ratios 1.5 and 1.0), 1 token with A = -1 (ratio 1.5)
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [1.5, 1.0]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    sums = grpo_loss_sums(logp, old, torch.tensor([1.0, -1.0]), mask, epsilon=0.2)
    # -min(1.5, 1.2) - min(1.0, 1.0) - min(-1.5, -1.2) = -1.2 - 1.0 + 1.5
    assert math.isclose(sums["loss"].item(), -0.7, abs_tol=1e-6)
    assert sums["clipped"].item() == 1.0                         # only the A>0, ρ>1.2 token is clipped
    high = grpo_loss_sums(logp, old, torch.tensor([1.0, -1.0]), mask, epsilon=0.2, epsilon_high=0.6)
    assert math.isclose(high["loss"].item(), -1.5 - 1.0 + 1.5, abs_tol=1e-6)


def test_k3_kl_by_hand_and_in_the_loss():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert math.isclose(k3_kl(logp, ref).item(), 0.5 - math.log(0.5) - 1, rel_tol=1e-6)
    assert k3_kl(ref, ref).item() == 0.0
    sums = grpo_loss_sums(logp.view(1, 1), logp.view(1, 1), torch.tensor([0.0]), torch.ones(1, 1), beta=0.1,
                          ref_logprobs=ref.view(1, 1))
    assert math.isclose(sums["loss"].item(), 0.1 * (0.5 - math.log(0.5) - 1), rel_tol=1e-5)


def _tiny(tmp_path) -> tuple[Path, Path]:
    """A tiny random Llama with a BPE tokenizer and chat template, and a task whose answer is always 7."""
    texts = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(30) for b in range(30)]
    tok = train_bpe(texts, 300)
    torch.manual_seed(0)
    cfg = tiny_llama(vocab_size=padded_vocab(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(tmp_path / "model", tokenizer=tok)
    task = tmp_path / "seven.jsonl"
    task.write_text("".join(json.dumps({"question": f"Say seven, case {i}", "target": 7}) + "\n" for i in range(120)))
    return tmp_path / "model", task


def _config(model, task, out, **overrides) -> GRPOConfig:
    base = dict(model=str(model), task=str(task), out=str(out), steps=10, group_size=8, prompts_per_step=8,
                max_new_tokens=6, temperature=1.0, lr=1e-2, eval_size=16, eval_every=0, save_every=2,
                keep_last=10, dtype="float32")
    return GRPOConfig(**{**base, **overrides})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("grpo"))


def test_importance_ratio_is_exactly_one_on_the_first_update(tiny):
    from nanoseek.checkpoint import load_model
    from nanoseek.train.loop import Session
    model = load_model(tiny[0]).train()
    g = Group(None, [1, 5, 9], completion_ids=[[20, 21, 1], [22, 1]])
    batches = training_rows([g], torch.tensor([[1.0, -1.0]]), micro_batch_size=2)
    # the prompt but its last token once, then each completion (shortest first) behind that token
    assert batches[0]["input_ids"].tolist() == [[1, 5, 9, 22, 9, 20, 21]]
    assert batches[0]["positions"].tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batches[0]["segments"].tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert batches[0]["labels"].tolist() == [[IGNORE, IGNORE, 22, 1, 20, 21, 1]]
    assert batches[0]["advantages"].tolist() == [[0.0, 0.0, -1.0, -1.0, 1.0, 1.0, 1.0]]
    sequence_logprobs(model, batches, "old_logprobs", Session(torch.device("cpu"), None))   # no gradient
    batch, mask = batches[0], batches[0]["labels"] != IGNORE
    logprobs, _ = completion_logprobs(model, batch)                                             # with gradient
    assert logprobs.requires_grad
    assert torch.equal(torch.exp(logprobs.detach() - batch["old_logprobs"][mask]), torch.ones(5))
    _, stats = GRPOLoss(model, GRPOConfig())(batch, [int(mask.sum())])
    assert stats["metrics"]["clip_fraction"].item() == 0.0
    # ratio 1: the policy term is -A per token, so its mean is -(3·1 - 2·1)/5 (row order: by length)
    assert math.isclose(stats["metrics"]["policy_loss"].item(), -(2 * -1.0 + 3 * 1.0) / 5, rel_tol=1e-6)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_deepseek_v3"])
def test_packed_group_equals_full_sequences_with_their_gradients(preset):
    """training_rows' packs (the prompt once, each completion seeing it and itself) give the
    log-probs and gradients of the G separate prompt + completion sequences."""
    from nanoseek.model import presets
    torch.manual_seed(0)
    model = Transformer(getattr(presets, preset)(vocab_size=64)).train()
    g = Group(None, [3, 7, 11, 2, 5], completion_ids=[[20, 21, 9, 1], [22, 1], [30, 31, 32]])
    (batch,) = training_rows([g], torch.tensor([[1.0, -0.5, 0.25]]), micro_batch_size=4)
    shared, _ = completion_logprobs(model, batch)
    (shared * torch.arange(1.0, shared.numel() + 1)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = []
    for ids in sorted(g.completion_ids, key=len):             # training_rows' row order
        seq = torch.tensor([g.prompt_ids + ids])
        labels = torch.full_like(seq, IGNORE)
        labels[0, len(g.prompt_ids) - 1:-1] = seq[0, len(g.prompt_ids):]
        full.append(completion_logprobs(model, {"input_ids": seq[:, :-1], "labels": labels[:, :-1]})[0])
    full = torch.cat(full)
    (full * torch.arange(1.0, full.numel() + 1)).sum().backward()
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_few_steps_raise_the_reward_of_a_tiny_model(tiny, tmp_path):
    main(_config(*tiny, tmp_path / "run"))
    rewards = [r["reward_mean"] for r in _records(tmp_path / "run") if "reward_mean" in r]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    rec = _records(tmp_path / "run")[-1]
    for key in ("accuracy", "reward/accuracy_reward", "response_length", "kl", "clip_fraction", "entropy",
                "rollout_s", "train_s", "rollout_tokens_per_s", "eval_accuracy"):
        assert key in rec, key
    assert (tmp_path / "run/samples.jsonl").read_text().count("\n") == 10
    assert {"reward_mean.png", "accuracy.png", "eval_accuracy.png"} <= {p.name for p in (tmp_path / "run/plots").iterdir()}
    import nanoseek
    out = nanoseek.LLM(str(tmp_path / "run/latest"), dtype="float32").generate("Say seven", nanoseek.SamplingParams(max_tokens=4))
    assert out[0].outputs[0].token_ids                               # the checkpoint serves as it is


def test_resume_replays_the_uninterrupted_run_bit_for_bit(tiny, tmp_path):
    main(_config(*tiny, tmp_path / "a", steps=4))
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    shutil.rmtree(tmp_path / "b/checkpoints/step_00000004")
    main(_config(*tiny, tmp_path / "b", steps=4, resume=True))
    for name in ("model.safetensors", "training_state/optimizer.safetensors"):
        a = load_file(str(tmp_path / "a/checkpoints/step_00000004" / name))
        b = load_file(str(tmp_path / "b/checkpoints/step_00000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda recs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in recs]
    assert strip(_records(tmp_path / "a")) == strip(_records(tmp_path / "b"))


def test_two_torchrun_processes_keep_identical_weights(tiny, tmp_path):
    cfg = _config(*tiny, tmp_path / "ddp", steps=2, save_every=2)
    flags = []
    for key, value in vars(cfg).items():
        if isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nanoseek.cli", "train", "grpo", *flags], cwd=ROOT, env=env, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    state = json.loads((tmp_path / "ddp/latest/training_state/state.json").read_text())
    assert state["world_size"] == 2 and len(set(state["replica_checksums"])) == 1


def test_config_helpers():
    assert parse_knobs("digits=2, ops=+") == {"digits": 2, "ops": "+"}
    with pytest.raises(ValueError):
        parse_knobs("digits")
    preset = apply_preset(GRPOConfig(preset="smollm2_addition", steps=3))
    assert preset.task_knobs == "digits=2,ops=+" and preset.steps == 3
    with pytest.raises(ValueError, match="preset"):
        apply_preset(GRPOConfig(preset="nope"))
    cursor = PromptCursor(10, 4, seed=0, rank=1, world_size=2)
    seen = [i for _ in range(5) for i in cursor.next()]
    assert len(seen) == 10 and len(set(seen[:4])) == 4


def test_the_word_problem_preset_names_the_cold_start_it_needs(tmp_path, monkeypatch):
    from nanoseek.train.grpo import main
    monkeypatch.chdir(tmp_path)                    # no runs/speedrun-reasoning here
    with pytest.raises(ValueError, match="starts from the cold-start SFT; `nanoseek speedrun --preset reasoning`"):
        main(GRPOConfig(preset="smollm2_word_problems", out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_parked_rollout_copy_comes_back_as_the_updated_weights():
    """The bf16 rollout copy gives its memory back during the update, then holds the new weights
    and biases (MoE gate buffers included), in bfloat16, and its engine's cache sees the change."""
    from nanoseek.model.presets import tiny_deepseek_v3
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.rollout import park_rollout_model, refresh_rollout_model, rollout_model
    model = Transformer(tiny_deepseek_v3())
    shadow = rollout_model(model, GRPOConfig(rollout_dtype="bfloat16"), torch.device("cpu"))
    versions = [p._version for p in shadow.parameters()]
    park_rollout_model(shadow, model)
    assert all(p.untyped_storage().size() == 0 for p in shadow.parameters())
    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            t.add_(torch.randn_like(t))
    refresh_rollout_model(shadow, model)
    for (name, a), b in zip(shadow.state_dict().items(), model.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b.to(a.dtype)), name
    assert all(p.dtype == torch.bfloat16 for p in shadow.parameters())
    assert all(p._version > v for p, v in zip(shadow.parameters(), versions))
    assert shadow.head.weight is shadow.embed.weight or model.head.weight is not model.embed.weight


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_deepseek_v3"])
def test_an_int8_rollout_copy_requantises_to_the_updated_weights(preset):
    """The int8 rollout copy (fused projections, the tied head, oneDNN-packed handles) parks to
    nothing and refreshes to exactly the integers and outputs a fresh copy of the new weights has."""
    from nanoseek.model import kernels, presets, quant
    from nanoseek.model.quant import QuantLinear, pack_int8_
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.rollout import park_rollout_model, refresh_rollout_model, rollout_model
    torch.manual_seed(0)
    model, cfg, cpu = Transformer(getattr(presets, preset)()), GRPOConfig(rollout_dtype="int8"), torch.device("cpu")
    shadow = rollout_model(model, cfg, cpu)
    packed = kernels.load() and pack_int8_(shadow) > 0                # what the engine does
    layers = [m for m in shadow.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 8 for m in layers) and isinstance(shadow.head, QuantLinear)
    park_rollout_model(shadow, model)
    versions = [p._version for p in shadow.parameters()]
    assert all(m.qweight.numel() == 0 for m in layers)
    assert all(p.untyped_storage().size() == 0 for p in shadow.parameters())
    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            t.add_(0.1 * torch.randn_like(t))
    refresh_rollout_model(shadow, model)
    fresh = rollout_model(model, cfg, cpu)
    assert packed == (kernels.loaded() and pack_int8_(fresh) > 0)
    for (name, a), b in zip(shadow.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p._version > v for p, v in zip(shadow.parameters(), versions))      # the engine sees it
    tokens = torch.tensor([[3], [9], [17]])                           # decode-shaped: the packed path
    with torch.no_grad():
        assert torch.equal(shadow.logits(shadow.hidden_states(tokens)), fresh.logits(fresh.hidden_states(tokens)))


def test_an_update_on_the_rollout_copys_bf16_casts_equals_autocasts_bit_for_bit():
    """share_casts (the forward takes nn.Linear weights' bf16 casts from the bf16 rollout copy) gives
    the loss and float32 gradients of plain autocast, bit for bit, and the copy gets no gradient."""
    from nanoseek.model.presets import tiny_llama
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.rollout import rollout_model
    torch.manual_seed(0)
    model = Transformer(tiny_llama(vocab_size=64)).train()
    copy = rollout_model(model, GRPOConfig(rollout_dtype="bfloat16"), torch.device("cpu"))
    g = Group(None, [3, 7, 11, 2, 5], completion_ids=[[20, 21, 9, 1], [22, 1], [30, 31, 32]])
    (batch,) = training_rows([g], torch.tensor([[1.0, -0.5, 0.25]]), micro_batch_size=4)
    plain, shared = GRPOLoss(model, GRPOConfig()), GRPOLoss(model, GRPOConfig())
    assert shared.share_casts(copy) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    results = []
    for loss_module in (plain, shared):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_module(batch, [9])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert grad.dtype == torch.float32 and torch.equal(grad, results[1][1][name]), name
    assert all(p.grad is None for p in copy.parameters())


SMOLLM2_SHAPES = dict(dim=576, n_heads=9, n_kv_heads=3, head_dim=64, inter_dim=1536, n_layers=1)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_deepseek_v3", "smollm2_shapes"])
def test_an_int4_rollout_copy_requantises_to_the_updated_weights(preset):
    """The int4 rollout copy (auto's choice for rollouts of up to 8 rows on the CPU) refreshes to
    exactly the packed integers, scales and outputs a fresh copy of the new weights has: through
    the C++ kernel where it packs as torch does, through torch's path elsewhere, and layers whose
    shape the kernel refuses (fused, left dense) are refreshed as well."""
    from nanoseek.model import kernels, presets, quant
    from nanoseek.model.quant import QuantLinear
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.rollout import (park_rollout_model, refresh_rollout_model, rollout_dtype, rollout_model,
                                        trims_heap)
    torch.manual_seed(0)
    model = Transformer(presets.tiny_llama(**SMOLLM2_SHAPES) if preset == "smollm2_shapes" else getattr(presets, preset)())
    cfg, cpu = GRPOConfig(group_size=4, prompts_per_step=2), torch.device("cpu")
    assert rollout_dtype(cfg, cpu) == "int4" or not kernels.load()     # 8 rows: int4
    assert quant._fast_int4_pack() or not kernels.load()               # the C++ requantisation is tested
    assert rollout_dtype(GRPOConfig(group_size=8, prompts_per_step=2), cpu) != "int4"
    cfg = GRPOConfig(rollout_dtype="int4")
    shadow = rollout_model(model, cfg, cpu)
    assert not trims_heap(shadow)
    park_rollout_model(shadow, model)                  # its memory to the update
    assert all(t.untyped_storage().size() == 0 for m in shadow.modules() if isinstance(m, QuantLinear)
               for t in (m.qweight4, m.scales_and_zeros))
    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            t.add_(0.1 * torch.randn_like(t))
    refresh_rollout_model(shadow, model)
    fresh = rollout_model(model, cfg, cpu)
    for (name, a), b in zip(shadow.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    if preset == "smollm2_shapes":   # SmolLM2's shapes: every linear int4, most through the C++ kernel
        assert all(not isinstance(m, torch.nn.Linear) for m in shadow.layers.modules())
        assert isinstance(shadow.head, QuantLinear) and shadow.head.bits == 4
    tokens = torch.tensor([[3], [9], [17]])
    with torch.no_grad():
        assert torch.equal(shadow.logits(shadow.hidden_states(tokens)), fresh.logits(fresh.hidden_states(tokens)))
