"""load_model / load_tokenizer on the embedded SmolLM2-135M, against transformers reading the same GGUF."""

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import CheckpointError, load_model, load_tokenizer
from nanoseek import LLM, SamplingParams

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.mark.slow
def test_chat_text_ids_and_greedy_tokens_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    hf_model, hf_tok = hf_smollm2
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(hf_ids)
    with torch.no_grad():
        ours = torch.tensor([ids])
        diff = (model(ours) - hf_model(ours).logits).abs().max().item()
        assert diff < 1e-3, diff
        theirs = hf_model.generate(ours, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                   pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    llm = LLM(model, tokenizer=tok)
    mine = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].token_ids
    assert mine == theirs
    assert "Paris" in tok.decode(mine)


def test_save_pretrained_with_tokenizer_round_trips(smollm2, tmp_path):
    model, tok = smollm2
    model.save_pretrained(tmp_path, tokenizer=tok, dtype=torch.bfloat16)
    again, tok2 = load_model(tmp_path), load_tokenizer(tmp_path)
    assert again.embed.weight.dtype == torch.float32          # load dtype is the caller's choice
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max() < 0.5     # bf16 weights, same model
    assert tok2.apply_chat_template(MESSAGES, tokenize=True) == tok.apply_chat_template(MESSAGES, tokenize=True)


def test_unknown_name_and_bad_dtype_are_clear_errors():
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m", dtype="float8")


def test_public_api():
    assert nanoseek.load_model is load_model and nanoseek.Transformer is not None
