"""Incremental detokenizer on SmolLM2's tokenizer: multi-byte characters split over tokens, stop
strings spanning tokens (cut, or kept with include_stop_str_in_output), held-back stop prefixes
never taken back, min_tokens, and pushes + flush == text."""

import pytest

from nanoseek.checkpoint import load_tokenizer
from nanoseek.engine.detokenizer import IncrementalDetokenizer
from nanoseek.engine.sampling import SamplingParams

TEXTS = [
    "Hello world, this is a test.",
    "emoji 😀🎉 and 中文字符 ok",                       # 😀 and 🎉 are split over three tokens each
    "The answer is 42.\n\nUser: next question 👨‍👩‍👧 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def run(tok, text_or_ids, prompt_ids=None, **params):
    """Push every token until a stop; returns (pieces returned by push, flush's piece, detokenizer)."""
    ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    detok = IncrementalDetokenizer(tok, SamplingParams(**params), prompt_ids)
    pieces = []
    for token in ids:
        pieces.append(detok.push(token))
        if detok.stopped:
            break
    return pieces, detok.flush(), detok


def expected_text(text, stops, include):
    """The stop that ends first (ties: the longer) cuts the full text, before it or after it."""
    hits = [(text.find(s) + len(s), -len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, _, start, stop = min(hits)
    return text[:end if include else start], stop


@pytest.mark.parametrize("text", TEXTS)
def test_without_stops_the_pieces_are_the_decoded_text(tok, text):
    pieces, tail, detok = run(tok, text)
    assert "".join(pieces) + tail == detok.text == tok.decode(tok.encode(text)) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert not detok.stopped and detok.stop_reason is None


@pytest.mark.parametrize("stop, cut", [
    ("lo wor", "Hel"),                       # spans "Hello" and " world"
    ("😀🎉 a", "emoji "),                    # spans eight tokens, both emoji split mid-character
    ("字符", "emoji 😀🎉 and 中文"),           # "符" is split over two tokens
    ("\n\nUser", "The answer is 42."),
])
def test_a_stop_string_spanning_tokens_is_found_and_cut(tok, stop, cut):
    text = next(t for t in TEXTS if stop in t)
    pieces, tail, detok = run(tok, text, stop=["never", stop])
    assert detok.stopped and detok.stop_reason == stop
    assert detok.text == cut and "".join(pieces) + tail == cut and tail == ""
    pieces, tail, detok = run(tok, text, stop=[stop], include_stop_str_in_output=True)
    assert detok.text == cut + stop == "".join(pieces) + tail


def test_a_held_back_stop_prefix_is_released_when_it_does_not_complete(tok):
    pieces, tail, detok = run(tok, "Hello world, this is a test.", stop=["worldwide", "test!"])
    assert pieces[:3] == ["Hello", " ", "world,"]             # "world" waited for the next token
    assert pieces[-2:] == [" ", "test."] and tail == ""       # so did "test", until "." ruled out "test!"
    assert "".join(pieces) == detok.text and not detok.stopped


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stops", [["is"], ["o", "world"], ["🎉", "😀🎉"], ["a test", "t"], ["42.\n\n", "\n"],
                                   ["字", "文字符 ok"], ["xyz", "ok"]])
@pytest.mark.parametrize("include", [False, True])
def test_returned_text_is_never_taken_back(tok, text, stops, include):
    final, stop = expected_text(text, stops, include)
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=stops, include_stop_str_in_output=include))
    returned = ""
    for token in ids:
        returned += detok.push(token)
        assert final.startswith(returned)                     # nothing returned is later cut away
        if detok.stopped:
            break
    returned += detok.flush()
    assert returned == detok.text == final and detok.stop_reason == stop
    if detok.stopped:
        assert detok.push(ids[-1]) == "" and detok.flush() == ""


def test_min_tokens_ignores_stops_completed_in_the_first_tokens(tok):
    text = "Hello world, this world again"                   # " world" is token 2 and token 5
    pieces, tail, detok = run(tok, text, stop=["world"], min_tokens=3)
    assert detok.text == "Hello world, this " and detok.stop_reason == "world"
    pieces, tail, detok = run(tok, text, stop=["world"], min_tokens=1)
    assert detok.text == "Hello "


def test_special_tokens_are_skipped_or_kept(tok):
    ids = tok.encode("Hi<|im_end|>there")
    assert run(tok, ids)[2].text == "Hithere"
    assert run(tok, ids, skip_special_tokens=False)[2].text == "Hi<|im_end|>there"


def test_prompt_context_changes_nothing_for_byte_level_bpe(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi 😀"}], tokenize=True)
    for text in TEXTS:
        pieces, tail, detok = run(tok, text, prompt_ids=prompt, stop=["🎉"])
        assert "".join(pieces) + tail == detok.text == expected_text(text, ["🎉"], False)[0]


def test_a_prompt_cut_mid_character_leaks_nothing(tok):
    ids = tok.encode("emoji 😀🎉 and")
    cut = 3                                                   # the prompt ends inside 😀
    pieces, tail, detok = run(tok, ids[cut:], prompt_ids=ids[:cut])
    assert "".join(pieces) + tail == detok.text == tok.decode(ids[cut:])


def test_prompt_context_keeps_a_sentencepiece_leading_space():
    """SentencePiece decoders drop the space of a sequence's first token ("▁there" -> "there");
    decoded after the prompt's tail, as vLLM does, the completion keeps it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from nanoseek.tokenizer import Tokenizer
    pieces = ["<unk>", "▁", "H", "i", "t", "h", "e", "r", "▁H", "▁Hi", "▁t", "▁th", "▁the", "▁ther", "▁there"]
    merges = [("▁", "H"), ("▁H", "i"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁the", "r"), ("▁ther", "e")]
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok = Tokenizer(backend, unk_token="<unk>")
    prompt, completion = tok.encode("Hi"), tok.encode(" there")[-1:]
    assert tok.decode(completion) == "there"
    assert run(tok, completion, prompt_ids=prompt)[2].text == " there"
    assert run(tok, completion)[2].text == "there"
