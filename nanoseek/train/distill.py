"""`nanoseek train distill`: rejection sampling from a teacher, then SFT of a student on its verified traces.

    nanoseek train distill --teacher runs/grpo/latest --student tiny_qwen2 --task arithmetic --out runs/distill
    nanoseek train distill --phase sample --teacher smollm2-135m --task gsm8k_train.jsonl --samples 8 --out runs/rs
    nanoseek train distill --phase train --student path/to/hf_folder --kd-weight 0.5 --out runs/rs

This is DeepSeek-R1's recipe (§2.3.3, §2.4) at laptop scale, in two phases (--phase sample | train | all):
1. rejection sampling (`rejection_sample`): the teacher draws k samples per problem through the
   engine; the task's verifier (nanoseek.rewards, the one GRPO and eval use) keeps the correct ones,
   reasoning included; truncated samples and repeated texts are dropped, at most m kept per problem.
   They become SFT rows {"messages": [user, assistant], "problem_id", "teacher", "sample"} in
   OUT/rejection_sampled.jsonl, with counts in OUT/rejection_sampling.json.
2. student SFT (`train_student`): the SFT stage's loader and `fit` on those rows. The student is a
   preset (tiny_llama, tiny_qwen2, ...: random init, the teacher's tokenizer, its vocabulary
   padded) or a Hugging Face folder. R1 distils by SFT alone; with --kd-weight > 0 and one
   vocabulary the loss also has KL(teacher || student) on the assistant tokens (logit distillation).
The student's checkpoints are Hugging Face folders in OUT/checkpoints, as every stage's are.

Left out on purpose: a generative reward model judging answers (R1 used DeepSeek-V3 for some
data), the readability filters (mixed languages, long paragraphs, code blocks), the ~200k
non-reasoning samples, and sampling spread over several processes (rank 0 samples; all train).
"""

from __future__ import annotations

import gc
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..configs import arg
from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from ..model import Transformer
from ..model.presets import TRAINING_PRESETS
from ..rewards import extract_answer, is_correct
from ..tasks import Problem, load_task
from .bpe import padded_vocab
from .data import SFTLoader
from .loop import LossModel, TrainConfig, TrainState, start
from .losses import kd_kl_sum
from .run import fit, load_resumed_model, resume_point

SAMPLES_FILE = "rejection_sampled.jsonl"
SUMMARY_FILE = "rejection_sampling.json"


@dataclass
class DistillConfig(TrainConfig):
    phase: str = arg("all", "sample (rejection sampling only) | train (student SFT only) | all",
                     choices=["sample", "train", "all"])
    teacher: str = arg("smollm2-135m", "the teacher: a Hugging Face folder, .gguf file or built-in name")
    student: str = arg("tiny_llama", "the student: a preset (random init, the teacher's tokenizer) or a HF folder")
    model: str = arg("", "unused by distill: the models are --teacher and --student")
    out: str = arg("runs/distill", "run folder: the samples, then the student's checkpoints, metrics.jsonl, plots")
    data: str = arg("", "SFT JSONL the student trains on ('' = OUT/rejection_sampled.jsonl, this run's samples)")
    task: str = arg("arithmetic", "problems to sample: a built-in task (its train split) or a JSONL file")
    num_prompts: int = arg(200, "problems to sample (the first n of the task)")
    instruction: str = arg("", "appended to every question, e.g. R1's 'Please reason step by step, ...'")
    samples: int = arg(4, "k: samples the teacher draws per problem")
    temperature: float = arg(0.6, "sampling temperature (R1's 0.6)")
    top_p: float = arg(0.95, "nucleus sampling mass (R1's 0.95)")
    max_new_tokens: int = arg(256, "most tokens per sample; a sample cut off here is rejected")
    keep_per_prompt: int = arg(0, "m: at most this many verified samples kept per problem (0 = all)")
    kd_weight: float = arg(0.0, "weight of KL(teacher || student) on the assistant tokens (0 = SFT only)")
    steps: int = arg(200, "optimiser steps of the student")
    lr: float = arg(3e-3, "peak learning rate of the student")
    mtp_weight: float = arg(0.0, "λ of the MTP loss, for a student that has MTP modules (dense students don't)")
    pack: bool = arg(True, "pack several examples into a row (as `nanoseek train sft`)")


# ---- rejection sampling ------------------------------------------------------------------------

def problem_seed(seed: int, problem_id: str) -> int:
    """Sample i of a problem draws with this + i: the samples depend on the problem, not its position."""
    return zlib.crc32(f"{seed}:{problem_id}".encode()) & 0x7FFFFFFF


def prefilled(prompt_text: str) -> str:
    """The part of a thinking block the chat template opened in the prompt (R1's "<think>\\n"), or "".

    The teacher's completion then starts inside the block; the SFT row must say "<think>" itself.
    """
    start = prompt_text.rfind("<think>")
    return prompt_text[start:] if start > prompt_text.rfind("</think>") else ""


def verified_rows(problem: Problem, question: str, completions: list[tuple[str, str | None]], prefix: str,
                  teacher: str, keep_per_prompt: int = 0) -> tuple[list[dict], dict]:
    """The SFT rows of one problem's samples, and counts of what happened to the samples.

    completions: (text, finish_reason) per sample in sample order. A sample is kept when it ended on
    its own (a "length" cut-off is never a whole trace) and the verifier accepts the answer read from
    `prefix + text` (reasoning stripped, as rewards do); repeated texts are kept once; at most
    `keep_per_prompt` rows (0 = no cap), the first ones in sample order.
    """
    rows, seen = [], set()
    counts = {"correct": 0, "truncated": 0, "duplicates": 0, "over_cap": 0}
    for i, (text, finish_reason) in enumerate(completions):
        content = (prefix + text).strip()
        if finish_reason == "length":
            counts["truncated"] += 1
            continue
        if not is_correct(extract_answer(content), problem):
            continue
        counts["correct"] += 1
        if content in seen:
            counts["duplicates"] += 1
            continue
        if keep_per_prompt and len(rows) >= keep_per_prompt:
            counts["over_cap"] += 1
            continue
        seen.add(content)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": content}],
                     "problem_id": problem.id, "teacher": teacher, "sample": i})
    return rows, counts


def rejection_sample(teacher: LLM | str, problems: list[Problem], out: str | Path, *, samples: int = 4,
                     temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 256,
                     keep_per_prompt: int = 0, instruction: str = "", seed: int = 0,
                     teacher_name: str | None = None, settings: dict | None = None) -> dict:
    """Draw `samples` completions per problem from the teacher, keep the verified ones as SFT rows.

    Writes OUT/rejection_sampled.jsonl (atomically: a partial file never stands) and then
    OUT/rejection_sampling.json, the summary it returns: prompts, samples, correct, kept,
    acceptance_rate (correct / samples), truncated, duplicates, over_cap, prompts_kept (problems
    with a row), prompt_tokens (each prompt once: its samples share its prefill) and generated_tokens
    (for the report's FLOPs), seconds, and `settings` (what the caller says decided the samples).
    """
    if not problems:
        raise ValueError("rejection sampling needs at least one problem")
    if samples < 1 or max_new_tokens < 1 or keep_per_prompt < 0:
        raise ValueError(f"samples ({samples}) and max_new_tokens ({max_new_tokens}) must be >= 1, "
                         f"keep_per_prompt ({keep_per_prompt}) >= 0")
    name = teacher_name or (teacher if isinstance(teacher, str) else "teacher")
    llm = LLM(teacher) if isinstance(teacher, str) else teacher
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    questions = [f"{p.prompt}\n{instruction}" if instruction else p.prompt for p in problems]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    prompts = [llm.chat_prompt(c) for c in conversations]
    params = [SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                             seed=problem_seed(seed, p.id)) for p in problems]
    requests = llm.generate(prompts, params, use_tqdm="rejection sampling")
    rows, totals = [], {"correct": 0, "truncated": 0, "duplicates": 0, "over_cap": 0}
    generated = 0
    for problem, question, conversation, request in zip(problems, questions, conversations, requests):
        prefix = prefilled(llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True))
        completions = [(c.text, c.finish_reason) for c in request.outputs]
        kept, counts = verified_rows(problem, question, completions, prefix, name, keep_per_prompt)
        rows += kept
        totals = {k: totals[k] + counts[k] for k in totals}
        generated += sum(len(c.token_ids) for c in request.outputs)
    tmp = out / f".{SAMPLES_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out / SAMPLES_FILE)
    drawn = samples * len(problems)
    summary = {"teacher": name, "prompts": len(problems), "samples": drawn, **totals, "kept": len(rows),
               "acceptance_rate": totals["correct"] / drawn, "prompts_kept": len({r["problem_id"] for r in rows}),
               "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
               "generated_tokens": generated, "seconds": time.perf_counter() - started,
               "path": str(out / SAMPLES_FILE), "settings": settings}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def sampling_settings(cfg: DistillConfig) -> dict:
    """What decides the samples: a rerun with other settings must not reuse them."""
    keys = ("teacher", "task", "num_prompts", "instruction", "samples", "temperature", "top_p", "max_new_tokens",
            "keep_per_prompt", "seed")
    return {k: getattr(cfg, k) for k in keys}


def sample_phase(cfg: DistillConfig) -> dict:
    """Phase 1 from the config; a finished sampling is reused with --resume (same settings only)."""
    summary_file = Path(cfg.out) / SUMMARY_FILE
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if not cfg.resume:
            raise ValueError(f"{cfg.out} already holds rejection samples: pass --resume to reuse them, "
                             "or choose another --out")
        if summary.get("settings") != sampling_settings(cfg):
            raise ValueError(f"{summary_file} was sampled with other settings ({summary.get('settings')}); "
                             "choose another --out")
        print(f"distill: reusing {summary['kept']} rows in {summary['path']}")
        return summary
    problems = load_task(cfg.task, split="train", n=cfg.num_prompts, seed=cfg.seed)
    llm = LLM(cfg.teacher, dtype=cfg.dtype, device=cfg.device)     # auto | bfloat16 | float32, as training's
    summary = rejection_sample(llm, problems, cfg.out, samples=cfg.samples, temperature=cfg.temperature,
                               top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                               keep_per_prompt=cfg.keep_per_prompt, instruction=cfg.instruction, seed=cfg.seed,
                               teacher_name=cfg.teacher, settings=sampling_settings(cfg))
    del llm
    gc.collect()
    print(f"distill: {summary['kept']} rows kept of {summary['samples']} samples from {summary['prompts']} "
          f"problems (acceptance {summary['acceptance_rate']:.1%}, {summary['truncated']} truncated) -> "
          f"{summary['path']}")
    return summary


# ---- the student -------------------------------------------------------------------------------

def build_student(student: str, tokenizer, seq_len: int, seed: int) -> tuple[Transformer, object]:
    """A preset at random init sized to the teacher's tokenizer, or a Hugging Face folder with its own."""
    if student in TRAINING_PRESETS:
        preset = TRAINING_PRESETS[student]()
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else preset.bos_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else preset.eos_token_id
        cfg = preset.replace(vocab_size=padded_vocab(tokenizer), bos_token_id=bos, eos_token_id=eos,
                             max_seq_len=max(preset.max_seq_len, seq_len))
        torch.manual_seed(seed)
        return Transformer(cfg.validate()), tokenizer
    from ..checkpoint import load
    model, own = load(student, dtype=torch.float32)
    return model.train(), own


class DistillLossModel(LossModel):
    """The SFT losses plus kd_weight × KL(teacher || student) over the step's labelled tokens.

    The teacher is held in a tuple, outside the module tree: the optimizer, DDP and checkpoints see
    the student alone. KL runs over the first `vocab` logits, the tokenizer's real ids (padding
    rows of either embedding never appear in the data).
    """

    def __init__(self, model, teacher, kd_weight: float, vocab: int, mtp_weight: float, balance_weight: float):
        super().__init__(model, mtp_weight, balance_weight)
        self._teacher, self.kd_weight, self.vocab = (teacher,), kd_weight, vocab

    def token_loss(self, batch: dict, logits: torch.Tensor, counts: list[int]):
        loss, metrics = super().token_loss(batch, logits, counts)
        with torch.no_grad():
            teacher_logits = self._teacher[0](batch["input_ids"])
        kl_sum, _ = kd_kl_sum(logits[..., :self.vocab], teacher_logits[..., :self.vocab], batch["labels"])
        kd = kl_sum / max(counts[0], 1)
        metrics["kd_kl"] = kd.detach()
        return loss + self.kd_weight * kd, metrics


def kd_teacher(cfg: DistillConfig, tokenizer, student, device):
    """The teacher in float32 for logit distillation; refuses a student with another vocabulary."""
    from ..checkpoint import load
    teacher, teacher_tokenizer = load(cfg.teacher, dtype=torch.float32, device=device)
    if teacher_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"--kd-weight needs one vocabulary: {cfg.teacher}'s tokenizer and {cfg.student}'s differ "
                         "(use a preset student, which takes the teacher's tokenizer, or --kd-weight 0)")
    vocab = min(tokenizer.vocab_size, teacher.cfg.vocab_size, student.cfg.vocab_size)
    return teacher.eval().requires_grad_(False), vocab


def train_student(cfg: DistillConfig, data: str | Path | None = None) -> TrainState:
    """Phase 2: SFT of cfg.student on `data` (default OUT/rejection_sampled.jsonl); resumes with --resume."""
    from ..checkpoint import load_tokenizer
    data = Path(data or cfg.data or Path(cfg.out) / SAMPLES_FILE)
    if not data.is_file():
        raise ValueError(f"{data}: no such file: run the sample phase first (--phase sample or all)")
    if data.stat().st_size == 0:
        raise ValueError(f"{data} holds no verified samples: try a stronger teacher, more --samples, "
                         "a larger --max-new-tokens or an easier task")
    session = start(cfg)
    resume_from = resume_point(cfg)
    if resume_from is not None:
        model, tokenizer = load_resumed_model(resume_from, session.device), load_tokenizer(resume_from)
    else:
        teacher_tokenizer = load_tokenizer(cfg.teacher) if cfg.student in TRAINING_PRESETS else None
        model, tokenizer = build_student(cfg.student, teacher_tokenizer, cfg.seq_len, cfg.seed)
    if tokenizer.chat_template is None:
        raise ValueError(f"{cfg.student}: its tokenizer has no chat template, which SFT renders examples with")
    loader = SFTLoader(str(data), tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                       rank=session.rank, world_size=session.world_size, skip_bad=cfg.skip_bad_rows, pack=cfg.pack)
    loss_model = None
    if cfg.kd_weight > 0:
        teacher, vocab = kd_teacher(cfg, tokenizer, model, session.device)
        loss_model = DistillLossModel(model, teacher, cfg.kd_weight, vocab, cfg.mtp_weight, cfg.balance_loss_weight)
    if session.main:
        print(f"distill: student {model.cfg.model_type} {model.num_params() / 1e6:.2f}M parameters, "
              f"{len(loader.examples)} examples from {data}, kd_weight {cfg.kd_weight}, on {session.device}")
    return fit(cfg, session, model, tokenizer, loader, stage="distill", resume_from=resume_from,
               loss_model=loss_model)


def main(cfg: DistillConfig) -> None:
    session = start(cfg)                    # joins the torchrun group first: the others wait for rank 0
    if cfg.phase in ("sample", "all"):
        if session.main:
            sample_phase(cfg)
        if session.distributed:
            dist.barrier()
    if cfg.phase in ("train", "all"):
        train_student(cfg)
