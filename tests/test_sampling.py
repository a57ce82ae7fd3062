"""Sampling: greedy is argmax; each filter keeps exactly the right support; penalties and the
min_tokens ban match a hand computation; a seeded row ignores the rest of the batch; logprobs are
log_softmax of the raw logits; bad SamplingParams are refused. The C++ kernel, its plain-C++ build
and the torch path draw the very tokens a row-by-row full-sort reference draws from the same uniforms."""

import functools
import math
import shutil

import pytest
import torch

from nanoseek.engine import sampling
from nanoseek.engine.sampling import NO_WEIGHT, SamplerState, SamplingParams, draw_torch, process_logits, sample
from nanoseek.model import kernels

HAVE_CXX = bool(shutil.which("c++") or shutil.which("g++"))


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    """Run `sample` through the torch path or the C++ kernel."""
    if request.param == "kernel":
        if not (HAVE_CXX and kernels.load()):
            pytest.skip("the C++ kernels need a compiler")
    else:
        monkeypatch.setattr(kernels, "loaded", lambda: False)
    return request.param


@pytest.fixture(scope="module", params=["torch", "kernel", "generic"])
def draw_impl(request):
    """`draw`'s implementations: the torch path, the kernel, the kernel built without AVX-512."""
    if request.param == "torch":
        return draw_torch
    if not HAVE_CXX:
        pytest.skip("the C++ kernels need a compiler")
    if request.param == "kernel":
        assert kernels.load(), kernels._state.get("error")
        return torch.ops.nanoseek.sample_rows
    torch.ops.load_library(str(kernels.build(("NANOSEEK_GENERIC", "NANOSEEK_OPS=nanoseek_generic"))))
    return torch.ops.nanoseek_generic.sample_rows

PROBS = torch.tensor([0.06, 0.4, 0.1, 0.25, 0.04, 0.15])     # ranked: 1, 3, 5, 2, 0, 4
LOGITS = PROBS.log()


def states_for(*params, vocab_size=None, **kwargs):
    return [SamplerState(p, [], vocab_size, **kwargs) for p in params]


def support(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def test_greedy_is_argmax_whatever_the_filters(path):
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.9),
              SamplingParams(temperature=1e-6), SamplingParams(temperature=0.0, seed=3),
              SamplingParams(temperature=0.0, logprobs=None), SamplingParams(temperature=0)]
    tokens, logprobs = sample(logits, states_for(*params))
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 6


def test_sample_leaves_the_logits_alone(path):
    logits = torch.randn(3, 20)
    before = logits.clone()
    sample(logits, states_for(SamplingParams(repetition_penalty=1.5, top_k=2), SamplingParams(),
                              SamplingParams(min_p=0.5)))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params, kept", [
    (dict(), {0, 1, 2, 3, 4, 5}),
    (dict(top_k=3), {1, 3, 5}),
    (dict(top_k=-1), {0, 1, 2, 3, 4, 5}),
    (dict(top_p=0.6), {1, 3}),                      # mass before token 5 is 0.65 >= 0.6
    (dict(top_p=0.7), {1, 3, 5}),
    (dict(top_k=3, top_p=0.7), {1, 3}),             # top-p sees the top-3 renormalised: 0.5, 0.31, 0.19
    (dict(min_p=0.3), {1, 3, 5}),                   # p >= 0.3 * 0.4
    (dict(temperature=2.0, min_p=0.4), {1, 3, 5, 2}),  # min-p after temperature: sqrt(p / 0.4) >= 0.4
    (dict(top_p=0.3, min_p=0.0), {1}),              # the best token always stays
    (dict(min_p=1.0), {1}),
])
def test_filters_keep_exactly_the_right_support(params, kept):
    params = SamplingParams(**params)
    processed = process_logits(LOGITS[None], states_for(params))[0]
    assert support(processed) == kept
    inside = sorted(kept)
    assert torch.allclose(processed[inside], LOGITS[inside] / params.temperature)


def test_filters_are_per_row_in_one_batch():
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0, top_k=1), SamplingParams(top_p=0.6),
              SamplingParams(min_p=0.3), SamplingParams()]
    processed = process_logits(LOGITS.expand(len(params), -1), states_for(*params))
    assert [support(row) for row in processed] == [{1, 3, 5}, set(range(6)), {1, 3}, {1, 3, 5}, set(range(6))]


def test_draws_follow_the_filtered_distribution(path):
    rows = 6000
    params = SamplingParams(top_k=4)
    generator = torch.Generator().manual_seed(0)
    tokens, _ = sample(LOGITS.expand(rows, -1), states_for(*[params] * rows), generator)
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float() / rows
    expected = torch.where(torch.isin(torch.arange(6), torch.tensor([1, 3, 5, 2])), PROBS, 0.0)
    assert counts[[0, 4]].sum() == 0
    assert torch.allclose(counts, expected / expected.sum(), atol=0.025)


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, 3.0])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplerState(params, prompt_ids=[0, 1], vocab_size=6)
    processed = process_logits(logits[None], [state])       # builds the counts on the logits' device
    assert torch.equal(processed[0, [0, 1]], torch.tensor([1.0, -2.0]))
    with torch.inference_mode():                            # the engine appends inside inference_mode
        for token in (2, 2, 3):
            state.append(token)
    processed = process_logits(logits[None], [state])[0]
    expected = torch.tensor([
        2.0 / 2,                    # prompt token, positive: divided; presence/frequency skip the prompt
        -1.0 * 2,                   # prompt token, negative: multiplied
        0.5 / 2 - 0.25 * 2 - 0.5,   # generated twice
        -0.5 * 2 - 0.25 * 1 - 0.5,  # generated once
        1.0, 3.0])                  # never seen
    assert torch.allclose(processed, expected)


def test_counts_made_late_include_earlier_tokens():
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    state = SamplerState(params, [], 4)
    state.append(3)
    state.append(3)
    assert process_logits(torch.zeros(1, 4), [state])[0].tolist() == [0.0, 0.0, 0.0, -2.0]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bans_eos_and_stop_token_ids_until_reached(path, ignore_eos):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]])   # eos 9 > stop id 8 > 7
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[8], ignore_eos=ignore_eos)
    state = SamplerState(params, [], 10, eos_token_ids=[9])
    tokens = []
    for _ in range(4):
        token = sample(logits, [state])[0][0]
        state.append(token)
        tokens.append(token)
    assert tokens == [7, 7, 7, 9]
    random = SamplerState(SamplingParams(min_tokens=1, stop_token_ids=[8]), [], 10, eos_token_ids=[9])
    assert support(process_logits(logits, [random])[0]) == set(range(8))


def run_target(target_logits, params, others=None, position=0, batch_size=1):
    """Sample a seeded target row for len(target_logits) steps among random other rows."""
    state = SamplerState(params, [1, 2, 3], 500)
    rng = torch.Generator().manual_seed(position * 100 + batch_size)
    shared = torch.Generator().manual_seed(7)
    tokens = []
    for step_logits in target_logits:
        logits = torch.randn(batch_size, 500, generator=rng) * 3
        logits[position] = step_logits
        states = list(others or [])
        states.insert(position, state)
        token_ids, _ = sample(logits, states, shared)
        for s, token in zip(states, token_ids):
            s.append(token)
        tokens.append(token_ids[position])
    return tokens


def other_rows(n):
    kinds = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=5, top_k=20),
             SamplingParams(top_p=0.5, repetition_penalty=1.3), SamplingParams(min_p=0.1, logprobs=2)]
    return [SamplerState(kinds[i % len(kinds)], [4, 5], 500) for i in range(n)]


def test_a_seeded_request_ignores_the_rest_of_the_batch(path):
    target_logits = torch.randn(12, 500, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, presence_penalty=0.3)
    alone = run_target(target_logits, params)
    assert len(set(alone)) > 3                                   # really random, not argmax every time
    for batch_size, position in [(3, 0), (5, 4), (8, 2)]:
        crowded = run_target(target_logits, params, other_rows(batch_size - 1), position, batch_size)
        assert crowded == alone


def test_seeds_decide_the_draws(path):
    target_logits = torch.zeros(20, 500)
    first = run_target(target_logits, SamplingParams(seed=1))
    assert run_target(target_logits, SamplingParams(seed=1)) == first
    assert run_target(target_logits, SamplingParams(seed=2)) != first
    second_sample = SamplerState(SamplingParams(seed=1), [], 500, index=1)    # the 2nd of n samples: seed + 1
    assert second_sample.seed == 2


def test_unseeded_rows_follow_the_engine_generator(path):
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample(torch.zeros(4, 500), states_for(*[SamplingParams()] * 4), generator)[0]

    assert draw(0) == draw(0) != draw(1)


def test_logprobs_are_log_softmax_of_the_raw_logits(path):
    logits = torch.randn(4, 100) * 3
    params = [SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.5, top_k=10),
              SamplingParams(logprobs=0, seed=0), SamplingParams(), SamplingParams(logprobs=20, temperature=0)]
    states = [SamplerState(p, list(range(50)), 100) for p in params]
    tokens, logprobs = sample(logits, states)
    reference = torch.log_softmax(logits, -1)
    assert logprobs[2] is None
    for i in (0, 1, 3):
        lp = logprobs[i]
        assert lp.token_id == tokens[i]
        assert math.isclose(lp.logprob, reference[i, tokens[i]].item(), abs_tol=1e-5)
        assert lp.rank == int((reference[i] > reference[i, tokens[i]]).sum()) + 1
        top = reference[i].topk(params[i].logprobs)
        assert [t for t, _ in lp.top_logprobs] == top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top_logprobs]), top.values, atol=1e-5)
    assert logprobs[1].top_logprobs == [] and logprobs[3].rank == 1


def test_params_are_normalised():
    params = SamplingParams(stop="###")
    assert params.stop == ["###"] and params.stop_token_ids == []
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3,)).stop == ["a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.1), "min_p"), (dict(n=0), "n must"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"), (dict(stop=[1]), "stop must"), (dict(stop=5), "stop must"),
    (dict(stop=["a", ""]), "empty"), (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(seed="1"), "seed"),
])
def test_bad_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_states_check_the_vocabulary():
    with pytest.raises(ValueError, match="columns"):
        sample(torch.zeros(1, 10), [SamplerState(SamplingParams(), [], 12)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(torch.zeros(1, 10), [SamplerState(SamplingParams(stop_token_ids=[10]), [], 10)])
    with pytest.raises(ValueError, match="sampler states"):
        sample(torch.zeros(2, 10), [SamplerState(SamplingParams(), [], 10)])


def reference_draw(x, temperature, top_k, top_p, min_p, uniform):
    """Row by row the straightforward way: stable-sort the whole row, filter it, float64 probabilities,
    inverse CDF in token-id order. -> (tokens, kept) lists."""
    tokens, kept = [], []
    V = x.shape[1]
    for row, t, k, p, m, u in zip(x.float(), temperature, top_k.tolist(), top_p.tolist(), min_p.tolist(),
                                  uniform.tolist()):
        if t <= 0:
            tokens.append(int(row.argmax()))
            kept.append(1)
            continue
        values, order = (row / t).sort(descending=True, stable=True)        # float32 s, as both paths
        keep = torch.ones(V, dtype=torch.bool)
        if 0 < k < V:
            keep &= values >= values[k - 1]                                  # ties with the k-th stay
        weight = (values - values[0]).double().exp() * keep
        if p < 1:
            keep &= weight.cumsum(0) - weight < p * weight.sum()            # mass before < top_p
            keep[0] = True
        if m > 0:
            keep &= values >= values[0] + torch.tensor(math.log(m), dtype=torch.float32)
        keep &= values - values[0] >= NO_WEIGHT
        probs = torch.zeros(V, dtype=torch.float64)
        probs[order[keep]] = weight[keep]
        cdf = probs.cumsum(0)
        tokens.append(int(torch.searchsorted(cdf, torch.tensor([u * cdf[-1].item()]), right=True)))
        kept.append(int(keep.sum()))
    return tokens, kept


def random_filters(R, V, generator, greedy_every=7):
    temperature = torch.rand(R, generator=generator) * 1.5 + 0.05
    temperature[::greedy_every] = 0.0
    top_k = torch.randint(-1, 60, (R,), generator=generator)
    top_k[::5] = V + 3                                                       # larger than V: all
    top_k[1::9] = 0
    top_k[2::11] = 1
    top_p = torch.rand(R, generator=generator).clamp(0.05, 1.0)
    top_p[::4] = 1.0
    min_p = torch.rand(R, generator=generator) * 0.3
    min_p[::2] = 0.0
    uniform = torch.rand(R, dtype=torch.float64, generator=generator)
    return temperature, top_k, top_p, min_p, uniform


@functools.cache
def reference_case(kind: str, dtype: torch.dtype):
    """Logits of one kind, random filters, and the reference's (tokens, kept), made once per case."""
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    R, V = 64, 3000                                   # V % 16 != 0: the vector loops' tails
    x = torch.randn(R, V, generator=g) * torch.linspace(0.5, 6, R)[:, None]
    if kind == "ties":
        x = (x * 2).round() / 2                       # many equal logits, at every cut
    elif kind == "flat":
        x = x * 0.02                                  # top-p keeps thousands: the deepest levels
    elif kind == "peaked":
        x[:, 7] += 40                                 # one token holds nearly all the mass
    elif kind == "banned":
        x[:, ::3] = float("-inf")                     # min_tokens bans: never drawn
    x = x.to(dtype)
    filters = random_filters(R, V, g)
    return x, filters, reference_draw(x, *filters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "flat", "peaked", "banned"])
def test_draw_matches_the_full_sort_reference(draw_impl, dtype, kind):
    x, filters, (ref_tokens, ref_kept) = reference_case(kind, dtype)
    tokens, kept = draw_impl(x, *filters)
    assert tokens.tolist() == ref_tokens
    assert kept.tolist() == ref_kept
    if kind == "banned":
        assert all(t % 3 for t in ref_tokens)


def test_draw_matches_the_reference_at_full_vocabulary_size(draw_impl):
    g = torch.Generator().manual_seed(3)
    R, V = 8, 49152                                   # SmolLM2's vocabulary
    x = (torch.randn(R, V, generator=g) * 2.5).bfloat16()
    filters = random_filters(R, V, g, greedy_every=5)
    filters[2][:] = 0.95                              # the R1 protocol's top-p on every row
    assert [t.tolist() for t in draw_impl(x, *filters)] == list(reference_draw(x, *filters))


def test_kernel_and_torch_path_sample_the_same_tokens(monkeypatch):
    """A mixed batch through `sample` for several steps: greedy and random rows, seeded and not,
    penalties, a min_tokens ban, logprobs; the same tokens and logprobs either way."""
    if not (HAVE_CXX and kernels.load()):
        pytest.skip("the C++ kernels need a compiler")
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.6, top_p=0.95, seed=1),
             SamplingParams(temperature=0.6, top_p=0.95, seed=1), SamplingParams(top_k=5, min_p=0.05),
             SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
             SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(min_tokens=3, logprobs=3),
             SamplingParams(top_k=100, top_p=0.5, seed=7, logprobs=0)]

    def run(use_kernel):
        monkeypatch.setattr(kernels, "loaded", lambda: use_kernel)
        g = torch.Generator().manual_seed(0)
        states = [SamplerState(p, [1, 2, 3, 40], 700, eos_token_ids=[5], index=i) for i, p in enumerate(kinds)]
        shared = torch.Generator().manual_seed(11)
        steps = []
        for _ in range(6):
            logits = (torch.randn(len(states), 700, generator=g) * 3).bfloat16()
            logits[:, 5] = 20.0                                   # EOS: banned only for min_tokens
            tokens, logprobs = sample(logits, states, shared)
            for state, token in zip(states, tokens):
                state.append(token)
            steps.append((tokens, logprobs))
        return steps

    assert run(True) == run(False)


def test_penalty_tensors_grow_past_their_first_capacity():
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    state = SamplerState(params, prompt_ids=[0], vocab_size=100)
    logits = torch.linspace(-1, 1, 100)[None]
    process_logits(logits, [state])                               # device tensors made, 16 slots
    with torch.inference_mode():
        for token in [*range(10, 50), 10, 10]:
            state.append(token)
    processed = process_logits(logits, [state])[0]
    counts = torch.zeros(100)
    counts[10:50] = 1
    counts[10] = 3
    seen = counts > 0
    seen[0] = True
    expected = torch.where(seen, torch.where(logits[0] > 0, logits[0] / 2.0, logits[0] * 2.0), logits[0])
    expected -= 0.5 * counts + 0.25 * (counts > 0)
    assert torch.allclose(processed, expected)
