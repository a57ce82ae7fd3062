"""MTP speculative decoding: greedy output unchanged (vs plain engine and full forward), acceptance
accounting, drafts that are right get accepted, stops inside accepted runs, mixed batches,
preemption, and the MTP cache against the training-form MTP chain."""

import pytest
import torch

from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.speculative import MTPSpeculator
from nanoseek.model import Transformer
from nanoseek.model.cache import DenseCache
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama

from reference import GREEDY, full_forward_greedy, run


def prompts(k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


@pytest.fixture(scope="module", params=[1, 2], ids=["mtp1", "mtp2"])
def model(request):
    torch.manual_seed(0)
    return Transformer(tiny_deepseek_v3(n_mtp_layers=request.param)).eval()


def oracle_drafts(monkeypatch, references):
    """Replace every draft by the true greedy continuation: {request_id: full greedy output}."""
    propose = MTPSpeculator.propose

    def patched(self, seqs, finishing):
        propose(self, seqs, finishing)
        for seq in seqs:
            state = self.states.get(seq)
            if state and state.drafts:
                done = seq.num_output_tokens
                state.drafts = references[seq.request_id][done: done + len(state.drafts)]
    monkeypatch.setattr(MTPSpeculator, "propose", patched)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_is_unchanged_in_a_staggered_batch(model, k):
    requests = {str(i): (p, SamplingParams(max_tokens=4 + 3 * i, **GREEDY)) for i, p in enumerate(prompts())}
    config = dict(num_blocks=64, block_size=4, max_num_batched_tokens=24)
    plain, _, _ = run(Engine(model, EngineConfig(**config)), requests, stagger=True)
    engine = Engine(model, EngineConfig(**config, num_speculative_tokens=k))
    spec, outs, _ = run(engine, requests, stagger=True)
    for rid, (prompt, params) in requests.items():
        assert spec[rid] == plain[rid] == full_forward_greedy(model, prompt, params.max_tokens)
    stats = engine.spec_stats
    assert 0 < stats.num_steps and stats.num_accepted_tokens <= stats.num_draft_tokens <= k * stats.num_steps
    assert stats.num_emitted_tokens == stats.num_accepted_tokens + stats.num_steps     # ignore_eos: a bonus each step
    for rid, steps in outs.items():
        for out in steps:
            assert out.num_accepted_tokens <= out.num_draft_tokens <= k
            assert len(out.new_token_ids) == out.num_accepted_tokens + 1
    assert engine.pool.num_free == 64 and not engine.speculator.states


@pytest.mark.parametrize("k", [1, 2])
def test_preemption_under_a_tiny_block_budget_keeps_output(model, k):
    requests = {str(i): (p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts(5, seed=1))}
    roomy, _, _ = run(Engine(model, EngineConfig(num_blocks=100, block_size=4)), requests)
    tight = Engine(model, EngineConfig(num_blocks=14, block_size=4, enable_prefix_caching=False,
                                       num_speculative_tokens=k))
    assert run(tight, requests)[0] == roomy
    assert tight.scheduler.num_preemptions > 0 and tight.pool.num_free == 14


@pytest.mark.parametrize("k", [2, 4])
def test_right_drafts_are_all_accepted_and_save_steps(model, monkeypatch, k):
    requests = {str(i): (p, SamplingParams(max_tokens=13, **GREEDY)) for i, p in enumerate(prompts(3, seed=2))}
    references = {rid: full_forward_greedy(model, p, 13) for rid, (p, _) in requests.items()}
    _, _, plain_steps = run(Engine(model, EngineConfig(num_blocks=64, block_size=4)), requests)
    oracle_drafts(monkeypatch, references)
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, num_speculative_tokens=k))
    tokens, outs, steps = run(engine, requests)
    assert tokens == references
    stats = engine.spec_stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    assert steps == 1 + -(-12 // (k + 1)) < plain_steps           # prefill + ceil(12 / (k + 1)) decode steps
    for rid in requests:                                            # the run is cut to fit max_tokens exactly
        assert outs[rid][-1].finish_reason == "length" and len(tokens[rid]) == 13


def copying_model(n_mtp_layers):
    """A model whose next token depends on the current one only (every block's output zeroed), with MTP
    modules that pass Emb(t_{i+k}) straight through: module k's pick at i is the model's pick at i + k."""
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3(n_mtp_layers=n_mtp_layers)).eval()
    with torch.no_grad():
        for block in [*model.layers, *(m.block for m in model.mtp)]:
            block.attn.wo.weight.zero_()
            mlps = [block.ffn] if not hasattr(block.ffn, "experts") else [*block.ffn.experts, block.ffn.shared_experts]
            for mlp in mlps:
                mlp.w2.weight.zero_()
        for module in model.mtp:
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, :model.cfg.dim] = torch.eye(model.cfg.dim)   # enorm(Emb(t_{i+k})) half
    return model


@pytest.mark.parametrize("n_mtp_layers,k", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_mtp_modules_that_copy_the_model_are_always_accepted(n_mtp_layers, k):
    model = copying_model(n_mtp_layers)
    requests = {str(i): (p, SamplingParams(max_tokens=10, **GREEDY)) for i, p in enumerate(prompts(3, seed=3))}
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, num_speculative_tokens=k))
    tokens, _, steps = run(engine, requests)
    assert tokens == {rid: full_forward_greedy(model, p, 10) for rid, (p, _) in requests.items()}
    assert engine.spec_stats.acceptance_rate == 1.0 and steps == 1 + -(-9 // (k + 1))


def test_eos_and_stop_ids_inside_accepted_drafts_end_there(model, monkeypatch):
    prompt, k = list(range(3, 15)), 3
    greedy = full_forward_greedy(model, prompt, 12)
    # decode steps emit outputs 1-4, 5-8, ...: positions 1-3, 5-7 are drafts, 4, 8 picks past them
    on_draft = [m for m in range(1, 12) if m % (k + 1) and greedy[m] not in greedy[:m]]
    m_eos, m_stop = on_draft[0], on_draft[-1]
    oracle_drafts(monkeypatch, {"eos": greedy, "stop": greedy})
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, num_speculative_tokens=k),
                    eos_token_ids=[greedy[m_eos]])
    requests = {"eos": (prompt, SamplingParams(max_tokens=12, temperature=0)),
                "stop": (prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[greedy[m_stop]]))}
    tokens, outs, _ = run(engine, requests)
    assert tokens["eos"] == greedy[:m_eos + 1] and outs["eos"][-1].finish_reason == "stop"
    assert tokens["stop"] == greedy[:m_stop + 1] and outs["stop"][-1].finish_reason == "stop"
    last = outs["eos"][-1]
    assert last.new_token_ids[-1] == greedy[m_eos] and last.num_accepted_tokens == len(last.new_token_ids)
    assert engine.pool.num_free == 64


def test_max_model_len_inside_an_accepted_run(model, monkeypatch):
    prompt = list(range(3, 15))
    greedy = full_forward_greedy(model, prompt, 7)
    oracle_drafts(monkeypatch, {"r": greedy})
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, num_speculative_tokens=3, max_model_len=19))
    tokens, outs, _ = run(engine, {"r": (prompt, SamplingParams(max_tokens=None, **GREEDY))})
    assert tokens["r"] == greedy and outs["r"][-1].finish_reason == "length"


def test_sampled_requests_decode_normally_beside_speculated_ones(model):
    ps = prompts(4, seed=4)
    requests = {"g0": (ps[0], SamplingParams(max_tokens=9, **GREEDY)),
                "g1": (ps[1], SamplingParams(max_tokens=7, repetition_penalty=1.3, logprobs=2, **GREEDY)),
                "s0": (ps[2], SamplingParams(max_tokens=8, temperature=0.9, seed=7, ignore_eos=True)),
                "s1": (ps[3], SamplingParams(max_tokens=6, temperature=1.0, top_k=20, seed=8, ignore_eos=True))}
    plain, plain_outs, _ = run(Engine(model, EngineConfig(num_blocks=64, block_size=4)), requests, stagger=True)
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, num_speculative_tokens=2))
    spec, outs, _ = run(engine, requests, stagger=True)
    assert spec == plain
    assert all(o.num_draft_tokens == 0 and len(o.new_token_ids) == 1 for rid in ("s0", "s1") for o in outs[rid])
    assert all(o.num_draft_tokens > 0 for o in outs["g0"][1:-1])
    logprobs = lambda steps: [(lp.token_id, round(lp.logprob, 4)) for o in steps for lp in o.new_logprobs]
    assert logprobs(outs["g1"]) == logprobs(plain_outs["g1"]) and len(logprobs(outs["g1"])) == 7


def reference_mtp(model, ids, k):
    """From scratch, in one DenseCache: the MTP layers' entries of the training-form chain over ids
    (module j at p reads t_{p+j}), and the k drafts the chain + reuse give from the last position."""
    T, K, L = len(ids), min(k, model.cfg.n_mtp_layers), model.cfg.n_layers
    cache, ext = DenseCache(model.cfg, 1, T + k), list(ids)
    pos = torch.arange(T - 1).unsqueeze(0)
    with torch.no_grad():
        h = model.norm(model.hidden_states(torch.tensor([ids]), torch.arange(T).unsqueeze(0), cache))[:, :T - 1]
        for j in range(1, K + 1):
            logits, h = model.mtp_forward(j, h, torch.tensor([ext[j: j + T - 1]]), pos, cache)
            ext.append(int(logits[0, -1].argmax()))
        entries = [cache.buffers[L + j][0][0].clone() for j in range(model.cfg.n_mtp_layers)]
        for extra in range(1, k - K + 1):
            logits, h = model.mtp_forward(K, h[:, -1:], torch.tensor([[ext[-1]]]), torch.tensor([[T - 2 + extra]]),
                                          cache)
            ext.append(int(logits[0, -1].argmax()))
    return entries, ext[T:]


def engine_mtp_cache(engine, seq, n_positions):
    bs, L = engine.pool.block_size, engine.model.cfg.n_layers
    slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n_positions)])
    return [engine.pool.read(L + j, 0, slots) for j in range(engine.model.cfg.n_mtp_layers)]


def test_mtp_cache_and_drafts_match_a_from_scratch_chain(model, monkeypatch):
    """A sampled request fills the prefix cache; a greedy one with another tail hits it, and with drafts
    made partly right (0..k accepted) its MTP cache and real drafts match a from-scratch run every step."""
    k, shared = 3, list(range(10, 30))                              # 5 full blocks
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8,
                                         num_speculative_tokens=k))
    run(engine, {"a": (shared + [7, 8], SamplingParams(max_tokens=5, temperature=1.0, seed=1))})
    prompt = shared + [40, 41, 42]
    greedy, real = full_forward_greedy(model, prompt, 24), []
    propose = MTPSpeculator.propose

    def patched(self, seqs, finishing):                             # keep the real drafts, verify others
        propose(self, seqs, finishing)
        for seq in seqs:
            state = self.states[seq]
            if state.drafts:
                real.append(state.drafts)
                done, right = seq.num_output_tokens, len(real) % (len(state.drafts) + 1)
                truth = greedy[done: done + len(state.drafts)]
                state.drafts = truth[:right] + [(t + 1) % 256 for t in truth[right:]]
    monkeypatch.setattr(MTPSpeculator, "propose", patched)
    engine.add_request("b", prompt, SamplingParams(max_tokens=24, **GREEDY))
    seq, tokens, checked = engine.requests["b"][0], [], 0
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
        state = engine.speculator.states.get(seq)
        if state is None or not state.drafts:
            continue
        assert seq.num_cached_tokens == 16                          # the hit's last block is recomputed
        assert state.start >= len(seq.token_ids) - model.cfg.n_mtp_layers - 1
        want, drafts = reference_mtp(model, seq.token_ids, k)
        for got, ref in zip(engine_mtp_cache(engine, seq, state.start), want):
            assert torch.allclose(got, ref[:state.start], atol=1e-5)
        assert real[-1] == drafts[:len(real[-1])]                   # fewer near max_tokens
        checked += 1
    assert tokens == greedy and checked >= 5
    assert 0 < engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens


def test_speculation_needs_mtp_layers():
    with pytest.raises(ValueError, match="MTP"):
        Engine(Transformer(tiny_llama()).eval(), EngineConfig(num_blocks=8, num_speculative_tokens=2))
