"""What the speedrun measures on a model: accuracy on problem sets, decode speed with and without MTP drafts.

    llm = LLM("runs/speedrun-scratch/grpo/latest")
    evaluate(llm, problems, template="chat", samples=4, max_tokens=96, seed=0, out="eval.jsonl")
    decode_speed("runs/speedrun-scratch/grpo/latest", prompts, max_tokens=96)

Accuracy is DeepSeek-R1's protocol (§3, "Evaluation Setup") when samples > 1: k samples per problem
at temperature 0.6, top-p 0.95, pass@1 the mean correctness and cons@k the majority vote
(nanoseek.eval.metrics); samples = 1 is greedy. Prompts are built as GRPO builds them
(train/rollout.py: the `chat` template or R1-Zero's `r1_zero` prompt), and answers are graded by
nanoseek.rewards, so the numbers before and after training come from the checker training used.

Speed: the same greedy prompts with `num_speculative_tokens` 0 and 1, one request at a time (a
single stream: the case speculative decoding is for, DeepSeek-V3 §5.4.3) and all at once (a busy
server: its tokens/s prices a served token); the outputs must match token for token.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from ..eval.metrics import problem_scores, summarize
from ..eval.records import problem_seed
from ..report import rollout_flops
from ..rewards import extract_answer, is_correct
from ..tasks.corpus import DOCUMENT
from ..train.rollout import completion_text, prompt_ids

# A base model pretrained on the synthetic corpus knows only its documents' layout, not R1-Zero's
# preamble (train/rollout.py R1_ZERO_PROMPT): it is asked in that layout, up to the open <think>.
CORPUS_PROMPT = DOCUMENT[:DOCUMENT.index("{steps}")]           # "User: {question}\nAssistant: <think>\n"


def ask(tokenizer, question: str, template: str) -> list[int]:
    """Prompt ids under `template`: rollout's chat / r1_zero, or the corpus layout ("corpus")."""
    if template == "corpus":
        return tokenizer.encode(CORPUS_PROMPT.format(question=question), add_special_tokens=True)
    return prompt_ids(tokenizer, question, template)


def graded_text(text: str, template: str) -> str:
    """What the verifier reads: the <think> a prompt opened put back in front."""
    return CORPUS_PROMPT[CORPUS_PROMPT.index("<think>"):] + text if template == "corpus" else \
        completion_text(text, template)


def model_numbers(model, seq_len: int) -> dict:
    """Sizes and per-token FLOPs of a Transformer (what the cost table multiplies by tokens)."""
    return {"params": model.num_params(), "active_params": model.num_params(active=True),
            "active_nonembedding_params": model.num_params(active=True, embedding=False),
            "train_flops_per_token": model.flops_per_token(seq_len, training=True),
            "model_type": model.cfg.model_type, "moe": bool(model.cfg.is_moe), "mtp_layers": len(model.mtp)}


def _params(samples: int, max_tokens: int, seed: int, template: str) -> SamplingParams:
    stop = ["</answer>"] if template in ("r1_zero", "corpus") else None       # its answer ends the reply
    if samples == 1:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed, stop=stop,
                              include_stop_str_in_output=True)
    return SamplingParams(n=samples, temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=seed, stop=stop,
                          include_stop_str_in_output=True)


def evaluate(llm: LLM, problems: list, template: str, samples: int, max_tokens: int, seed: int,
             out: str | Path, label: str = "eval") -> dict:
    """pass@1 (95% interval), cons@k, tokens and seconds on `problems`; every sample to `out` (JSONL)."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    started = time.perf_counter()
    prompts = [{"prompt_token_ids": ask(llm.tokenizer, p.prompt, template)} for p in problems]
    params = [_params(samples, max_tokens, problem_seed(seed, p.id), template) for p in problems]
    requests = llm.generate(prompts, params, use_tqdm=label)
    scores, rows = [], []
    generated = truncated = 0
    for problem, request in zip(problems, requests):
        answers, correct = [], []
        for i, sample in enumerate(request.outputs):
            extracted = extract_answer(graded_text(sample.text, template))
            answers.append(extracted)
            correct.append(bool(is_correct(extracted, problem)))
            generated += len(sample.token_ids)
            truncated += sample.finish_reason == "length"
            rows.append({"problem_id": problem.id, "sample_index": i, "answer": problem.answer,
                         "completion": sample.text, "extracted": extracted, "correct": correct[-1],
                         "finish_reason": sample.finish_reason, "completion_tokens": len(sample.token_ids)})
        scores.append(problem_scores(correct, answers))
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarize(scores)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)   # once per problem: samples share it
    seconds = time.perf_counter() - started
    active = llm.model.num_params(active=True, embedding=False)
    return {"problems": len(problems), "samples": samples, "template": template, "max_tokens": max_tokens,
            "pass@1": summary["pass@1"], "pass@1_ci95": summary["pass@1_ci95"],
            f"cons@{samples}": summary[f"cons@{samples}"], "cons": summary[f"cons@{samples}"],
            "mean_response_tokens": generated / len(rows), "truncated": truncated / len(rows),
            "prompt_tokens": prompt_tokens, "generated_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / max(seconds, 1e-9),
            "flops": rollout_flops(active, generated, prompt_tokens), "samples_file": Path(out).name}


def _timed(llm: LLM, prompts: list[dict], max_tokens: int, one_at_a_time: bool) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    started = time.perf_counter()
    if one_at_a_time:
        outs = [llm.generate([p], params)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, params)
    return [list(o.token_ids) for o in outs], time.perf_counter() - started


def decode_speed(model: str, prompts: list[dict], max_tokens: int, speculative: list[int]) -> dict:
    """tokens/s single stream and batched for each num_speculative_tokens in `speculative` (greedy)."""
    results, reference = {}, {}
    for k in speculative:
        llm = LLM(model, num_speculative_tokens=k)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))      # warm-up, not timed
        before = _spec_totals(llm)
        single, single_s = _timed(llm, prompts, max_tokens, one_at_a_time=True)
        after = _spec_totals(llm)
        batched, batched_s = _timed(llm, prompts, max_tokens, one_at_a_time=False)
        drafts, accepted, steps = (after[i] - before[i] for i in range(3))
        tokens = sum(map(len, single))
        results[str(k)] = {
            "single_stream_tokens_per_s": tokens / max(single_s, 1e-9), "single_stream_s": single_s,
            "batched_tokens_per_s": sum(map(len, batched)) / max(batched_s, 1e-9), "batched_s": batched_s,
            "generated_tokens": tokens, "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "tokens_per_step": (accepted + steps) / steps if steps else None}
        reference = reference or {"single": single, "batched": batched}
        # greedy drafts change the speed, never the tokens (engine/speculative.py); in bfloat16 a batch's
        # make-up (and a verify forward's width) changes the rounding, so batched text may drift
        results[str(k)].update(dtype=str(llm.model.embed.weight.dtype).removeprefix("torch."),
                               same_tokens_single=single == reference["single"],
                               same_tokens_batched=batched == reference["batched"])
        active = llm.model.num_params(active=True, embedding=False)
        results[str(k)]["flops"] = rollout_flops(active, tokens + sum(map(len, batched)),
                                                 2 * sum(len(p["prompt_token_ids"]) for p in prompts))
        del llm
        gc.collect()
    return results


def speculation_is_exact(model: str, prompts: list[dict], max_tokens: int) -> bool:
    """Greedy text with one MTP draft per step equals plain greedy text, in float32 (where no batch
    shape changes the rounding), one request at a time."""
    outputs = []
    for k in (0, 1):
        llm = LLM(model, dtype="float32", num_speculative_tokens=k)
        outputs.append(_timed(llm, prompts, max_tokens, one_at_a_time=True)[0])
        del llm
    gc.collect()
    return outputs[0] == outputs[1]


def _spec_totals(llm: LLM) -> tuple[int, int, int]:
    stats = llm.engine.spec_stats
    return stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_steps
