import dataclasses
import re
import time

import pytest
import torch
import transformers

from nanoseek.checkpoint import load_model, load_tokenizer
from nanoseek.cli import GenerateConfig, StreamPrinter, main, summary
from nanoseek.engine.engine import Engine
from nanoseek.engine.llm import CompletionOutput, RequestMetrics, RequestOutput
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random tiny Llama that speaks SmolLM2's vocabulary, saved with its tokenizer."""
    tok = load_tokenizer("smollm2-135m")
    folder = tmp_path_factory.mktemp("tiny")
    Transformer(tiny_llama(vocab_size=tok.vocab_size)).save_pretrained(folder, tokenizer=tok)
    return folder


def test_convert_gguf_writes_a_folder_transformers_loads(tmp_path):
    assert main(["convert", "smollm2-135m", str(tmp_path)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model("smollm2-135m")
    ids = torch.tensor([load_tokenizer(tmp_path).encode("Convert me, please.")])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


def test_generate_streams_text(tiny_folder, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-tokens", "6",
                 "--temperature", "0.8", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert "tokens" in out.err and len(out.out) > 0


def test_chat_single_turn(tiny_folder, capsys):
    assert main(["chat", "--model", str(tiny_folder), "--prompt", "Hi", "--max-tokens", "4"]) == 0
    assert "> Hi" in capsys.readouterr().out


def test_bad_model_is_one_clear_line(capsys):
    assert main(["generate", "--model", "/no/such/folder", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "/no/such/folder" in err and "Traceback" not in err


def test_flags_come_from_the_config_dataclass():
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    assert {"max_tokens", "temperature", "top_p", "seed", "dtype", "device"} <= names
    with pytest.raises(SystemExit):
        main(["generate", "--max-tokens", "not-a-number"])


def test_stream_printer_sets_reasoning_apart():
    class Out:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    out = Out()
    printer = StreamPrinter(out)
    for piece in ["<thi", "nk>let me see", "</th", "ink>Paris"]:   # tags split across pieces
        printer.write(piece)
    assert out.text == "[thinking] let me see\n[answer] Paris"


def test_the_printed_rate_counts_generation_from_the_first_token():
    # 30 s to the first token (prefill, a first kernel build), then 20 more tokens in 2 s
    request = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, token_ids=list(range(21)))],
                           num_cached_tokens=2, metrics=RequestMetrics(100.0, 130.0, 132.0))
    assert summary(request) == "[21 tokens, 10.0 tok/s after the first, first token in 30.00 s, 2 prompt tokens cached]"
    request.outputs[0].token_ids = [7]
    assert "no rate" in summary(request)


def test_a_slow_first_step_stays_out_of_the_printed_rate(tiny_folder, capsys, monkeypatch):
    step, slowed = Engine.step, []

    def slow_first_step(self):             # the prefill step (and any first-call work) takes 2 s longer
        if not slowed:
            time.sleep(2.0)
            slowed.append(True)
        return step(self)

    monkeypatch.setattr(Engine, "step", slow_first_step)
    start = time.perf_counter()
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-tokens", "8"]) == 0
    wall = time.perf_counter() - start
    note = capsys.readouterr().err
    n, rate, first = re.search(r"\[(\d+) tokens, ([\d.]+) tok/s after the first, first token in ([\d.]+) s", note).groups()
    assert float(first) >= 2.0
    assert float(rate) > 2 * int(n) / wall          # the old count: tokens over the whole wall time
