"""`nanoseek train sft` end to end on a tiny model: the loss falls on the assistant tokens, the
checkpoint opens in the engine, malformed rows are named by line."""

import json

import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_qwen2
from nanoseek.train.bpe import padded_vocab, train_bpe
from nanoseek.train.sft import SFTConfig, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"<think>{a} + {b} = {a + b}</think> {a + b}"}]}
            for a in range(12) for b in range(12)]
    tok = train_bpe((m["content"] for r in rows for m in r["messages"]), 300)
    torch.manual_seed(0)
    cfg = tiny_qwen2(vocab_size=padded_vocab(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(root / "model", tokenizer=tok)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", data


def _cfg(model, data, out, **overrides):
    return SFTConfig(**{**dict(model=str(model), data=str(data), out=str(out), steps=12, batch_size=8, seq_len=64,
                               lr=3e-3, warmup_steps=2, save_every=12, dtype="float32", peak_tflops=1.0),
                        **overrides})


def test_sft_run_learns_and_serves(tiny, tmp_path):
    main(_cfg(*tiny, tmp_path / "run"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.8
    import nanoseek
    llm = nanoseek.LLM(str(tmp_path / "run/latest"), dtype="float32")
    out = llm.chat([{"role": "user", "content": "What is 3 + 4?"}], nanoseek.SamplingParams(max_tokens=8))
    assert out[0].outputs[0].token_ids


def test_malformed_row_is_named_by_line_or_skipped(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = tiny[1].read_text().splitlines()[:20]
    lines.insert(4, '{"messages": "not a list"}')
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:5"):
        main(_cfg(tiny[0], bad, tmp_path / "a", steps=1))
    main(_cfg(tiny[0], bad, tmp_path / "b", steps=1, skip_bad_rows=True))
    assert json.loads((tmp_path / "b/metrics.jsonl").read_text().splitlines()[0])["data_skipped_rows"] == 1
