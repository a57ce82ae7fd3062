"""SpeedrunConfig and its presets (`cpu`, `scratch`, `reasoning`), Python functions returning a config.

A field left at None takes its preset's value; a flag given on the command line wins over the
preset. In the `cpu` preset the GRPO settings (task, knobs, completion length) stay None: they are
read from `nanoseek.train.grpo.PRESETS["smollm2_addition"]` when the stage runs, so the speedrun
follows that preset as it is tuned instead of a copy of its numbers. Only its step count is the
speedrun's own: 20 of the preset's 30, where its held-out accuracy peaked (75% at step 20, 71% at
30, docs/benchmarks.md), which keeps the whole run inside its 20 minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..configs import arg

# R1-launch era rental price of a 2-vCPU on-demand cloud VM (AWS c7i.large: $0.0893/h in
# us-east-1; GCP e2-standard-2: $0.067/h), rounded up: the machine these presets are sized for.
VM_USD_PER_HOUR = 0.10
# A desktop CPU package at full load (65 W TDP class); the 2 vCPUs of a shared server draw less.
VM_WATTS = 65.0
# US average retail electricity price, 2024-25 (EIA: ~$0.17/kWh).
USD_PER_KWH = 0.17
# MultiArith as the team's data folder holds it; the package never needs it (the stage is skipped).
SHARED_MULTIARITH = "../shared/data/multiarith.jsonl"


@dataclass
class SpeedrunConfig:
    preset: str = arg("cpu", "cpu (SmolLM2 + GRPO, <= 20 min on 2 cores) | scratch (V3-style model from "
                             "random init: pretrain, SFT, GRPO, distillation, MTP serving, <= 15 min) | "
                             "reasoning (SmolLM2: cold-start SFT + GRPO on word problems, MultiArith, <= 30 min)",
                      choices=["cpu", "scratch", "reasoning"])
    out: str | None = arg(None, "run folder; a rerun with the same folder skips finished stages "
                                "(default: runs/speedrun-<preset>)")
    model: str | None = arg(None, "cpu: the model trained (smollm2-135m); scratch: the preset pretrained "
                                  "(small_deepseek_v3)")
    task: str | None = arg(None, "built-in task trained and evaluated (cpu: the GRPO preset's)")
    task_knobs: str | None = arg(None, "its difficulty knobs, e.g. 'digits=2,ops=+' (cpu: the GRPO preset's)")
    pretrain_steps: int | None = arg(None, "scratch: pretraining steps on the synthetic corpus")
    corpus_size: int | None = arg(None, "scratch: documents of the synthetic pretraining corpus")
    sft_steps: int | None = arg(None, "scratch, reasoning: cold-start SFT steps on synthetic worked examples")
    grpo_steps: int | None = arg(None, "GRPO steps (cpu: the GRPO preset's)")
    distill_steps: int | None = arg(None, "scratch: SFT steps of the dense student")
    student: str | None = arg(None, "scratch: the student preset (tiny_qwen2 | tiny_llama)")
    student_size: str | None = arg(None, "scratch: overrides of the student preset, e.g. 'dim=128,n_layers=4'")
    rs_prompts: int | None = arg(None, "scratch: train problems rejection-sampled from the GRPO model")
    rs_samples: int | None = arg(None, "scratch: samples per problem in rejection sampling")
    eval_size: int | None = arg(None, "held-out problems of the task per evaluation")
    eval_samples: int | None = arg(None, "k samples per problem (R1: T 0.6, top-p 0.95; 1 = greedy)")
    max_new_tokens: int | None = arg(None, "longest answer on the task (cpu: the GRPO preset's)")
    real_data: str = arg(SHARED_MULTIARITH, "a real JSONL test set (MultiArith); '' or a missing file skips it")
    real_size: int | None = arg(None, "problems of the real set per evaluation")
    real_max_tokens: int | None = arg(None, "longest answer on the real set")
    speed_prompts: int | None = arg(None, "prompts timed for tokens/s and the MTP speed-up (greedy)")
    speed_tokens: int | None = arg(None, "most new tokens per timed prompt")
    usd_per_hour: float = arg(VM_USD_PER_HOUR, "stated rental price of this machine, USD per hour "
                                               "(default: a 2-vCPU on-demand cloud VM)")
    watts: float = arg(VM_WATTS, "stated average power draw of this machine while it runs, W")
    usd_per_kwh: float = arg(USD_PER_KWH, "stated electricity price, USD per kWh")
    seed: int = arg(0, "seed of every stage")


def cpu() -> SpeedrunConfig:
    """SmolLM2-135M-Instruct: evaluated, trained with GRPO (the smollm2_addition preset), evaluated again."""
    return SpeedrunConfig(preset="cpu", model="smollm2-135m", grpo_steps=20, eval_size=100, eval_samples=4, real_size=40,
                          real_max_tokens=256, speed_prompts=16, speed_tokens=64)


def scratch() -> SpeedrunConfig:
    """A small DeepSeek-V3 (MLA, MoE, MTP) from random init through R1's whole recipe."""
    return SpeedrunConfig(preset="scratch", model="small_deepseek_v3", task="arithmetic", task_knobs="digits=2,ops=+",
                          pretrain_steps=1000, corpus_size=20000, sft_steps=100, grpo_steps=20, distill_steps=150,
                          student="tiny_qwen2", student_size="dim=128,n_layers=4,n_heads=4,n_kv_heads=2,head_dim=32,"
                          "inter_dim=384", rs_prompts=200, rs_samples=4, eval_size=200, eval_samples=1,
                          max_new_tokens=96, real_size=100, real_max_tokens=96, speed_prompts=8, speed_tokens=96)


def reasoning() -> SpeedrunConfig:
    """SmolLM2-135M-Instruct through R1's cold start then RL on word problems: evaluated, fine-tuned on
    worked one- and two-step stories (the corpus's word_problems mix), trained with GRPO on two-step
    ones (the smollm2_word_problems preset), evaluated again; greedy, on all of MultiArith."""
    return SpeedrunConfig(preset="reasoning", model="smollm2-135m", sft_steps=60, eval_size=200, eval_samples=1,
                          real_size=600, real_max_tokens=256)


PRESETS = {f.__name__: f for f in (cpu, scratch, reasoning)}
# fields that only price the run: changing them re-renders the report, it redoes no stage
REPORT_ONLY = ("usd_per_hour", "watts", "usd_per_kwh")


def resolve(cfg: SpeedrunConfig) -> SpeedrunConfig:
    """The preset's values where `cfg` left None; the default run folder; checks."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown speedrun preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None}
    base = PRESETS[cfg.preset]()
    default = SpeedrunConfig()
    # a field the preset sets and the user left at its dataclass default keeps the preset's value
    given = {k: v for k, v in given.items() if not (v == getattr(default, k) and getattr(base, k) != v)
             or k == "preset"}
    cfg = dataclasses.replace(base, **given)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(Path("runs") / f"speedrun-{cfg.preset}"))
    for name in ("pretrain_steps", "sft_steps", "grpo_steps", "distill_steps", "rs_prompts", "rs_samples",
                 "eval_size", "eval_samples", "real_size", "speed_prompts", "speed_tokens", "corpus_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in REPORT_ONLY:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    return cfg


def real_set(cfg: SpeedrunConfig) -> Path | None:
    """The real test set's path, or None when it is switched off or absent (the stages say so)."""
    return Path(cfg.real_data) if cfg.real_data and Path(cfg.real_data).is_file() else None
