"""Distillation: rejection sampling keeps only verified samples as valid SFT rows; the student trained on
them (SFT, optionally + the teacher's KL) is a checkpoint transformers opens with the same logits.

The teacher is real: a tiny llama SFT'd for 60 steps on additions with sums up to 4, so that it has
learned the answer format but guesses the sum; at temperature 1 about a third of its samples are
right, and rejection sampling has both kinds to sort."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_model, load_tokenizer
from nanoseek.engine.llm import LLM
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama
from nanoseek.rewards import extract_answer, is_correct
from nanoseek.tasks import Problem, load_task
from nanoseek.train.bpe import R1_TEMPLATE, padded_vocab, train_bpe
from nanoseek.train.data import SFTLoader
from nanoseek.train.distill import (SAMPLES_FILE, SUMMARY_FILE, DistillConfig, DistillLossModel, build_student,
                                    main, prefilled, rejection_sample, train_student, verified_rows)
from nanoseek.train.losses import IGNORE, cross_entropy, kd_kl_sum

PAIRS = [(a, b) for a in range(5) for b in range(5) if a + b <= 4]          # 15 problems


def _conversation(a, b):
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"<think>{a} + {b} = {a + b}</think> {a + b}"}]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(folder, problems, problems.jsonl): the briefly trained tiny teacher and the problems it is asked."""
    root = tmp_path_factory.mktemp("teacher")
    rng = random.Random(0)
    data = root / "sft.jsonl"
    conversations = [_conversation(*rng.choice(PAIRS)) for _ in range(200)]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    tok = train_bpe((m[0]["content"] + " " + m[1]["content"] for m in conversations), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(tiny_llama(vocab_size=padded_vocab(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id))
    loader = SFTLoader(str(data), tok, batch_size=8, seq_len=64, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = next(loader)
        loss = cross_entropy(model(batch["input_ids"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "teacher", tokenizer=tok)
    problems = [Problem(f"add-{i}", f"What is {a} + {b}?", str(a + b), "exact", {}) for i, (a, b) in enumerate(PAIRS)]
    task = root / "problems.jsonl"
    task.write_text("".join(json.dumps({"question": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    return root / "teacher", problems, task


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_verified(rows, problems, teacher_name):
    by_id = {p.id: p for p in problems}
    for row in rows:
        user, assistant = row["messages"]
        problem = by_id[row["problem_id"]]
        assert user == {"role": "user", "content": problem.prompt}
        assert assistant["role"] == "assistant" and "</think>" in assistant["content"]
        assert is_correct(extract_answer(assistant["content"]), problem), row
        assert row["teacher"] == teacher_name


# ---- the KL term --------------------------------------------------------------------------------

def test_kd_kl_hand_computed():
    # position 0: teacher [0, 0] -> (1/2, 1/2); student [log 3, 0] -> (3/4, 1/4): KL = 1/2 log(4/3)
    # position 1 is masked (a prompt token) and must not count, however far apart the two are
    student = torch.tensor([[[math.log(3.0), 0.0], [9.0, -9.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [-9.0, 9.0]]], requires_grad=True)
    kl, n = kd_kl_sum(student, teacher, torch.tensor([[1, IGNORE]]))
    assert n == 1 and kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    kl.backward()
    assert teacher.grad is None and student.grad[0, 1].abs().sum() == 0
    # d KL / d student logits = p_S - p_T = (1/4, -1/4) at the labelled position
    torch.testing.assert_close(student.grad[0, 0], torch.tensor([0.25, -0.25]))
    same, _ = kd_kl_sum(teacher.detach(), teacher.detach(), torch.tensor([[0, 1]]))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one vocabulary"):
        kd_kl_sum(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long))


# ---- rejection sampling -------------------------------------------------------------------------

def test_verified_rows_keep_correct_complete_distinct_samples_up_to_the_cap():
    problem = Problem("p", "What is 2 + 3?", "5", "exact", {})
    completions = [("<think>2 + 3 = 6</think> 6", "stop"),          # wrong
                   ("<think>2 + 3 = 5</think> 5", "stop"),          # kept
                   ("<think>2 + 3 = 5</think> 5", "stop"),          # the same text again
                   ("<think>2 + 3 = 5</think> 5", "length"),        # cut off: never a whole trace
                   ("<think>2 and 3 make 5</think> 5", "stop"),      # kept: a second distinct trace
                   ("<think>5</think> 5", "stop"),                   # right, but over the cap of 2
                   ("<think>2 + 3 = 5", "stop")]                    # unclosed thinking: no answer
    rows, counts = verified_rows(problem, problem.prompt, completions, "", "T", keep_per_prompt=2)
    assert [r["sample"] for r in rows] == [1, 4]
    assert counts == {"correct": 4, "truncated": 1, "duplicates": 1, "over_cap": 1}
    assert rows[0] == {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                    {"role": "assistant", "content": "<think>2 + 3 = 5</think> 5"}],
                       "problem_id": "p", "teacher": "T", "sample": 1}
    # a template that opened the thinking block: the row says "<think>" itself
    rows, _ = verified_rows(problem, problem.prompt, [("2 + 3 = 5</think> 5", "stop")], "<think>\n", "T")
    assert rows[0]["messages"][1]["content"] == "<think>\n2 + 3 = 5</think> 5"


def test_prefilled_reads_an_open_thinking_block():
    assert prefilled("<｜User｜>hi<｜Assistant｜><think>\n") == "<think>\n"
    assert prefilled("<｜User｜>hi<｜Assistant｜>") == ""
    assert prefilled("<think>a</think> b<｜User｜>hi<｜Assistant｜>") == ""


def test_rejection_sampling_keeps_only_verified_samples(teacher, tmp_path):
    folder, problems, _ = teacher
    summary = rejection_sample(str(folder), problems, tmp_path, samples=4, temperature=1.0, max_new_tokens=16,
                               keep_per_prompt=2, seed=0)
    rows = _rows(tmp_path / SAMPLES_FILE)
    assert summary == json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["prompts"] == 15 and summary["samples"] == 60
    assert 0 < summary["correct"] < summary["samples"]                  # both kinds were drawn
    assert summary["kept"] == len(rows) == summary["correct"] - summary["duplicates"] - summary["over_cap"]
    assert summary["acceptance_rate"] == summary["correct"] / 60
    assert summary["generated_tokens"] > 0 and summary["prompts_kept"] == len({r["problem_id"] for r in rows})
    _assert_verified(rows, problems, str(folder))
    per_problem = {}
    for row in rows:
        per_problem.setdefault(row["problem_id"], []).append(row["messages"][1]["content"])
    assert all(len(texts) <= 2 and len(set(texts)) == len(texts) for texts in per_problem.values())
    # the rows are valid SFT data: they load, and the labels are the assistant's tokens only
    tok = load_tokenizer(folder)
    loader = SFTLoader(str(tmp_path / SAMPLES_FILE), tok, batch_size=2, seq_len=64, pack=False, shuffle=False)
    assert len(loader.examples) == len(rows) and loader.skipped == loader.truncated == 0
    ids, mask = loader.examples[0]
    assert tok.decode(ids[mask].tolist()) == rows[0]["messages"][1]["content"] + tok.eos_token


def test_a_template_that_opens_thinking_gets_its_think_back(teacher, tmp_path):
    folder, problems, _ = teacher
    tok = load_tokenizer(folder)
    tok.chat_template = R1_TEMPLATE.replace("{{ '<｜Assistant｜>' }}{% endif %}",
                                            "{{ '<｜Assistant｜><think>' }}{% endif %}")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<｜Assistant｜><think>")
    llm = LLM(load_model(folder), tokenizer=tok, dtype="float32")
    summary = rejection_sample(llm, problems, tmp_path, samples=4, temperature=1.0, max_new_tokens=16)
    rows = _rows(tmp_path / SAMPLES_FILE)
    assert summary["kept"] == len(rows) > 0 and summary["teacher"] == "teacher"
    assert all(row["messages"][1]["content"].startswith("<think>") for row in rows)
    _assert_verified(rows, problems, "teacher")
    loader = SFTLoader(str(tmp_path / SAMPLES_FILE), tok, batch_size=2, seq_len=64)   # prefix-stable rows
    assert len(loader.examples) == len(rows)


# ---- the student --------------------------------------------------------------------------------

def _config(teacher, out, **overrides) -> DistillConfig:
    folder, _, task = teacher
    base = dict(teacher=str(folder), student="tiny_qwen2", task=str(task), num_prompts=15, samples=4,
                temperature=1.0, max_new_tokens=16, keep_per_prompt=2, out=str(out), steps=3, batch_size=4,
                seq_len=48, warmup_steps=1, save_every=3, dtype="float32", device="cpu", peak_tflops=1.0,
                plot_every=100)
    return DistillConfig(**{**base, **overrides})


def test_distill_end_to_end_student_opens_in_transformers_with_the_same_logits(teacher, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _config(teacher, tmp_path / "run", kd_weight=0.5)
    main(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["kept"] > 0 and summary["settings"]["teacher"] == cfg.teacher
    _assert_verified(_rows(run / SAMPLES_FILE), load_task(str(teacher[2])), cfg.teacher)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["kd_kl"] > 0 and math.isfinite(m["loss"]) for m in metrics)
    folder = run / "latest"
    ours = load_model(folder)
    assert ours.cfg.model_type == "qwen2" and ours.cfg.vocab_size == load_model(teacher[0]).cfg.vocab_size
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    tok = load_tokenizer(folder)                                    # the teacher's tokenizer, saved along
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=True)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
    # a rerun neither overwrites nor redoes: refused without --resume, reused (samples and steps) with it
    with pytest.raises(ValueError, match="--resume"):
        main(cfg)
    before = (run / SAMPLES_FILE).stat().st_mtime_ns
    main(_config(teacher, run, kd_weight=0.5, resume=True))
    assert (run / SAMPLES_FILE).stat().st_mtime_ns == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="other settings"):
        main(_config(teacher, run, samples=8, resume=True))


def test_kd_loss_model_adds_the_teachers_kl_to_the_sft_loss(teacher):
    folder, _, _ = teacher
    tok = load_tokenizer(folder)
    student, _ = build_student("tiny_llama", tok, seq_len=64, seed=1)
    teacher_model = load_model(folder).eval()
    batch = next(SFTLoader("builtin", tok, batch_size=2, seq_len=64, builtin_size=8))
    labels, n = batch["labels"], int((batch["labels"] != IGNORE).sum())
    loss, stats = DistillLossModel(student, teacher_model, 0.5, tok.vocab_size, 0.0, 0.0)(batch, [n])
    with torch.no_grad():
        s, t = student(batch["input_ids"]), teacher_model(batch["input_ids"])
    keep = labels != IGNORE
    kl = F.kl_div(F.log_softmax(s[keep][:, :tok.vocab_size], -1), F.log_softmax(t[keep][:, :tok.vocab_size], -1),
                  log_target=True, reduction="sum") / n
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    assert loss.item() == pytest.approx((ce + 0.5 * kl).item(), rel=1e-5)
    assert stats["metrics"]["kd_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert stats["metrics"]["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert all(not name.startswith("_teacher") for name, _ in
               DistillLossModel(student, teacher_model, 0.5, 10, 0.0, 0.0).named_parameters())


def test_kd_refuses_a_student_with_another_vocabulary(teacher, tmp_path):
    other = train_bpe(["one two three four five six seven eight nine ten"] * 20, vocab_size=280)
    student = tmp_path / "student"
    Transformer(tiny_llama(vocab_size=padded_vocab(other))).save_pretrained(student, tokenizer=other)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": _conversation(1, 2)}) + "\n")
    with pytest.raises(ValueError, match="one vocabulary"):
        train_student(_config(teacher, tmp_path / "run", student=str(student), data=str(rows), kd_weight=1.0))


def test_train_stage_names_missing_or_empty_samples(teacher, tmp_path):
    with pytest.raises(ValueError, match="run the sample phase first"):
        train_student(_config(teacher, tmp_path / "a", phase="train"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / SAMPLES_FILE).write_text("")
    with pytest.raises(ValueError, match="no verified samples"):
        train_student(_config(teacher, tmp_path / "b", phase="train"))


def test_cli_has_the_distill_stage(teacher, tmp_path, capsys):
    from nanoseek.cli import main as cli
    code = cli(["train", "distill", "--phase", "train", "--teacher", str(teacher[0]), "--out", str(tmp_path)])
    assert code == 2 and "run the sample phase first" in capsys.readouterr().err


# ---- the embedded SmolLM2 as the teacher ----------------------------------------------------------

@pytest.mark.slow
def test_smollm2_teacher_on_one_digit_additions(tmp_path):
    transformers = pytest.importorskip("transformers")
    problems = load_task("arithmetic", split="train", n=4, digits=1, ops="+")
    summary = rejection_sample("smollm2-135m", problems, tmp_path, samples=4, temperature=0.6, max_new_tokens=48,
                               instruction="Answer with the number only.")
    rows = _rows(tmp_path / SAMPLES_FILE)
    assert summary["kept"] == len(rows) > 0
    by_id = {p.id: p for p in problems}
    assert all(is_correct(extract_answer(r["messages"][1]["content"]), by_id[r["problem_id"]]) for r in rows)
    # a tiny llama student on SmolLM2's vocabulary learns from the traces and the logits at once
    cfg = DistillConfig(phase="train", teacher="smollm2-135m", student="tiny_llama", out=str(tmp_path), steps=2,
                        batch_size=2, seq_len=96, warmup_steps=1, save_every=2, dtype="float32", device="cpu",
                        peak_tflops=1.0, kd_weight=0.5)
    train_student(cfg)
    folder = tmp_path / "latest"
    ours = load_model(folder)
    assert ours.cfg.vocab_size == 49152
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = torch.tensor([load_tokenizer(folder).encode("What is 3 + 4?")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
