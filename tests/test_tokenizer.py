"""Tokenizer against transformers' AutoTokenizer (the oracle) on the embedded SmolLM2 GGUF, folder
loading and saving, streamed detokenisation and <think> splitting."""

import json

import gguf
import numpy as np
import pytest
from tokenizers import processors

from nanoseek.checkpoint import CheckpointError
from nanoseek.tokenizer import StreamDecoder, Tokenizer, split_reasoning

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\n  mixed \r\n", "digits 0 7 42 1234567890 3.14159 1,000,000 -12e-3",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n", "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어 문장", "Café naïve résumé Ünïcödé Ångström ﬁ", "don't I'll we've they'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<think>\nreasoning\n</think>\n\nanswer", "", " ", "a" * 300,
]
CONVERSATION = [
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "17 * 23 = 391."},
    {"role": "user", "content": "And 391 / 17? 🤔"},
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf))


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' tokenizer alone: conftest's hf_smollm2 would load the model too."""
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def reference_ids(reference, text):
    return reference(text, add_special_tokens=False)["input_ids"]


def test_ids_and_decode_match_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference_ids(reference, text), text
        assert ours.decode(ids) == reference.decode(ids) == text, text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.encode("hi", add_special_tokens=True) == reference("hi")["input_ids"]  # SmolLM2 adds no BOS


def test_special_tokens(ours, reference):
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
        (reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == [2] and ours.add_bos_token is False
    assert ours.vocab_size == len(reference) == 49152
    assert ours.id_to_token(ours.token_to_id("<|im_end|>")) == "<|im_end|>"


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, system, add_generation_prompt):
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + CONVERSATION
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=False)
    assert ours.decode(ids) == text


FEATURE_TEMPLATE = """{%- for m in messages -%}
  {%- if m.role == 'tool' %}{% continue %}{% endif -%}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
<|im_start|>{{ m.role }}
{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
{% generation %}{{ m.content | tojson }}{% endgeneration %}
{{ m.extra | default('none') }} {{ bos_token }}{{ eos_token }}{{ strftime_now('%Y') }} {{ custom }}
{%- endfor %}"""


def test_chat_template_features_match_transformers(ours, reference):
    """tojson, raise_exception, loop controls, {% generation %}, None-dropping, reasoning aliases."""
    messages = [{"role": "user", "content": "<b>é</b> \"q\"", "extra": None},
                {"role": "tool", "content": "skipped"},
                {"role": "assistant", "content": "ok", "reasoning": "because"}]
    ours_copy = Tokenizer(ours.backend, bos_token=ours.bos_token, eos_token=ours.eos_token,
                          pad_token=ours.pad_token, unk_token=ours.unk_token, chat_template=FEATURE_TEMPLATE)
    text = ours_copy.apply_chat_template(messages, add_generation_prompt=False, custom=7)
    assert text == reference.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False, custom=7)
    assert "<think>because</think>" in text and '"<b>é</b> \\"q\\""' in text and "skipped" not in text
    with pytest.raises(Exception, match="bad role system"):
        ours_copy.apply_chat_template([{"role": "system", "content": "x"}])


def test_save_pretrained_round_trip(ours, tmp_path):
    ours.save_pretrained(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    again = Tokenizer.from_folder(tmp_path / "tok")
    for text in TEXTS:
        ids = ours.encode(text)
        assert reference_ids(theirs, text) == again.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]
    for generation in (True, False):
        text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation)
        assert theirs.apply_chat_template(CONVERSATION, add_generation_prompt=generation, tokenize=False) == text
        assert again.apply_chat_template(CONVERSATION, add_generation_prompt=generation) == text
    assert (again.bos_token_id, again.eos_token_ids, again.pad_token_id, again.vocab_size) == \
        (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id, ours.vocab_size)


def test_from_folder_optional_files(ours, tmp_path):
    """Named chat templates, chat_template.jinja, special_tokens_map.json, generation_config eos ids,
    and BOS, each as transformers reads them."""
    folder = tmp_path / "tok"
    ours.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    config.update(add_bos_token=True, bos_token={"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
                  chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_folder(folder)
    assert loaded.chat_template == "D" and loaded.eos_token_ids == [2, 0] and loaded.pad_token_id == 2
    # transformers 5 ignores the config's add_bos_token: tokenizer.json's post-processor decides
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs("hi")["input_ids"] == loaded.encode("hi", add_special_tokens=True) == loaded.encode("hi")
    assert not loaded.add_bos_token
    backend = Tokenizer.from_folder(folder).backend
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(folder / "tokenizer.json"))
    loaded, theirs = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs("hi")["input_ids"] == loaded.encode("hi", add_special_tokens=True) == [0] + loaded.encode("hi")
    assert loaded.add_bos_token
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_folder_errors_name_the_file(ours, tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    ours.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder_matches_decode(ours, skip_special_tokens):
    text = "<|im_start|>Emoji 😀👨‍👩‍👧🇫🇷 and 中文字符测试 with naïve café<|im_end|> done 日本語"
    ids = ours.encode(text)
    # the test means something only if some characters really are split across byte-level tokens
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    stream = StreamDecoder(ours, skip_special_tokens=skip_special_tokens)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip_special_tokens)
    assert stream.flush() == ""


def test_stream_decoder_flushes_an_unfinished_character(ours):
    ids = ours.encode("ok 😀")
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids[:-1]]  # stop inside the emoji
    assert "".join(pieces) == "ok"  # the space before the emoji rides in the same token
    assert "".join(pieces) + stream.flush() == ours.decode(ids[:-1])


def write_sentencepiece_gguf(path, with_merges):
    """A tokenizer-only GGUF with a tiny Llama-2-style SentencePiece vocabulary: <unk> <s> </s>, the
    256 byte-fallback tokens, then pieces scored best-first (merges listed, or left to be derived)."""
    pieces = ["▁", "t", "h", "e", "▁t", "he", "▁the", "w", "o", "r", "l", "d", "▁w", "or", "▁wor", "ld", "▁world",
              "1", "2", "12", "▁1", "'", "s", "'s", "é", "中", "▁▁", "▁▁▁▁", "(", ")", "()", "<think>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4])  # 6: byte, 4: user-defined
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    if with_merges:
        writer.add_token_merges(["▁ t", "h e", "▁t he", "▁ w", "o r", "▁w or", "l d", "▁wor ld", "1 2", "▁ 1"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("unused", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("with_merges", [False, True])
def test_sentencepiece_gguf_matches_transformers(tmp_path, with_merges):
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path, with_merges)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours.save_pretrained(tmp_path / "saved")
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert ours.add_bos_token and ours.bos_token_id == 1  # the default for SentencePiece files
    for text in TEXTS + ["the world's 12 (中)", "  the   world", "<think>x"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text)["input_ids"] == saved(text)["input_ids"], text
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
            stream = StreamDecoder(ours, skip_special_tokens=skip)
            streamed = "".join(stream.push(i) for i in ids) + stream.flush()
            assert streamed == ours.decode(ids, skip_special_tokens=skip), text


def test_unsupported_gguf_vocabulary(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="bert.gguf.*tokenizer model 'bert' is not supported"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))


@pytest.mark.parametrize("text, expected", [
    ("<think>\nLet me add.\n</think>\n\nThe answer is 4.", ("Let me add.", "The answer is 4.")),
    ("Let me add.\n</think>\n\nThe answer is 4.", ("Let me add.", "The answer is 4.")),  # <think> was in the prompt
    ("The answer is 4.", (None, "The answer is 4.")),
    ("<think>\nstill thinking", ("still thinking", "")),
    ("<think></think>4", ("", "4")),
    ("lead <think>r</think> tail", ("r", "lead  tail")),
    ("", (None, "")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_custom_tags():
    assert split_reasoning("[a] x [/a] y", think_start="[a]", think_end="[/a]") == ("x", "y")
