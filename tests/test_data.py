"""train/data.py and train/sources.py: reading, packing without loss, the boundary rule, assistant masks
(SmolLM2's template and an R1-style one with <think>), resumable and sharded loaders."""

import itertools
import json

import pytest
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

import nanoseek
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.data import IGNORE_INDEX, DataError, PretrainLoader, SFTLoader, chat_tokens
from nanoseek.train.sources import read_conversations, read_documents

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
# DeepSeek-R1-style: the generation prompt pre-fills "<think>\n"; reasoning given apart is written back inline.
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{% if m.get('reasoning_content') %}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
# DeepSeek-R1's own rule: an assistant message's reasoning is dropped (content.split('</think>')[-1]).
R1_STRIPPING_TEMPLATE = R1_TEMPLATE.replace("m['content'] + '<｜end", "m['content'].split('</think>')[-1] + '<｜end")


@pytest.fixture(scope="module")
def smollm2():
    return nanoseek.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def r1_tokenizer(smollm2):
    """SmolLM2's vocabulary plus DeepSeek-R1's special tokens, <think> tags as added tokens, R1's template."""
    backend = Backend.from_str(smollm2.backend.to_str())
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS, EOS, USER, ASSISTANT)])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, chat_template=R1_TEMPLATE)


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pieces(tokenizer, ids, mask):
    """Decoded runs of equal mask value: [(0, text), (1, text), ...]."""
    runs = itertools.groupby(zip(ids, mask), key=lambda pair: pair[1])
    return [(m, tokenizer.decode([i for i, _ in run])) for m, run in runs]


# ---- reading ------------------------------------------------------------------------------------

def test_reads_txt_jsonl_folders_globs_and_lists(tmp_path):
    write(tmp_path / "a.jsonl", [{"text": "one"}, "", {"text": "two", "extra": 1}])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("para one\n\npara two\n")
    (tmp_path / "notes.md").write_text("ignored in a folder")
    docs, skipped = read_documents(tmp_path)
    assert [text for _, text in docs] == ["one", "two", "para one\n\npara two\n"] and skipped == 0
    assert [where for where, _ in docs] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3", f"{tmp_path}/sub/b.txt"]
    assert [t for _, t in read_documents(str(tmp_path / "**" / "*.txt"))[0]] == ["para one\n\npara two\n"]
    assert len(read_documents([tmp_path / "a.jsonl", tmp_path / "a.jsonl"])[0]) == 4
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_documents(tmp_path / "notes.md")


@pytest.mark.parametrize("row, problem", [
    ('{"text": "ok"', "not valid JSON"), ('["a list"]', "expected a JSON object"),
    ('{"txt": "x"}', "missing field 'text'"), ('{"text": 3}', "must be a str, got int"),
    ('{"text": "  "}', "empty document")])
def test_malformed_row_names_file_and_line_or_is_skipped(tmp_path, row, problem):
    file = write(tmp_path / "d.jsonl", [{"text": "fine"}, row, {"text": "also fine"}])
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{problem}"):
        read_documents(file)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        docs, skipped = read_documents(file, skip_bad=True)
    assert [t for _, t in docs] == ["fine", "also fine"] and skipped == 1


def test_reads_conversations_and_pairs(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    file = write(tmp_path / "c.jsonl", [{"messages": chat}, {"question": "q", "answer": "a"},
                                         {"prompt": "q", "completion": "a"}])
    assert [m for _, m in read_conversations(file)[0]] == [chat] * 3
    for bad, problem in [({"messages": [{"role": "user", "content": "q"}]}, "no non-empty assistant"),
                         ({"messages": [{"role": "user"}, chat[1]]}, r"messages\[0\].content must be a string"),
                         ({"messages": "hi"}, "must be a list"), ({"question": 1, "answer": "a"}, "must be a str")]:
        with pytest.raises(DataError, match=f"c.jsonl:4: .*{problem}"):
            read_conversations(write(tmp_path / "c.jsonl", [{"messages": chat}] * 3 + [bad]))
    with pytest.raises(DataError, match="must be .jsonl"):
        read_conversations(write(tmp_path / "t.txt", ["text"]))


def test_skipped_rows_are_counted_by_the_loader_with_one_warning_per_file(smollm2, tmp_path):
    write(tmp_path / "a.jsonl", [{"text": "good"}, "{bad", {"text": ""}])
    write(tmp_path / "b.jsonl", [{"text": 1}, {"text": "good too"}])
    with pytest.warns(UserWarning) as caught:
        loader = PretrainLoader(tmp_path, smollm2, batch_size=1, seq_len=4, skip_bad=True)
    assert [str(w.message).split(": skipped ")[1][:1] for w in caught] == ["2", "1"]
    assert loader.skipped == 3 and len(loader.documents) == 2
    with pytest.raises(DataError, match="a.jsonl:2: not valid JSON"):
        PretrainLoader(tmp_path, smollm2, batch_size=1, seq_len=4)


def test_builtin_corpus(smollm2):
    pytest.importorskip("nanoseek.tasks.corpus")
    docs, _ = read_documents("builtin", builtin_size=5, seed=1)
    chats, _ = read_conversations("builtin", builtin_size=5, seed=1)
    assert len(docs) == 5 and len(chats) == 5 and all(text.strip() for _, text in docs)
    batch = next(PretrainLoader("builtin", smollm2, batch_size=2, seq_len=32, builtin_size=20, shuffle=False))
    assert (batch["labels"] != IGNORE_INDEX).all()
    loader = SFTLoader("builtin", smollm2, batch_size=2, seq_len=256, builtin_size=20)
    assert loader.skipped == loader.dropped == 0 and len(loader.examples) == 20
    assert "</think>" in smollm2.decode([i for i in next(loader)["labels"].flatten().tolist() if i >= 0])


def test_a_builtin_mix_is_named_after_a_colon():
    chats, _ = read_conversations("builtin:word_problems", builtin_size=30, seed=0)
    assert len(chats) == 30 and chats[0][0] == "builtin:word_problems:0"
    assert all(not m[0]["content"].startswith(("What is", "Using the numbers")) for _, m in chats)
    messages = lambda data: [m for _, m in read_conversations(data, builtin_size=4)[0]]    # noqa: E731
    assert messages("builtin:all") == messages("builtin")
    with pytest.raises(DataError, match="builtin:nope: no built-in mix 'nope' \\(choose one of all, word_problems"):
        read_documents("builtin:nope")


# ---- pretraining: packing and the document-boundary rule -----------------------------------------

@pytest.fixture
def corpus(tmp_path):
    texts = [f"Document {i}: " + "word " * (3 + 5 * i) for i in range(7)]
    return write(tmp_path / "docs.jsonl", [{"text": t} for t in texts]), texts


def one_epoch(loader):
    return [next(loader) for _ in range(-(-loader.rows_per_epoch // loader.batch_size))]


def test_packing_loses_no_token_and_follows_the_boundary_rule(smollm2, corpus):
    file, texts = corpus
    loader = PretrainLoader(file, smollm2, batch_size=3, seq_len=16, shuffle=False)
    eos = smollm2.eos_token_id
    stream = [t for text in texts for t in smollm2.encode(text) + [eos]]  # d1 EOS d2 EOS ...
    assert loader.tokens_per_epoch == len(stream) and loader.rows_per_epoch == -(-(len(stream) - 1) // 16)
    batches = one_epoch(loader)
    inputs = torch.cat([b["input_ids"] for b in batches])[:loader.rows_per_epoch]
    labels = torch.cat([b["labels"] for b in batches])[:loader.rows_per_epoch]
    kept = labels != IGNORE_INDEX
    # every token is an input exactly once and a label exactly once, in stream order
    assert inputs[kept].tolist() == stream[:-1] and labels[kept].tolist() == stream[1:]
    assert kept[:-1].all() and kept[-1].sum() == ((len(stream) - 1) % 16 or 16)  # only the last row is padded
    # labels are the next tokens, across row boundaries too (a document runs on into the next row)
    assert (labels[:, :-1][kept[:, :-1]] == inputs[:, 1:][kept[:, :-1]]).all()
    assert (labels[:-1, -1] == inputs[1:, 0]).all()
    # the label at a separator is the next document's first token, and it is trained
    at_eos = (inputs == eos) & kept
    firsts = [smollm2.encode(text)[0] for text in texts[1:]]
    assert labels[at_eos].tolist() == firsts and at_eos.sum() == len(texts) - 1


def test_shuffled_rows_are_windows_of_the_epochs_stream(smollm2, corpus):
    file, texts = corpus
    loader = PretrainLoader(file, smollm2, batch_size=1, seq_len=8, seed=3)
    for epoch in range(2):
        stream = loader.stream(epoch)
        # the documents in the epoch's order, each followed by EOS
        assert sorted(smollm2.decode(d.tolist()) for d in stream.tensor_split(
            (stream == smollm2.eos_token_id).nonzero()[:, 0] + 1)[:-1]) == sorted(t + "<|im_end|>" for t in texts)
        got = sorted(tuple(b["input_ids"][0].tolist() + b["labels"][0].tolist()) for b in one_epoch(loader))
        windows = []
        for k in range(loader.rows_per_epoch):
            w = stream[k * 8:k * 8 + 9].tolist()
            pad = 9 - len(w)
            windows.append(tuple(w[:-1] + [smollm2.eos_token_id] * pad + w[1:] + [IGNORE_INDEX] * pad))
        assert got == sorted(windows)
        assert loader.epoch == epoch + 1 and loader.position == 0
    assert not torch.equal(loader.stream(0), loader.stream(1))  # reshuffled each epoch


def test_documents_in_a_row_see_earlier_documents(smollm2, corpus):
    """The loader gives plain causal rows, so the model attends across the separator within a row."""
    from nanoseek.model import Transformer
    from nanoseek.model.presets import tiny_llama
    file, _ = corpus
    row = next(PretrainLoader(file, smollm2, batch_size=1, seq_len=48, shuffle=False))["input_ids"]
    assert set(next(iter(PretrainLoader(file, smollm2, batch_size=1, seq_len=48)))) == {"input_ids", "labels"}
    cut = int((row[0] == smollm2.eos_token_id).nonzero()[0]) + 1  # first token of the second document
    model = Transformer(tiny_llama(vocab_size=smollm2.vocab_size)).eval()
    changed = row.clone()
    changed[0, 0] = (changed[0, 0] + 1) % smollm2.vocab_size  # edit the first document only
    with torch.no_grad():
        a, b = model(row), model(changed)
    assert not torch.allclose(a[0, cut:], b[0, cut:])  # the second document saw the edit


# ---- SFT: assistant masks -----------------------------------------------------------------------

def test_smollm2_mask_is_exactly_the_assistant_turns(smollm2):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "<think>2+3=5</think>\n\nThe answer is 5."},
                {"role": "user", "content": "And 2*3?"}, {"role": "assistant", "content": "6"}]
    ids, mask = chat_tokens(smollm2, messages)
    assert ids == smollm2.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    assert pieces(smollm2, ids, mask) == [
        (0, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
            "<|im_start|>assistant\n"),
        (1, "<think>2+3=5</think>\n\nThe answer is 5.<|im_end|>"),  # reasoning and the end-of-turn token
        (0, "\n<|im_start|>user\nAnd 2*3?<|im_end|>\n<|im_start|>assistant\n"),
        (1, "6<|im_end|>"),
        (0, "\n")]  # the template's newline after <|im_end|> is not generated, so not trained


@pytest.mark.parametrize("reasoning_apart", [False, True])
def test_r1_mask_covers_the_reasoning_after_the_prefilled_think(r1_tokenizer, reasoning_apart):
    answer = {"role": "assistant", "content": "<think>\n3*4 = 12\n</think>\n\n12"}
    if reasoning_apart:
        answer = {"role": "assistant", "reasoning_content": "3*4 = 12", "content": "12"}
    messages = [{"role": "user", "content": "3*4?"}, answer, {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "<think>\nyes\n</think>\n\nYes."}]
    ids, mask = chat_tokens(r1_tokenizer, messages)
    assert ids[0] == r1_tokenizer.bos_token_id and ids[-1] == r1_tokenizer.eos_token_id
    assert pieces(r1_tokenizer, ids, mask) == [
        (0, f"{BOS}{USER}3*4?{ASSISTANT}<think>\n"),  # the generation prompt pre-fills "<think>\n"
        (1, f"3*4 = 12\n</think>\n\n12{EOS}"),
        (0, f"{USER}Sure?{ASSISTANT}<think>\n"),
        (1, f"yes\n</think>\n\nYes.{EOS}")]


def test_template_that_is_not_prefix_stable_is_a_clear_error(smollm2, r1_tokenizer, tmp_path):
    stripping = Tokenizer(r1_tokenizer.backend, bos_token=BOS, eos_token=EOS, chat_template=R1_STRIPPING_TEMPLATE)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]
    with pytest.raises(DataError, match="not prefix-stable"):
        chat_tokens(stripping, messages)
    # an answer that does not start with the <think>\n the R1 template pre-fills
    file = write(tmp_path / "c.jsonl", [{"messages": messages}, {"question": "q", "answer": "no think"}])
    with pytest.raises(DataError, match="c.jsonl:2: the chat template is not prefix-stable"):
        SFTLoader(file, r1_tokenizer, batch_size=1, seq_len=64)
    strict = Tokenizer(smollm2.backend, eos_token="<|im_end|>", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"))
    file = write(tmp_path / "s.jsonl", [{"question": "q", "answer": "a"},
                                         {"messages": [{"role": "system", "content": "s"}, messages[1]]}])
    with pytest.raises(DataError, match="s.jsonl:2: the chat template rejects"):
        SFTLoader(file, strict, batch_size=1, seq_len=64)
    assert SFTLoader(file, strict, batch_size=1, seq_len=64, skip_bad=True).skipped == 1


@pytest.mark.parametrize("pack", [True, False])
def test_sft_labels_are_the_assistant_tokens_of_packed_rows(smollm2, tmp_path, pack):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"<think>{i}+{i}</think> {2 * i}"} for i in range(9)]
    loader = SFTLoader(write(tmp_path / "c.jsonl", rows), smollm2, batch_size=1, seq_len=120, pack=pack, seed=1)
    per_row = [len(key) for key in loader.rows(0)]
    assert sorted(i for key in loader.rows(0) for i in key) == list(range(9))  # every example once an epoch
    assert (max(per_row) > 1) == pack
    expected = []
    for ids, mask in loader.examples:  # labels taken only where the next token is the assistant's
        expected += [i for i, m in zip(ids[1:].tolist(), mask[1:].tolist()) if m]
    got = []
    for _ in per_row:  # one epoch
        batch = next(loader)
        labels, inputs = batch["labels"], batch["input_ids"]
        kept = labels != IGNORE_INDEX
        assert (labels[:, :-1][kept[:, :-1]] == inputs[:, 1:][kept[:, :-1]]).all()
        got += labels[kept].tolist()
    assert sorted(got) == sorted(expected)  # nothing across example boundaries, nothing lost
    texts = smollm2.decode(got)
    assert all(f"<think>{i}+{i}</think> {2 * i}<|im_end|>" in texts for i in range(9)) and "user" not in texts


def test_long_examples_are_truncated_or_dropped(smollm2, tmp_path):
    rows = [{"question": "q", "answer": "short"}, {"question": "q", "answer": "long " * 50},
            {"question": "long " * 80, "answer": "a"}]
    with pytest.warns(UserWarning, match="2 example.* truncated, 1 of them dropped"):
        loader = SFTLoader(write(tmp_path / "c.jsonl", rows), smollm2, batch_size=1, seq_len=48)
    assert (loader.truncated, loader.dropped, len(loader.examples)) == (2, 1, 2)
    assert all(len(ids) <= 49 for ids, _ in loader.examples)


# ---- loaders: resume, sharding, determinism ------------------------------------------------------

def make(kind, tokenizer, data, **kw):
    if kind == "pretrain":
        return PretrainLoader(data, tokenizer, seq_len=8, **kw)
    return SFTLoader(data, tokenizer, seq_len=64, **kw)


@pytest.fixture
def both(tmp_path, corpus):
    rows = [{"question": f"q{i}" * (i % 4 + 1), "answer": f"a{i}"} for i in range(11)]
    return {"pretrain": corpus[0], "sft": write(tmp_path / "chat.jsonl", rows)}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resume_reproduces_the_uninterrupted_batches(smollm2, both, kind):
    run = make(kind, smollm2, both[kind], batch_size=3, seed=5)
    reference = [next(run) for _ in range(20)]  # several epochs
    first = make(kind, smollm2, both[kind], batch_size=3, seed=5)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert all(isinstance(v, int) for v in state.values())
    resumed = make(kind, smollm2, both[kind], batch_size=3, seed=5)
    resumed.load_state_dict(state)
    for want in reference[7:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    assert resumed.epoch >= 2


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_ranks_split_each_step_and_cover_every_row(smollm2, both, kind):
    world = [make(kind, smollm2, both[kind], batch_size=2, seed=1, rank=r, world_size=3) for r in range(3)]
    single = make(kind, smollm2, both[kind], batch_size=6, seed=1)
    handed_out = []
    for _ in range(9):
        together = [next(loader) for loader in world]
        want = next(single)  # world_size ranks = one process with a world_size times larger batch
        assert torch.equal(torch.cat([b["input_ids"] for b in together]), want["input_ids"])
        assert torch.equal(torch.cat([b["labels"] for b in together]), want["labels"])
        handed_out += [tuple(row) for b in together for row in b["input_ids"].tolist()]
    assert world[0].state_dict() == world[2].state_dict() == single.state_dict()
    # the ranks' rows, in step order, run through each epoch's rows once each, then the next epoch's
    epoch_rows = [[tuple(single._collate([single._row(key)])["input_ids"][0].tolist()) for key in single.rows(e)]
                  for e in range(2)]
    n = len(epoch_rows[0])
    assert 9 * 6 >= 2 * n
    assert sorted(handed_out[:n]) == sorted(epoch_rows[0]) and sorted(handed_out[n:2 * n]) == sorted(epoch_rows[1])


def test_cursor_checks_and_argument_errors(smollm2, corpus):
    file, _ = corpus
    loader = PretrainLoader(file, smollm2, batch_size=2, seq_len=8, seed=1)
    next(loader)
    state = loader.state_dict()
    other = PretrainLoader(file, smollm2, batch_size=4, seq_len=8, seed=1, world_size=2, rank=1)
    other.load_state_dict(state)  # batch size and world size may change
    with pytest.raises(DataError, match="seed 1 -> 2"):
        PretrainLoader(file, smollm2, batch_size=2, seq_len=8, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len 8 -> 9"):
        PretrainLoader(file, smollm2, batch_size=2, seq_len=9, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="fingerprint"):
        file.write_text(file.read_text().replace("word", "Word", 1))
        PretrainLoader(file, smollm2, batch_size=2, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="not a data-loader state"):
        loader.load_state_dict({"epoch": 1})
    with pytest.raises(DataError, match="rank must be in"):
        PretrainLoader(file, smollm2, batch_size=2, seq_len=8, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size must be"):
        PretrainLoader(file, smollm2, batch_size=0, seq_len=8)
