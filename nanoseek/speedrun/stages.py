"""The speedrun's stages in order, per preset, and the two that measure a model.

    eval_*    held-out problems of the task and the real set (measure.evaluate)
    speed     greedy tokens/s with num_speculative_tokens 0 and 1 (MTP drafts), measure.decode_speed
    the rest  training.py: pretrain, sft, grpo, distill

A stage is a function (ctx, folder) -> results; run.py writes them to DIR/<stage>/DONE.json.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..tasks import load_task
from .config import SpeedrunConfig, real_set
from .measure import ask, decode_speed, evaluate, speculation_is_exact
from .training import distill_stage, grpo_stage, pretrain_stage, sft_stage, task_of


@dataclass
class Context:
    cfg: SpeedrunConfig
    run: Path                       # DIR
    results: dict                   # stage name -> its DONE.json, for the stages finished so far


@dataclass
class Stage:
    name: str                       # folder and marker: DIR/<name>/DONE.json
    label: str                      # how the report names the stage's model
    fn: Callable[[Context, Path], dict]


# ---- measuring stages ---------------------------------------------------------------------------

def eval_stage(source: Callable[[Context], str], template: str | None = None, after: str | None = None):
    """A stage evaluating the model `source(ctx)` names on the held-out task and the real set
    (skipped when the stage `after`, which makes that model, was skipped)."""
    def run(ctx: Context, folder: Path) -> dict:
        from ..engine.llm import LLM
        cfg = ctx.cfg
        if after and "skipped" in ctx.results.get(after, {}):
            return {"skipped": f"no model to evaluate: {after} was skipped", "flops": 0.0}
        task, knobs, trained_template, max_new = task_of(cfg)
        use = template or trained_template
        model = source(ctx)
        # before and after run alike: the base GGUF would default to int4, the trained folder to bf16
        llm = LLM(model, seed=cfg.seed, quantization="none")
        heldout = load_task(task, split="test", n=cfg.eval_size, **knobs)
        result = {"model": _relative(model, ctx.run), "template": use,
                  "heldout": {"name": f"{task} {','.join(f'{k}={v}' for k, v in knobs.items())}".strip(),
                              **evaluate(llm, heldout, use, cfg.eval_samples, max_new, cfg.seed,
                                         folder / "heldout.jsonl", label=f"eval {task}")}}
        path = real_set(cfg)
        if path is None:
            note = "switched off (--real-data '')" if not cfg.real_data else f"{cfg.real_data} not found"
            result["real"] = {"name": Path(cfg.real_data).stem or "real set", "skipped": note}
        else:
            problems = load_task(str(path), n=cfg.real_size)
            result["real"] = {"name": path.stem, **evaluate(llm, problems, use, cfg.eval_samples, cfg.real_max_tokens,
                                                            cfg.seed, folder / "real.jsonl", label=f"eval {path.stem}")}
        result["flops"] = result["heldout"]["flops"] + result["real"].get("flops", 0.0)
        del llm
        gc.collect()
        return result
    return run


def _relative(model: str, run: Path) -> str:
    try:
        return str(Path(model).relative_to(run))
    except ValueError:
        return model


def speed_stage(ctx: Context, folder: Path) -> dict:
    """Served tokens/s of the trained model, and what MTP drafts buy when it has an MTP module."""
    from ..checkpoint import load_tokenizer
    cfg = ctx.cfg
    model = ctx.run / "grpo" / "latest"
    task, knobs, template, _ = task_of(cfg)
    tokenizer = load_tokenizer(str(model))
    problems = load_task(task, split="test", n=cfg.speed_prompts, seed=cfg.seed + 1, **knobs)
    prompts = [{"prompt_token_ids": ask(tokenizer, p.prompt, template)} for p in problems]
    has_mtp = json.loads((model / "config.json").read_text()).get("num_nextn_predict_layers", 0) > 0
    runs = decode_speed(str(model), prompts, cfg.speed_tokens, [0, 1] if has_mtp else [0])
    result = {"model": _relative(str(model), ctx.run), "prompts": len(prompts), "max_tokens": cfg.speed_tokens,
              "mtp": has_mtp, "runs": runs, "flops": sum(r["flops"] for r in runs.values())}
    if has_mtp:
        result["float32_same_tokens"] = speculation_is_exact(str(model), prompts, cfg.speed_tokens)
        result["speedup_single_stream"] = runs["1"]["single_stream_tokens_per_s"] / runs["0"]["single_stream_tokens_per_s"]
        result["speedup_batched"] = runs["1"]["batched_tokens_per_s"] / runs["0"]["batched_tokens_per_s"]
    best = max(runs.values(), key=lambda r: r["batched_tokens_per_s"])
    result["served_tokens_per_s"] = best["batched_tokens_per_s"]
    return result


def pipeline(cfg: SpeedrunConfig) -> list[Stage]:
    """The stages of a preset, in order."""
    base = lambda ctx: ctx.cfg.model
    at = lambda stage: (lambda ctx: str(ctx.run / stage / "latest"))
    if cfg.preset == "cpu":
        return [Stage("eval_base", f"{cfg.model} (before)", eval_stage(base)),
                Stage("grpo", "GRPO", grpo_stage), Stage("eval_grpo", "after GRPO", eval_stage(at("grpo"))),
                Stage("speed", "serving", speed_stage)]
    if cfg.preset == "reasoning":
        return [Stage("eval_base", f"{cfg.model} (before)", eval_stage(base)),
                Stage("sft", "cold-start SFT", sft_stage), Stage("eval_sft", "after SFT", eval_stage(at("sft"))),
                Stage("grpo", "GRPO", grpo_stage), Stage("eval_grpo", "after GRPO", eval_stage(at("grpo")))]
    return [Stage("pretrain", "pretraining", pretrain_stage),
            Stage("eval_pretrain", "base (pretrained)", eval_stage(at("pretrain"), "corpus")),
            Stage("sft", "cold-start SFT", sft_stage), Stage("eval_sft", "after SFT", eval_stage(at("sft"))),
            Stage("grpo", "GRPO", grpo_stage), Stage("eval_grpo", "after GRPO", eval_stage(at("grpo"))),
            Stage("distill", "rejection sampling + distillation", distill_stage),
            Stage("eval_distill", f"distilled {cfg.student}", eval_stage(at("distill"), after="distill")),
            Stage("speed", "serving (MTP speculative decoding)", speed_stage)]
