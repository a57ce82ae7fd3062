"""The speedrun's training stages, each a function (ctx, folder) -> results for DONE.json.

    pretrain  `nanoseek train pretrain` of a preset on the built-in synthetic corpus (scratch)
    sft       `nanoseek train sft`, R1's cold start on the built-in worked examples (scratch, reasoning)
    grpo      `nanoseek train grpo` (cpu: the smollm2_addition preset as it is now, reasoning:
              smollm2_word_problems; scratch: `scratch_grpo`)
    distill   rejection sampling from the GRPO model + SFT of a dense student (train/distill.py)

Each writes its run folder under DIR/<stage>/ and, when the speedrun is rerun after an
interruption, resumes from its last complete checkpoint (the stage's own --resume); one interrupted
before its first checkpoint starts over. Results are plain numbers read back from the stage's own
files; FLOPs follow report.py (training: flops_per_token × tokens; sampling: 2·N_active per token).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
from pathlib import Path

import torch

from ..report import rollout_flops, training_flops
from ..tasks import load_task
from ..train.grpo import parse_knobs
from ..train.state import latest_checkpoint
from .config import SpeedrunConfig
from .measure import model_numbers

# the GRPO preset a SmolLM2 speedrun follows as it is now (the scratch one has its own, scratch_grpo)
GRPO_PRESETS = {"cpu": "smollm2_addition", "reasoning": "smollm2_word_problems"}

# ---- settings of the composed stages (presets as functions) -------------------------------------

def grpo_settings(cfg: SpeedrunConfig, model: str, out: str = "", resume: bool = False):
    """cpu, reasoning: their GRPO preset as it is now, with the speedrun's overrides; scratch: `scratch_grpo`."""
    from ..train import grpo
    if cfg.preset in GRPO_PRESETS:
        g = grpo.PRESETS[GRPO_PRESETS[cfg.preset]]()
        g = dataclasses.replace(g, task=cfg.task or g.task,
                                task_knobs=g.task_knobs if cfg.task_knobs is None else cfg.task_knobs,
                                steps=cfg.grpo_steps or g.steps, max_new_tokens=cfg.max_new_tokens or g.max_new_tokens)
    else:
        g = scratch_grpo(cfg)
    # SmolLM2's presets keep their own checkpoint spacing (a 135M checkpoint with AdamW state is ~1.6 GB)
    save_every = g.save_every if cfg.preset in GRPO_PRESETS else _every(g.steps)
    return dataclasses.replace(g, model=model, out=out, resume=resume, seed=cfg.seed, save_every=save_every,
                               keep_last=1)


def scratch_grpo(cfg: SpeedrunConfig):
    """GRPO for the small scratch model after its cold start, in the chat template SFT taught, G = 8.

    Measured from one SFT checkpoint (20 steps, greedy held-out accuracy on 200 2-digit sums, 19% at
    the start): lr 1e-4 at temperature 1.0 fell to 17%, lr 2e-5 at 1.0 reached 20%, lr 3e-5 at 0.7
    reached 24.5%; at temperature 1.0 the samples are worse than the greedy answer."""
    from ..train.grpo import GRPOConfig
    return GRPOConfig(task=cfg.task, task_knobs=cfg.task_knobs, steps=cfg.grpo_steps, group_size=8,
                      prompts_per_step=8, max_new_tokens=cfg.max_new_tokens, temperature=0.7, template="chat",
                      lr=3e-5, warmup_steps=2, micro_batch_size=16, eval_every=0, eval_size=cfg.eval_size)


def task_of(cfg: SpeedrunConfig) -> tuple[str, dict, str, int]:
    """(task, knobs, template of the trained model, max new tokens) the stages share."""
    g = grpo_settings(cfg, cfg.model or "")
    return g.task, parse_knobs(g.task_knobs), g.template, g.max_new_tokens


def _every(steps: int) -> int:
    return max(1, steps // 4)       # four checkpoints a stage: an interruption loses a quarter at most


# ---- helpers ------------------------------------------------------------------------------------

def prepare_resume(folder: Path) -> int:
    """The step a training stage resumes from (0: start over, clearing what a start left behind)."""
    found = latest_checkpoint(folder)
    if found is None:
        for leftover in ("metrics.jsonl", "samples.jsonl"):
            (folder / leftover).unlink(missing_ok=True)
        shutil.rmtree(folder / "plots", ignore_errors=True)
        return 0
    return int(found.name.removeprefix("step_"))


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _tail_mean(records: list[dict], key: str, n: int = 10) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][-n:]
    return sum(values) / len(values) if values else None


def _load(path: Path | str):
    from ..checkpoint import load
    return load(str(path), dtype=torch.float32)


def trained(folder: Path, seq_len: int, resumed_from: int, run: Path) -> dict:
    """A finished training stage's numbers: steps, tokens, losses, FLOPs, from its own files."""
    records = [r for r in read_metrics(folder) if "loss" in r]
    model, _ = _load(folder / "latest")
    numbers = model_numbers(model, seq_len)
    tokens = sum(r.get("tokens", 0) for r in records)
    del model
    return {"checkpoint": str((folder / "latest").relative_to(run)), "steps": len(records), "tokens": tokens,
            "first_loss": records[0]["loss"] if records else None, "final_loss": _tail_mean(records, "loss"),
            "final_mtp_loss": _tail_mean([{"m": r["mtp_loss"][0]} for r in records if r.get("mtp_loss")], "m"),
            "model_numbers": numbers, "flops": training_flops(numbers["train_flops_per_token"], tokens),
            "resumed_from_step": resumed_from}


# ---- training stages ----------------------------------------------------------------------------

def pretrain_stage(ctx, folder: Path) -> dict:
    from ..train import pretrain
    cfg, step = ctx.cfg, prepare_resume(folder)
    tc = pretrain.PretrainConfig(model=cfg.model, data="builtin", out=str(folder), steps=cfg.pretrain_steps,
                                 corpus_size=cfg.corpus_size, seed=cfg.seed, resume=step > 0,
                                 save_every=_every(cfg.pretrain_steps), keep_last=1, plot_every=cfg.pretrain_steps)
    pretrain.main(tc)
    return trained(folder, tc.seq_len, step, ctx.run)


def cold_start_data(path: Path, n: int, seed: int, template: str, mix: str = "all") -> Path:
    """The built-in worked examples of `mix` as SFT rows, each question asked as GRPO and the evals ask
    it (the chat template's instruction line appended): the 3M scratch model fine-tuned on bare
    questions answered 22% of held-out 2-digit sums asked bare and 0% with that line added."""
    from ..tasks.corpus import synthetic_sft_examples
    from ..train.rollout import CHAT_INSTRUCTION
    if not path.exists():
        rows = []
        for user, assistant in synthetic_sft_examples(n, seed, mix):
            question = CHAT_INSTRUCTION.format(question=user["content"]) if template == "chat" else user["content"]
            rows.append({"messages": [{"role": "user", "content": question}, assistant]})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    return path


def sft_stage(ctx, folder: Path) -> dict:
    """R1's cold start (§2.3.1) at this scale: built-in worked examples in the chat template.

    scratch: the whole corpus mix, from the pretrained model, at lr 1e-3. reasoning: SmolLM2 on worked
    one- and two-step word problems (mix word_problems) at lr 5e-5, in rows of 512 tokens (an example
    is ~150 with SmolLM2's system prompt): its training loss fell from 1.3 to 0.05 by step 50."""
    from ..train import sft
    cfg, step = ctx.cfg, prepare_resume(folder)
    smol = cfg.preset == "reasoning"
    data = cold_start_data(folder / "cold_start.jsonl", sft.SFTConfig().corpus_size, cfg.seed, task_of(cfg)[2],
                           mix="word_problems" if smol else "all")
    settings = dict(lr=5e-5, batch_size=4, seq_len=512) if smol else dict(lr=1e-3)
    tc = sft.SFTConfig(model=cfg.model if smol else str(ctx.run / "pretrain" / "latest"), data=str(data),
                       out=str(folder), steps=cfg.sft_steps, warmup_steps=max(1, cfg.sft_steps // 10), seed=cfg.seed,
                       resume=step > 0, save_every=_every(cfg.sft_steps), keep_last=1, plot_every=cfg.sft_steps,
                       **settings)
    sft.main(tc)
    return trained(folder, tc.seq_len, step, ctx.run)


def grpo_source(ctx) -> str:
    return ctx.cfg.model if ctx.cfg.preset == "cpu" else str(ctx.run / "sft" / "latest")


def grpo_stage(ctx, folder: Path) -> dict:
    from ..train import grpo
    from ..train.rollout import prompt_ids
    step = prepare_resume(folder)
    g = grpo_settings(ctx.cfg, grpo_source(ctx), str(folder), resume=step > 0)
    grpo.main(g)
    records = read_metrics(folder)
    steps = [r for r in records if "reward_mean" in r]
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    model, tokenizer = _load(folder / "latest")
    train, _ = grpo.split_problems(g)
    prompt_len = sum(len(prompt_ids(tokenizer, p.prompt, g.template)) for p in train[:64]) / min(len(train), 64)
    flops = grpo_flops(model, steps, g, prompt_len)
    result = {"checkpoint": str((folder / "latest").relative_to(ctx.run)), "steps": len(steps),
              "task": g.task, "task_knobs": g.task_knobs, "template": g.template, "group_size": g.group_size,
              "prompts_per_step": g.prompts_per_step, "lr": g.lr,
              "preset": GRPO_PRESETS.get(ctx.cfg.preset, "scratch_grpo"), "greedy_eval_first": evals[0] if evals else None,
              "greedy_eval_last": evals[-1] if evals else None, "eval_size": g.eval_size,
              "reward_first": _head_mean(steps, "reward_mean"), "reward_last": _tail_mean(steps, "reward_mean", 3),
              "response_length_first": _head_mean(steps, "response_length"),
              "response_length_last": _tail_mean(steps, "response_length", 3),
              "model_numbers": model_numbers(model, int(prompt_len) + g.max_new_tokens),
              "resumed_from_step": step, **flops}
    del model
    return result


def _head_mean(records: list[dict], key: str, n: int = 3) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][:n]
    return sum(values) / len(values) if values else None


def grpo_flops(model, steps: list[dict], g, prompt_len: float) -> dict:
    """GRPO's FLOPs from its per-step means: rollouts (prompt prefilled once per group: its G
    samples share it) and μ updates over the kept groups' rows (+ a reference forward when β > 0,
    an old-policy forward when μ > 1). Its own held-out greedy evals are not counted."""
    active = model.num_params(active=True, embedding=False)
    n = g.prompts_per_step * g.group_size
    generated = sum(r["response_length"] * n for r in steps)
    rows_tokens = sum(r.get("signal_fraction", 1.0) * n * (prompt_len + r["response_length"]) for r in steps)
    per_token = model.flops_per_token(int(prompt_len + g.max_new_tokens), training=True)
    extra = 2 * active * rows_tokens * ((g.beta > 0) + (g.iterations > 1))
    rollout = rollout_flops(active, int(generated), int(prompt_len * g.prompts_per_step * len(steps)))
    update = training_flops(per_token, int(rows_tokens * g.iterations)) + extra
    return {"generated_tokens": int(generated), "rollout_flops": rollout, "update_flops": update,
            "flops": rollout + update}


def distill_stage(ctx, folder: Path) -> dict:
    """R1-Distill (§2.4): the GRPO model's verified samples -> SFT of a small dense student."""
    from ..engine.llm import LLM
    from ..train import distill
    cfg, teacher = ctx.cfg, ctx.run / "grpo" / "latest"
    task, knobs, template, max_new = task_of(cfg)
    summary_file = folder / distill.SUMMARY_FILE
    if summary_file.exists():                       # sampled before an interruption: reuse it
        summary = json.loads(summary_file.read_text())
    else:
        problems = load_task(task, split="train", n=cfg.rs_prompts, seed=cfg.seed, **knobs)
        llm = LLM(str(teacher), seed=cfg.seed)
        summary = distill.rejection_sample(llm, problems, folder, samples=cfg.rs_samples, max_new_tokens=max_new,
                                           instruction=_instruction(template), seed=cfg.seed,
                                           teacher_name=str(teacher.relative_to(ctx.run)))
        del llm
        gc.collect()
    teacher_active = ctx.results["grpo"]["model_numbers"]["active_nonembedding_params"]
    summary["flops"] = rollout_flops(teacher_active, summary["generated_tokens"], summary["prompt_tokens"])
    sampling = {k: summary[k] for k in ("prompts", "samples", "correct", "kept", "acceptance_rate", "truncated",
                                        "duplicates", "prompts_kept", "generated_tokens", "seconds", "flops")}
    if summary["kept"] == 0:              # nothing verified to learn from: say so, the run goes on
        return {"skipped": f"none of the teacher's {summary['samples']} samples was verified correct, so no "
                           "student was trained", "rejection_sampling": sampling, "flops": summary["flops"]}
    init = student_init(cfg, teacher, folder / "student_init")
    step = prepare_resume(folder)
    dc = distill.DistillConfig(phase="train", teacher=str(teacher), student=str(init), out=str(folder),
                               data=str(folder / distill.SAMPLES_FILE), steps=cfg.distill_steps, lr=3e-3,
                               warmup_steps=max(1, cfg.distill_steps // 10), seed=cfg.seed, resume=step > 0,
                               save_every=_every(cfg.distill_steps), keep_last=1, plot_every=cfg.distill_steps)
    distill.train_student(dc)
    result = trained(folder, dc.seq_len, step, ctx.run)
    return {**result, "student": cfg.student, "student_size": cfg.student_size, "rejection_sampling": sampling,
            "student_flops": result["flops"], "flops": result["flops"] + summary["flops"]}


def _instruction(template: str) -> str:
    """The line the chat template adds to every question (rollout.CHAT_INSTRUCTION), so rejection
    sampling asks exactly as GRPO and the evals do."""
    from ..train.rollout import CHAT_INSTRUCTION
    return CHAT_INSTRUCTION.format(question="").strip() if template == "chat" else ""


def student_init(cfg: SpeedrunConfig, teacher: Path, init: Path) -> Path:
    """The student at random init with the teacher's tokenizer, as a Hugging Face folder (written once)."""
    from ..checkpoint import load_tokenizer
    from ..model import Transformer
    from ..model.presets import TRAINING_PRESETS
    from ..train.bpe import padded_vocab
    if (init / "config.json").exists():
        return init
    if cfg.student not in TRAINING_PRESETS:
        raise ValueError(f"--student {cfg.student!r}: choose a preset ({', '.join(TRAINING_PRESETS)})")
    tokenizer = load_tokenizer(str(teacher))
    model_cfg = TRAINING_PRESETS[cfg.student](**parse_knobs(cfg.student_size or "")).replace(
        vocab_size=padded_vocab(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    tmp = init.with_name(init.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Transformer(model_cfg.validate()).save_pretrained(tmp, tokenizer=tokenizer)
    os.replace(tmp, init)
    return init


