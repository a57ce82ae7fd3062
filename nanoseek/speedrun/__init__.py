"""`nanoseek speedrun`: DeepSeek-R1's recipe at laptop scale in one command, ending in a report card.

    nanoseek speedrun                                  # cpu preset: SmolLM2-135M, GRPO, <= 20 min on 2 cores
    nanoseek speedrun --preset scratch                 # a small DeepSeek-V3 from random init, <= 15 min
    nanoseek speedrun --preset reasoning               # SmolLM2: cold-start SFT, then GRPO on word problems
    nanoseek speedrun --preset scratch --out runs/s1   # rerun after ^C: finished stages are skipped
    nanoseek speedrun --preset scratch --model tiny_deepseek_v3 --pretrain-steps 20 ...   # shortened

Presets (config.py):
    cpu      the embedded SmolLM2-135M-Instruct evaluated (held-out problems of the GRPO preset's
             task, and MultiArith), trained with GRPO (`nanoseek train grpo --preset smollm2_addition`,
             read at run time), evaluated again, and its served tokens/s measured.
    scratch  R1's pipeline (R1 §2.3-2.4) on a small DeepSeek-V3 (MLA, MoE, MTP): pretraining on
             the synthetic corpus, cold-start SFT, GRPO, rejection sampling and distillation into a
             dense student, each model evaluated, and the MTP module used for speculative decoding
             when serving the GRPO model (acceptance rate, tokens/s with and without drafts).
    reasoning  SmolLM2-135M-Instruct through R1's cold start then RL: evaluated (held-out two-step
             word problems, all of MultiArith, greedy), fine-tuned on worked one- and two-step word
             problems (`--data builtin:word_problems`), trained with GRPO (`nanoseek train grpo
             --preset smollm2_word_problems`), each model evaluated.

Each stage writes DIR/<stage>/ and DIR/<stage>/DONE.json (run.py); DIR/report.md, the report card
(nanoseek/report_card.py), is drawn from those files alone. Left out on purpose: R1's second SFT
round on non-reasoning data and the final all-scenario RL stage, multi-process runs (the stages
themselves take torchrun; the speedrun runs them in one process), and any downloaded data.
"""

from .config import PRESETS, SpeedrunConfig, cpu, reasoning, resolve, scratch


def main(cfg: SpeedrunConfig) -> dict:
    """Run (or resume) the speedrun `cfg` describes; returns the report card's path and headline."""
    from .run import (
        main as run_main,  # the stages import the training code: only when running
    )
    return run_main(cfg)


__all__ = ["PRESETS", "SpeedrunConfig", "cpu", "main", "reasoning", "resolve", "scratch"]
