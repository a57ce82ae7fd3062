"""Engine correctness: batched == one-at-a-time == full-forward greedy; seeds, stops, logprobs,
preemption, aborts, prefix caching, n > 1, weight updates."""

import os
import platform
import shutil
import sys

import pytest
import torch
from reference import GREEDY, full_forward_greedy
from reference import run as run_requests

from nanoseek.engine.engine import Engine, EngineConfig, keep_freed_memory, row_width
from nanoseek.engine.kv_cache import DecodeMirror
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama
from nanoseek.model.quant import quantize_


def run(engine, requests, stagger=False):
    """{id: generated token ids}; see reference.run."""
    return run_requests(engine, requests, stagger)[0]


@pytest.fixture(scope="module", params=["deepseek_v3", "llama"])
def model(request):
    torch.manual_seed(0)
    cfg = tiny_deepseek_v3() if request.param == "deepseek_v3" else tiny_llama()
    return Transformer(cfg).eval()


def prompts(k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


def test_batched_equals_single_equals_full_forward(model):
    ps = prompts()
    requests = {str(i): (p, SamplingParams(max_tokens=5 + 3 * i, **GREEDY)) for i, p in enumerate(ps)}
    batched = run(Engine(model, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=24)),
                  requests, stagger=True)
    for rid, (prompt, params) in requests.items():
        alone = run(Engine(model, EngineConfig(num_blocks=64, block_size=4)), {rid: (prompt, params)})[rid]
        assert batched[rid] == alone == full_forward_greedy(model, prompt, params.max_tokens)


def test_prefill_chunks_split_into_narrow_rows_keep_output(model):
    # lengths 17..90 in one step: the rows are 16 or 32 wide, so longer chunks span several rows
    lengths = [17, 90, 35, 70, 20]
    assert row_width(lengths, [0] * 5) < max(lengths)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(2, 256, (n,), generator=g).tolist() for n in lengths]
    requests = {str(i): (p, SamplingParams(max_tokens=4, **GREEDY)) for i, p in enumerate(ps)}
    out = run(Engine(model, EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=512)), requests)
    for rid, (prompt, params) in requests.items():
        assert out[rid] == full_forward_greedy(model, prompt, params.max_tokens)


def test_row_width_pads_little_and_keeps_one_long_chunk_whole():
    assert row_width([1, 1, 1], [10, 20, 30]) == 1                    # decodes
    assert row_width([1000], [0]) == 1000                              # one long prompt: one row
    lengths = [56, 59, 65, 68, 69, 71, 74, 76, 81, 83, 84, 86]         # GSM8K prompts
    width = row_width(lengths, [0] * len(lengths))
    padded = sum(-(-n // width) * width for n in lengths)
    assert padded < 1.15 * sum(lengths) and padded < len(lengths) * max(lengths)


def test_decode_mirror_rebuilds_keep_output(model, monkeypatch):
    # rows join every step and finish at different lengths; 3 tokens of headroom force growth rebuilds
    from nanoseek.engine.kv_cache import DecodeMirror
    monkeypatch.setattr(DecodeMirror, "HEADROOM", 3)
    ps = prompts(4, seed=2)
    requests = {str(i): (p, SamplingParams(max_tokens=6 + 5 * i, **GREEDY)) for i, p in enumerate(ps)}
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    rebuilds = []
    rebuild = DecodeMirror._rebuild
    monkeypatch.setattr(DecodeMirror, "_rebuild", lambda self, *a: rebuilds.append(1) or rebuild(self, *a))
    mirrored = run(engine, requests, stagger=True)
    assert len(rebuilds) > len(requests)
    assert engine.mirror.tensors == []                    # no decode batch left: the copy is dropped
    plain = run(Engine(model, EngineConfig(num_blocks=64, block_size=4, mirror_decode=False)), requests, stagger=True)
    assert mirrored == plain
    for rid, (prompt, params) in requests.items():
        assert mirrored[rid] == full_forward_greedy(model, prompt, params.max_tokens)


def test_preemption_under_a_tiny_block_budget_keeps_output(model):
    ps = prompts(5, seed=1)
    requests = {str(i): (p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(ps)}
    roomy = run(Engine(model, EngineConfig(num_blocks=100, block_size=4)), requests)
    tight_engine = Engine(model, EngineConfig(num_blocks=14, block_size=4, enable_prefix_caching=False))
    tight = run(tight_engine, requests)
    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy
    assert tight_engine.pool.num_free == 14


def test_abort_returns_every_block():
    model = Transformer(tiny_llama()).eval()
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    for i, p in enumerate(prompts(4)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    for i in range(4):
        engine.abort(str(i))
    assert not engine.has_unfinished() and engine.pool.num_free == 32


def test_prefix_hits_are_counted_and_change_nothing():
    model = Transformer(tiny_deepseek_v3()).eval()
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    shared = list(range(10, 30))                                 # 20 tokens = 5 full blocks
    first = run(engine, {"a": (shared + [7, 8], SamplingParams(max_tokens=6, **GREEDY))})["a"]
    engine.add_request("b", shared + [7, 8], SamplingParams(max_tokens=6, **GREEDY))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[0].num_cached_tokens == 20                      # all full blocks of the prompt
    assert [t for o in outs for t in o.new_token_ids] == first
    engine.reset_prefix_cache()
    engine.add_request("c", shared + [7, 8], SamplingParams(max_tokens=1, **GREEDY))
    assert engine.step()[0].num_cached_tokens == 0


def test_weight_update_in_place_invalidates_prefix_cache():
    model = Transformer(tiny_llama()).eval()
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    prompt = list(range(3, 20))
    run(engine, {"a": (prompt, SamplingParams(max_tokens=2, **GREEDY))})
    with torch.no_grad():
        model.layers[0].attn.wq.weight.mul_(1.5)                 # a GRPO step, in place
    engine.add_request("b", prompt, SamplingParams(max_tokens=3, **GREEDY))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[0].num_cached_tokens == 0
    assert [o.new_token_ids[0] for o in outs] == full_forward_greedy(model, prompt, 3)


def test_n_samples_share_the_prompt_blocks():
    model = Transformer(tiny_llama()).eval()
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    prompt = list(range(3, 23))
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=5, ignore_eos=True))
    hits, tokens = {}, {0: [], 1: [], 2: []}
    while engine.has_unfinished():
        for out in engine.step():
            hits[out.index] = out.num_cached_tokens
            tokens[out.index].extend(out.new_token_ids)
    assert hits[0] == 0 and hits[1] == hits[2] == 16             # siblings reuse the 4 full prompt blocks
    assert all(len(t) == 4 for t in tokens.values())


def test_seeded_sampling_is_independent_of_the_batch():
    model = Transformer(tiny_deepseek_v3()).eval()
    target = (list(range(5, 17)), SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10,
                                                 ignore_eos=True))
    alone = run(Engine(model, EngineConfig(num_blocks=64, block_size=4)), {"t": target})["t"]
    others = {str(i): (p, SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True))
              for i, p in enumerate(prompts(4, seed=3))}
    crowded = run(Engine(model, EngineConfig(num_blocks=64, block_size=4), seed=99), {**others, "t": target},
                  stagger=True)["t"]
    assert crowded == alone


def test_stop_token_ids_eos_max_tokens_and_min_tokens():
    model = Transformer(tiny_deepseek_v3()).eval()
    prompt = list(range(3, 15))
    greedy = full_forward_greedy(model, prompt, 8)
    firsts = [i for i in range(8) if greedy[i] not in greedy[:i]]     # where a token shows up first
    k_eos, k_stop = firsts[0], firsts[-1]
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4), eos_token_ids=[greedy[k_eos]])
    engine.add_request("eos", prompt, SamplingParams(max_tokens=8, temperature=0))
    engine.add_request("stop_id", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                         stop_token_ids=[greedy[k_stop]]))
    engine.add_request("len", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.add_request("min", prompt, SamplingParams(max_tokens=8, temperature=0, min_tokens=5))
    tokens, reasons = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert tokens["eos"] == greedy[:k_eos + 1] and reasons["eos"] == "stop"
    assert tokens["stop_id"] == greedy[:k_stop + 1] and reasons["stop_id"] == "stop"
    assert tokens["len"] == greedy[:3] and reasons["len"] == "length"
    assert len(tokens["min"]) >= 5 and greedy[k_eos] not in tokens["min"][:5]


def test_logprobs_equal_log_softmax_of_a_full_forward():
    model = Transformer(tiny_deepseek_v3()).eval()
    prompt = list(range(3, 15))
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    engine.add_request("r", prompt, SamplingParams(max_tokens=4, temperature=0.8, seed=3, logprobs=3,
                                                   ignore_eos=True))
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + tokens])).float(), -1)[0]
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        row = full[len(prompt) - 1 + i]
        assert abs(_chosen_logprob(lp) - row[token].item()) < 1e-4
        top = row.topk(3)
        assert [t for t, _ in _top(lp)] == top.indices.tolist()


@pytest.mark.parametrize("preset", [tiny_llama, tiny_deepseek_v3])
def test_bfloat16_lone_row_decodes_with_a_float32_mirror(preset):
    torch.manual_seed(0)
    model = Transformer(preset()).eval().to(torch.bfloat16)
    prompt = list(range(3, 15))
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    engine.add_request("r", prompt, SamplingParams(max_tokens=6, logprobs=1, **GREEDY))
    tokens, logprobs, mirrored = [], [], 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
        if engine.mirror.tensors:
            assert engine.mirror.tensors[0][0].dtype == torch.float32      # one row: float32 attention
            mirrored += 1
    assert mirrored >= 4
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + tokens])).float(), -1)[0]
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        assert abs(_chosen_logprob(lp) - full[len(prompt) - 1 + i, token].item()) < 0.05


def _chosen_logprob(lp):
    return lp.logprob if hasattr(lp, "logprob") else lp[0]


def _top(lp):
    return lp.top_logprobs if hasattr(lp, "top_logprobs") else lp[1]


def test_bad_requests_are_rejected_cleanly():
    engine = Engine(Transformer(tiny_llama()).eval(), EngineConfig(num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("b", [1, 999999], SamplingParams())
    with pytest.raises(ValueError, match="blocks"):
        engine.add_request("c", list(range(3, 200)), SamplingParams())
    assert not engine.has_unfinished()


CXX = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.slow
@CXX
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_compiled_engine_equals_eager_greedy_and_never_recompiles(monkeypatch, bits):
    # head_dim 12 equals the decode mirror's first capacity (7-token warm-up prompts + HEADROOM 3,
    # in blocks of 4): with duck sizing that coincidence made capacity a constant and each mirror
    # rebuild recompiled. int4 layers add a shape class (int8 kernels above 8 rows); small
    # prefills are padded into the larger one; int8 layers decode on prepacked weights
    # (model/kernels.py), prefills on torch._int_mm. Two layers: both run one compiled block.
    from torch._dynamo.utils import counters
    monkeypatch.setattr(DecodeMirror, "HEADROOM", 3)
    torch._dynamo.reset()          # graphs compiled by an earlier test would cover shapes warm-up missed
    counters.clear()
    torch.manual_seed(0)
    model = Transformer(tiny_llama(n_layers=2, head_dim=12 if bits is None else 16)).eval()
    if bits:
        quantize_(model, bits=bits)
    requests = {str(i): (p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts(4, seed=3))}
    config = dict(num_blocks=64, block_size=4, max_num_batched_tokens=256)   # warm-up prefills in one step
    compiled = Engine(model, EngineConfig(compile=True, **config))
    assert compiled.compiled and compiled.pool.num_free == 64 and not compiled.has_unfinished()   # nothing left behind
    # one graph per shape class for both layers: paged 1 row / several, mirrored 1 / several (/ int8 rows)
    assert counters["frames"]["ok"] == (5 if bits == 4 else 4)
    eager = Engine(model, EngineConfig(**config))
    # a lone row of 24 tokens (warm-up's lone prefill had 7), its mirror rebuilt at new capacities
    alone = {"solo": (list(range(2, 26)), SamplingParams(max_tokens=12, **GREEDY))}
    short = {"short": ([5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))}      # one block: padded to two
    with torch._dynamo.config.patch(error_on_recompile=True):      # warm-up covered every shape class
        assert run(compiled, alone) == run(eager, alone)
        assert run(compiled, requests, stagger=True) == run(eager, requests, stagger=True)
        assert run(compiled, alone) == run(eager, alone)     # a full prefix hit: a prefill of 1 token
        assert run(compiled, short) == run(eager, short)


@CXX
def test_a_failed_compile_leaves_the_engine_eager_with_one_warning(monkeypatch, caplog):
    from nanoseek.engine import engine as engine_module

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")
    monkeypatch.setattr(engine_module, "compiled_block", lambda: broken)
    torch.manual_seed(0)
    model = Transformer(tiny_llama(n_layers=1)).eval()
    config = dict(num_blocks=64, block_size=4)
    with caplog.at_level("WARNING", logger="nanoseek.engine.engine"):
        engine = Engine(model, EngineConfig(compile=True, **config))
    assert not engine.compiled and engine.pool.num_free == 64 and not engine.has_unfinished()
    assert [r.message for r in caplog.records if "torch.compile failed" in r.message] == \
        ["torch.compile failed, the engine runs eager from now on: RuntimeError: inductor exploded"]
    requests = {str(i): (p, SamplingParams(max_tokens=6, **GREEDY)) for i, p in enumerate(prompts(3, seed=1))}
    assert run(engine, requests) == run(Engine(model, EngineConfig(**config)), requests)


SECOND_START = """
import json, torch
from torch._dynamo.utils import counters
from nanoseek.engine.compiled import cache_counters
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama
torch.manual_seed(0)
Engine(Transformer(tiny_llama(n_layers=2)).eval(), EngineConfig(compile=True, num_blocks=64, block_size=4))
print(json.dumps({**cache_counters(), "frames": counters["frames"]["ok"]}))
"""


@pytest.mark.slow
@CXX
def test_a_second_process_reads_the_compiled_graphs_from_the_disk_cache(tmp_path):
    """Warm-up compiles; a second process with the same cache folder traces again but compiles
    nothing (every inductor graph a cache hit), which is what makes its start short."""
    import json
    import subprocess
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", SECOND_START], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    first, second = runs
    assert first["fxgraph_cache_miss"] == first["frames"] == 4 and first["fxgraph_cache_hit"] == 0
    assert second["fxgraph_cache_miss"] == 0 and second["fxgraph_cache_hit"] == second["frames"] == 4


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory()
