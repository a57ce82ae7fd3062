"""GRPO benchmark: nanoseek's GRPO step against TRL's GRPOTrainer, same model, task and shape, one run.

Both train the embedded SmolLM2-135M-Instruct (TRL gets it as a Hugging Face folder converted from
the same GGUF: TRL refuses a GGUF-loaded model) on 2-digit additions asked through the chat
template, with G completions of at most `max_new_tokens` for `prompts` problems per step, one
policy update per step, β as given, the same reward (nanoseek's accuracy verifier) and learning
rate. Each system runs in its own process (its peak RSS is its own; a crash costs one column) in
its default configuration: nanoseek samples through its engine and trains under bf16 autocast
where the CPU has native bf16; TRL generates with transformers' `generate` and trains in float32.

Measured: seconds per step (median and mean over the timed steps, after `warmup` untimed ones) and the
process's peak RSS. The ratio is TRL's seconds per step over nanoseek's.

    python -m bench.grpo                       # G=4, 1 prompt/step, 64 new tokens, beta 0, 10 steps
    python -m bench.grpo --min-new-tokens 64       # every completion 64 tokens: equal work per step
    python -m bench.grpo --beta 0.04 --steps 4
    nanoseek bench grpo --systems nanoseek     # one side only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.engine import cpu_name

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


def _problems(n: int):
    from nanoseek.tasks import load_task
    return load_task("arithmetic", split="train", n=n, seed=0, digits=2, ops="+")


def run_nanoseek(args) -> dict:
    from nanoseek.train.grpo import GRPOConfig, main
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(model="smollm2-135m", task="arithmetic", task_knobs="digits=2,ops=+", out=out,
                         steps=args.warmup + args.steps, group_size=args.group_size, prompts_per_step=args.prompts,
                         max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         temperature=args.temperature, lr=args.lr,
                         beta=args.beta, eval_every=0, eval_size=1, save_every=10**6, template="chat",
                         rollout_dtype=args.rollout_dtype)
        main(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout_s" in r][args.warmup:]
    # a step whose groups all scored alike trains nothing; it still counts (TRL runs its update anyway)
    seconds = [r["rollout_s"] + r["train_s"] for r in steps]
    return {"seconds_per_step": statistics.median(seconds), "steps": seconds, "peak_rss_gib": _peak_rss_gib(),
            "accuracy": statistics.mean(r["accuracy"] for r in steps)}


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import nanoseek
    from nanoseek.rewards import accuracy_reward
    from nanoseek.train.rollout import CHAT_INSTRUCTION

    folder = Path(tempfile.mkdtemp()) / "smollm2"
    model = nanoseek.load_model("smollm2-135m")
    model.save_pretrained(folder, tokenizer=nanoseek.load_tokenizer("smollm2-135m"))
    del model
    problems = _problems(args.prompts * (args.warmup + args.steps) * 2)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": CHAT_INSTRUCTION.format(question=p.prompt)}],
                               "answer": p.answer} for p in problems])

    def reward(completions, answer, **_):
        return accuracy_reward([c[-1]["content"] if isinstance(c, list) else c for c in completions],
                               answer=answer, kind="exact")

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append([time.perf_counter()])

        def on_step_end(self, *a, **k):
            times[-1].append(time.perf_counter())

    config = trl.GRPOConfig(output_dir=str(folder.parent / "out"), num_generations=args.group_size,
                            per_device_train_batch_size=args.group_size * args.prompts,
                            max_completion_length=args.max_new_tokens, max_steps=args.warmup + args.steps,
                            beta=args.beta, learning_rate=args.lr, temperature=args.temperature,
                            generation_kwargs={"min_new_tokens": args.min_new_tokens} if args.min_new_tokens else None,
                            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[Clock()])
    trainer.train()
    seconds = [end - begin for begin, end in times][args.warmup:]
    return {"seconds_per_step": statistics.median(seconds), "steps": seconds, "peak_rss_gib": _peak_rss_gib(),
            "trl": trl.__version__}


def _child(system: str, args) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("systems", "child", "out")]
    proc = subprocess.run([sys.executable, "-m", "bench.grpo", "--child", system, *flags], cwd=REPO,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def main(argv=None, prog: str = "python -m bench.grpo") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="nanoseek,trl", help="comma-separated: nanoseek, trl")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=1, help="problems per step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="ban EOS before this many tokens in both systems (64: every step does the same work)")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--rollout-dtype", default="auto", help="nanoseek's rollout weights (GRPOConfig.rollout_dtype)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_nanoseek(args) if args.child == "nanoseek" else run_trl(args)))
        return
    results = {s: _child(s, args) for s in args.systems.split(",")}
    cpu = cpu_name()
    print(f"CPU: {cpu}; G={args.group_size}, {args.prompts} prompt(s)/step, {args.max_new_tokens} new tokens, "
          f"beta={args.beta}, {args.steps} timed steps"
          + (f", completions of at least {args.min_new_tokens} tokens" if args.min_new_tokens else ""))
    print(f"{'system':<10} {'median s/step':>14} {'mean s/step':>12} {'peak RSS GiB':>13}")
    for system, r in results.items():
        if "error" in r:
            print(f"{system:<10} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
        else:
            r["mean_seconds_per_step"] = statistics.mean(r["steps"])
            print(f"{system:<10} {r['seconds_per_step']:>14.2f} {r['mean_seconds_per_step']:>12.2f} "
                  f"{r['peak_rss_gib']:>13.2f}")
    if all("seconds_per_step" in results.get(s, {}) for s in ("nanoseek", "trl")):
        # a step's time follows its longest completion, so the mean over steps is reported beside the median
        ratio = results["trl"]["seconds_per_step"] / results["nanoseek"]["seconds_per_step"]
        mean_ratio = results["trl"]["mean_seconds_per_step"] / results["nanoseek"]["mean_seconds_per_step"]
        print(f"nanoseek is {ratio:.2f}x (median) / {mean_ratio:.2f}x (mean) faster per step than TRL "
              f"{results['trl'].get('trl', '')}")
        results["speedup"], results["speedup_mean"] = ratio, mean_ratio
    results.update(cpu=cpu, config=vars(args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
