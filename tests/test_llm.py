"""The offline API on the embedded SmolLM2: parity with transformers, stop strings, streaming."""

import pytest
import torch

from nanoseek import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 + 30?",
             "Write a haiku about rain.", "Who wrote Romeo and Juliet?", "Say hello in Spanish.",
             "What is the boiling point of water in Celsius?", "List two fruits that are red."]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", dtype="float32", num_blocks=256, block_size=16)


@pytest.mark.slow
def test_batched_greedy_equals_transformers_on_8_prompts(llm, hf_smollm2):
    """A continuously changing batch: a small token budget staggers admissions (chunked prefill
    beside running decodes) and different max_tokens make requests leave at different steps."""
    hf_model, _ = hf_smollm2
    busy = LLM(llm.model, tokenizer=llm.tokenizer, num_blocks=256, block_size=16, max_num_batched_tokens=40)
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = [SamplingParams(temperature=0, max_tokens=12 + 2 * i, ignore_eos=True) for i in range(len(prompts))]
    outs = busy.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        ids = torch.tensor([prompt["prompt_token_ids"]])
        with torch.no_grad():
            want = hf_model.generate(ids, max_new_tokens=p.max_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.token_ids == want
    alone = llm.generate(prompts[3], params[3])[0]                  # one request at a time: the same
    assert alone.token_ids == outs[3].token_ids
    assert "Paris" in outs[0].text


def test_stream_equals_generate_and_stop_strings_are_cut(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": "Count from one to ten in words."}])
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0]
    pieces = [delta for delta, _ in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=40))]
    assert "".join(pieces) == full.text
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.text.endswith(stop)


def test_outputs_carry_what_users_expect(llm):
    outs = llm.chat([{"role": "user", "content": "Hi!"}],
                    SamplingParams(temperature=0.7, seed=1, max_tokens=8, logprobs=2, n=2))
    out = outs[0]
    assert len(out.outputs) == 2 and out.finish_reason in ("stop", "length")
    assert out.content == out.text.strip() and out.reasoning_content is None   # SmolLM2 does not think
    assert len(out.logprobs) == len(out.token_ids)
    again = llm.generate({"prompt_token_ids": out.prompt_token_ids},
                         SamplingParams(temperature=0, max_tokens=2))[0]
    assert again.num_cached_tokens > 0 and again.num_cached_tokens % 16 == 0


def test_bad_input_is_rejected_and_engine_stays_usable(llm):
    with pytest.raises(ValueError):
        llm.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": []}])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([{"text": "no ids"}])
    assert not llm.engine.has_unfinished()
    assert llm.generate("Hello", SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_speculative_decoding_through_the_facade(llm):
    """A tiny random MTP model with SmolLM2's tokenizer: same text with and without speculation."""
    from nanoseek.model import Transformer
    from nanoseek.model.presets import tiny_deepseek_v3
    model = Transformer(tiny_deepseek_v3(vocab_size=llm.tokenizer.vocab_size, n_mtp_layers=1)).eval()
    plain = LLM(model, tokenizer=llm.tokenizer, num_blocks=64)
    spec = LLM(model, tokenizer=llm.tokenizer, num_blocks=64, num_speculative_tokens=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a, b = plain.generate("Once upon a time", params)[0], spec.generate("Once upon a time", params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert b.num_draft_tokens > 0 and 0.0 <= b.acceptance_rate <= 1.0
    assert a.acceptance_rate is None


# ---------------------------------------------------------------- the default configuration (issue 11)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from test_gguf import write_tiny_gguf  # noqa: E402

from nanoseek.engine.llm import _default_compile, _default_quantization  # noqa: E402
from nanoseek.model.quant import QuantLinear  # noqa: E402


@pytest.mark.parametrize("qtype, dtype, expected", [
    (Q.Q4_1, "bfloat16", "int4"), (Q.Q4_0, "bfloat16", "int4"), (Q.Q4_K, "bfloat16", "int4"),
    (Q.Q8_0, "bfloat16", None), (Q.F16, "bfloat16", None), (Q.F32, "bfloat16", None),
    (Q.Q4_1, "float32", None)])            # the int4 kernels compute in bfloat16: float32 stays exact
def test_auto_quantization_follows_the_gguf_weights(tmp_path, qtype, dtype, expected):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_tiny_gguf(path, qtype)
    assert _default_quantization(str(path), "cpu", dtype, "auto")[0] == expected
    assert _default_quantization(str(path), "cuda", dtype, "auto")[0] is None
    assert _default_quantization(str(path), "cpu", dtype, "none")[0] is None      # the opt-out
    assert _default_quantization(str(path), "cpu", dtype, "int8")[0] == "int8"


def test_auto_keeps_float_folders_and_model_objects(tmp_path):
    from nanoseek.model import Transformer
    from nanoseek.model.presets import tiny_llama
    model = Transformer(tiny_llama())
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert _default_quantization(str(tmp_path / "bf16"), "cpu", "bfloat16", "auto")[0] is None
    assert _default_quantization(model, "cpu", "bfloat16", "auto") == (None, "a model object is never quantised unasked")
    with pytest.raises(ValueError, match="auto | none | int4 | int8"):
        _default_quantization(model, "cpu", "bfloat16", "fp8")


def test_default_llm_runs_the_q4_gguf_on_int4_and_says_so(capsys):
    llm = LLM("smollm2-135m", dtype="bfloat16", num_blocks=64)
    assert isinstance(llm.model.head, QuantLinear) and isinstance(llm.model.layers[0].attn.wqkv, QuantLinear)
    printed = capsys.readouterr().err
    assert printed.count("nanoseek: smollm2-135m: bfloat16 on cpu, int4 linears (the GGUF's own Q4_1 weights)") == 1
    assert "C++ kernels on, compiled (int4 / int8 on the CPU)" in printed and llm.engine.compiled
    assert "nanoseek: compiling the forward for batches of 1 (1/3" in printed         # progress while it compiles
    out = llm.generate(["What is 12 + 30?"], SamplingParams(max_tokens=8))[0]
    assert len(out.token_ids) == 8 or out.finish_reason == "stop"
    plain = LLM("smollm2-135m", dtype="bfloat16", quantization="none", num_blocks=64, verbose=False)
    assert not isinstance(plain.model.head, QuantLinear) and capsys.readouterr().err == ""


def test_auto_compiles_the_cpu_kernels_path_only(monkeypatch):
    """compile="auto" is on where it was measured to pay (int4 / int8 on the CPU, a C++ compiler
    present); explicit choices win; anything else is refused."""
    import nanoseek.engine.llm as llm_module
    monkeypatch.setattr(llm_module.shutil, "which", lambda name: "/usr/bin/" + name)
    assert _default_compile("auto", "cpu", "int4") == (True, "int4 / int8 on the CPU")
    assert _default_compile("auto", "cpu", "int8")[0]
    assert _default_compile("auto", "cpu", None) == (False, "measured only for int4 / int8 on the CPU")
    assert not _default_compile("auto", "cuda", None)[0]
    assert _default_compile("off", "cpu", "int4") == (False, "asked for")
    assert _default_compile(True, "cpu", None) == (True, "asked for") and _default_compile("on", "cpu", None)[0]
    monkeypatch.setattr(llm_module.shutil, "which", lambda name: None)
    assert _default_compile("auto", "cpu", "int4") == (False, "inductor needs a C++ compiler: none found")
    with pytest.raises(ValueError, match="auto | on | off"):
        _default_compile("fast", "cpu", "int4")
