"""Training benchmark: nanoseek's train_step against a plain PyTorch loop around transformers' model.

Both systems pretrain the same `deepseek_v3` configurations (the `small_deepseek_v3` and
`deepseek_v3_100m` presets, model/presets.py) from the same weights: nanoseek builds the model at
its seeded init and writes it with `save_pretrained`; transformers' `DeepseekV3ForCausalLM` loads
that folder (its config.json is `ModelConfig.to_hf()`, what `AutoConfig.for_model` is given).
Same random-token batches, batch size, sequence length, dtype (bf16 autocast over float32 master
weights where the CPU has fast bf16, the loop's `fast_bf16`, else float32), AdamW (build_optimizer:
β = (0.9, 0.95), weight decay 0.1 on matrices) and gradient clipping at 1.0.

Systems, each in its own subprocess so that its peak RSS (`ru_maxrss`) is its own:
- `nanoseek`: `train_step` without MTP (transformers has no MTP training), the bias update
  (γ = 0.001) and the sequence-wise balance loss (α = 1e-4) on, as `nanoseek train` runs;
- `nanoseek+mtp`: the same with one MTP module at λ = 0.3, reported apart (its model is larger);
- `transformers`: forward (use_cache=False) under the same autocast, cross-entropy on float32
  logits, backward, clip, AdamW step; attention and experts implementations as flagged.
Warm-up steps are not timed; tokens/s is batch × seq_len over the median timed step (a shared
2-core VM makes single steps jitter). MFU is training FLOPs per token (Transformer.flops_per_token,
plus the MTP module for nanoseek+mtp) × tokens/s over the measured bf16 matmul peak
(train/loop.py's measure_peak_flops, same threads). Before timing, a check process computes one
batch's loss with both models at float32 from the same weights: they must agree.

nanoseek trains as `nanoseek train` does by default: with `compile=auto` its blocks are compiled
(train/compiled.py) for both presets, and the compile falls in the untimed warm-up; the first step's
seconds, compile included, are reported beside. transformers runs the plain eager loop the issue
names as the peer. `--compile off` gives nanoseek's eager rows.

Left out on purpose: GPUs (both peers run on the CPU here), data loading (batches are prepared
before timing), multi-process DDP.

    python -m bench.train --quick                       # smoke test: small preset, 1 + 2 steps
    python -m bench.train --out docs/benchmarks.md      # both presets, written into the docs
    nanoseek bench train --presets small_deepseek_v3 --steps 10 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.engine import machine_info, write_section

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("nanoseek", "nanoseek+mtp", "transformers")
PEER = "transformers"
TARGET_SPEEDUP = 1.5


@dataclass
class Spec:
    """One measurement, passed as JSON to its worker process."""
    preset: str
    system: str                  # one of SYSTEMS, or "check" (the same-loss check)
    batch_size: int
    seq_len: int
    warmup: int
    steps: int
    dtype: str = "auto"          # auto (bf16 autocast where fast) | bfloat16 | float32
    threads: int = 0             # 0: torch's default
    seed: int = 0
    hf_attn: str = "sdpa"
    hf_experts: str = ""         # "": transformers' default (grouped_mm) | eager | batched_mm | grouped_mm
    folder: str = ""             # nanoseek's init saved as a Hugging Face folder (written by the parent)
    compile: str = "auto"        # nanoseek's TrainConfig.compile: auto | on | off


# ---- the model both systems train -----------------------------------------------------------------

def model_config(preset: str, mtp: bool, seq_len: int):
    from nanoseek.model.presets import TRAINING_PRESETS
    if preset not in TRAINING_PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose from {', '.join(TRAINING_PRESETS)}")
    cfg = TRAINING_PRESETS[preset]()
    return cfg.replace(n_mtp_layers=1 if mtp else 0, max_seq_len=max(cfg.max_seq_len, seq_len))


def nanoseek_model(spec: Spec, mtp: bool = False, meta: bool = False):
    """The preset at its seeded init; on the meta device only shapes, for parameter and FLOP counts
    that cost no memory."""
    import torch
    from nanoseek.model import Transformer
    torch.manual_seed(spec.seed)
    if meta:
        with torch.device("meta"):
            return Transformer(model_config(spec.preset, mtp, spec.seq_len))
    return Transformer(model_config(spec.preset, mtp, spec.seq_len))


def transformers_model(spec: Spec, folder: Path, dtype=None):
    """transformers' DeepseekV3ForCausalLM from nanoseek's saved folder (same config.json, same weights)."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"experts_implementation": spec.hf_experts} if spec.hf_experts else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation=spec.hf_attn, **kwargs)


def batches(vocab_size: int, spec: Spec, n: int) -> list[dict]:
    """n seeded random-token batches {"input_ids", "labels"} (B, T), labels the next tokens."""
    import torch
    g = torch.Generator().manual_seed(spec.seed + 1)
    out = []
    for _ in range(n):
        rows = torch.randint(vocab_size, (spec.batch_size, spec.seq_len + 1), generator=g)
        out.append({"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()})
    return out


def autocast_dtype(spec: Spec):
    import torch
    from nanoseek.train.loop import fast_bf16
    if spec.dtype not in ("auto", "bfloat16", "float32"):
        raise SystemExit(f"--dtype must be auto, bfloat16 or float32, got {spec.dtype!r}")
    bf16 = spec.dtype == "bfloat16" or (spec.dtype == "auto" and fast_bf16(torch.device("cpu")))
    return torch.bfloat16 if bf16 else None


def training_flops_per_token(model, seq_len: int) -> int:
    """Transformer.flops_per_token, plus the MTP modules' blocks and their pass through the head."""
    c = model.cfg
    flops = model.flops_per_token(seq_len, training=True)
    if len(model.mtp):
        active = lambda mtp: model.num_params(active=True, embedding=False, mtp=mtp)
        extra = active(True) - active(False)
        attn = 2 * len(model.mtp) * c.n_heads * (c.qk_head_dim + c.v_head_dim) * seq_len / 2
        flops += int(3 * (2 * (extra + len(model.mtp) * c.vocab_size * c.dim) + attn))
    return flops


# ---- one training step of each system ------------------------------------------------------------

def nanoseek_stepper(spec: Spec, mtp: bool, **overrides):
    """(model, step(batch) -> loss) running nanoseek's own train_step; `overrides` go to TrainConfig."""
    import torch
    from nanoseek.train.loop import Session, TrainConfig, TrainState, train_step
    from nanoseek.train.optim import build_optimizer
    model = nanoseek_model(spec, mtp)
    cfg = TrainConfig(steps=spec.warmup + spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                      mtp_weight=0.3 if mtp else 0.0, warmup_steps=0, min_lr_ratio=1.0,   # constant lr
                      **{"compile": spec.compile, **overrides})
    state = TrainState(model, build_optimizer(model, cfg.lr, cfg.weight_decay), cfg,
                       Session(torch.device("cpu"), autocast_dtype(spec)))
    step = lambda batch: train_step(state, [batch])["loss"]      # noqa: E731
    step.state = state
    return model, step


def transformers_stepper(spec: Spec, folder: Path):
    """(model, step(batch) -> loss): the plain PyTorch loop around transformers' model."""
    import torch
    import torch.nn.functional as F
    from contextlib import nullcontext
    from nanoseek.train.optim import build_optimizer
    model = transformers_model(spec, folder).train()
    optimizer = build_optimizer(model, 3e-3, 0.1)        # TrainConfig's lr and weight decay
    amp_dtype = autocast_dtype(spec)

    def step(batch):
        amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else nullcontext()
        with amp:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


def run_worker(spec: Spec) -> dict:
    """Build one system, run warm-up + timed steps; return its times, losses and peak RSS."""
    import resource
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.system == "peak":
        from nanoseek.train.loop import measure_peak_flops
        return {"peak_flops": measure_peak_flops(torch.device("cpu"), torch.bfloat16, seconds=1.0)}
    if spec.system == "check":
        return same_loss_check(spec)
    if spec.system not in SYSTEMS:
        raise SystemExit(f"unknown system {spec.system!r}; choose from {', '.join(SYSTEMS)}")
    mtp = spec.system == "nanoseek+mtp"
    if spec.system == PEER:
        model, step = transformers_stepper(spec, Path(spec.folder))
    else:
        model, step = nanoseek_stepper(spec, mtp)
    reference = nanoseek_model(spec, mtp, meta=True)
    data = batches(reference.cfg.vocab_size, spec, spec.warmup + spec.steps)
    times, cpu_times, losses, first = [], [], [], 0.0
    for i, batch in enumerate(data):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(batch))
        if i == 0:
            first = time.perf_counter() - start       # the compile, where nanoseek compiles
        if i >= spec.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"step_seconds": times, "step_cpu_seconds": cpu_times, "losses": losses, "first_step_seconds": first,
            "compiled": hasattr(step, "state") and step.state.compiled,     # still compiled after the steps
            "tokens_per_step": spec.batch_size * spec.seq_len,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": sum(p.numel() for p in model.parameters()),
            "active_params": reference.num_params(active=True, mtp=True),
            "flops_per_token": training_flops_per_token(reference, spec.seq_len), "threads": torch.get_num_threads()}


def same_loss_check(spec: Spec) -> dict:
    """One batch's cross-entropy from nanoseek and from transformers loaded with nanoseek's weights, float32."""
    import torch
    import torch.nn.functional as F
    model = nanoseek_model(spec).eval()
    batch = batches(model.cfg.vocab_size, spec, 1)[0]
    with torch.no_grad():
        theirs = transformers_model(spec, Path(spec.folder)).eval()
        ours_loss = F.cross_entropy(model(batch["input_ids"]).float().flatten(0, 1), batch["labels"].flatten())
        logits = theirs(input_ids=batch["input_ids"], use_cache=False).logits
        their_loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    return {"nanoseek": ours_loss.item(), "transformers": their_loss.item()}


def spawn(spec: Spec, omp_wait_policy: str) -> dict:
    """Run one worker in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ)
    # PASSIVE: idle OpenMP threads sleep instead of spinning. On an oversubscribed VM spinning threads
    # made steps 3-5x slower (both systems); on a quiet one PASSIVE slows nanoseek's compiled kernels
    # (a futex wake-up per parallel region) and speeds transformers' small-model steps
    if omp_wait_policy:
        env.setdefault("OMP_WAIT_POLICY", omp_wait_policy)
    cmd = [sys.executable, "-m", "bench.train", "--worker", json.dumps(dataclasses.asdict(spec))]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ---- report --------------------------------------------------------------------------------------

def summarize(runs: list[dict], peak_flops: float) -> dict:
    """Pool a system's repeats: median step over all timed steps, the highest peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    steps = [s for r in ok for s in r["step_seconds"]]
    cpu = statistics.median([s for r in ok for s in r["step_cpu_seconds"]])
    median = statistics.median(steps)
    first = ok[0]
    tok_s = first["tokens_per_step"] / median
    return {"tok_s": tok_s, "step_ms": median * 1e3, "step_ms_min": min(steps) * 1e3, "cpu_ms": cpu * 1e3,
            "tok_per_cpu_s": first["tokens_per_step"] / cpu,
            "rss_mib": max(r["peak_rss_mib"] for r in ok),
            "mfu": first["flops_per_token"] * tok_s / peak_flops if peak_flops else float("nan"),
            "params": first["params"], "active_params": first["active_params"], "timed_steps": len(steps),
            "first_step_s": max(r.get("first_step_seconds") or 0.0 for r in ok),
            "compiled": any(r.get("compiled") for r in ok),
            "loss_first": first["losses"][0], "loss_last": first["losses"][-1]}


def verdicts(results: dict) -> list[tuple[str, float | None, float | None, bool | None]]:
    """Per preset: (preset, tokens/s ratio, RSS ratio, target met) of nanoseek over transformers."""
    out = []
    for preset, systems in results.items():
        ours, theirs = systems.get("nanoseek", {}), systems.get(PEER, {})
        if "tok_s" not in ours or "tok_s" not in theirs:
            out.append((preset, None, None, None))
            continue
        speed, memory = ours["tok_s"] / theirs["tok_s"], ours["rss_mib"] / theirs["rss_mib"]
        out.append((preset, speed, memory, speed >= TARGET_SPEEDUP and memory <= 1.0))
    return out


def render(results: dict, checks: dict, args, command: str, machine: str, peak_flops: float) -> str:
    head = ["model", "system", "params (active)", "tokens/s", "step ms (median / min)", "CPU ms / step",
            "peak RSS MiB", "MFU", "tok/s ÷ transformers", "tok per CPU-s ÷ transformers", "RSS ÷ transformers",
            "first step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, systems in results.items():
        peer = systems.get(PEER, {})
        for name, r in systems.items():
            if "error" in r:
                lines.append(f"| {preset} | {name} | failed: {r['error'][:160]} |" + " — |" * (len(head) - 3))
                continue
            ratios = [f"{r[key] / peer[key]:.2f}×" if key in peer else "—"
                      for key in ("tok_s", "tok_per_cpu_s", "rss_mib")]
            lines.append(f"| {preset} | {name} | {r['params'] / 1e6:.1f}M ({r['active_params'] / 1e6:.1f}M) | "
                         f"{r['tok_s']:.0f} | {r['step_ms']:.0f} / {r['step_ms_min']:.0f} | {r['cpu_ms']:.0f} | "
                         f"{r['rss_mib']:.0f} | {100 * r['mfu']:.2f}% | {' | '.join(ratios)} | "
                         f"{r.get('first_step_s', 0.0):.1f}{' (compiled)' if r.get('compiled') else ''} |")
    goal = ["| target (nanoseek without MTP vs transformers) | tokens/s ratio | peak RSS ratio | met |",
            "|---|---|---|---|"]
    for preset, speed, memory, met in verdicts(results):
        shown = "—" if speed is None else f"{speed:.2f}× (≥ {TARGET_SPEEDUP:g}×)"
        mem = "—" if memory is None else f"{memory:.2f}× (≤ 1×)"
        goal.append(f"| {preset} | {shown} | {mem} | {'—' if met is None else ('yes' if met else 'no')} |")
    check_lines = []
    for preset, c in checks.items():
        if "error" in c:
            check_lines.append(f"- same-model check, {preset}: failed ({c['error'][:160]})")
        else:
            check_lines.append(f"- same-model check, {preset}: one batch's float32 loss {c['nanoseek']:.6f} (nanoseek) "
                               f"vs {c['transformers']:.6f} (transformers from nanoseek's saved weights), "
                               f"|Δ| = {abs(c['nanoseek'] - c['transformers']):.1e}")
    experts = args.hf_experts or "grouped_mm (its default)"
    return "\n".join([
        "## Training (nanoseek bench train)", "",
        f"Command: `{command}`  ", f"Machine: {machine}  ",
        f"Workload: random-token batches of {args.batch_size} × {args.seq_len} tokens, {args.warmup} warm-up + "
        f"{args.steps} timed steps per system and repeat ({args.repeats} repeat(s), systems alternating); "
        f"dtype {args.dtype_shown}; AdamW (β 0.9/0.95, wd 0.1 on matrices), clip 1.0. tokens/s = tokens per step ÷ "
        f"the median timed step; MFU against the measured matmul peak of {peak_flops / 1e12:.2f} TFLOP/s. "
        f"transformers: DeepseekV3ForCausalLM, attn_implementation={args.hf_attn}, experts_implementation={experts}, "
        f"loaded from nanoseek's saved init; nanoseek's rows include its bias update and balance loss, and "
        f"run `compile={args.compile}` (its blocks compiled where it says so; the compile falls in the first, "
        f"untimed step: the last column, the largest over repeats).", "",
        *lines, "", *goal, "", *check_lines]) + "\n"


def parse_args(argv, prog: str):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small_deepseek_v3,deepseek_v3_100m", help="comma list of model presets")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (both systems)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=8, help="timed steps per system and repeat")
    p.add_argument("--repeats", type=int, default=1, help="runs of every system, alternating their order")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast where fast) | bfloat16 | float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads per system (default: torch's)")
    p.add_argument("--hf-attn", default="sdpa", help="transformers' attn_implementation: sdpa | eager")
    p.add_argument("--hf-experts", default="", help="transformers' experts_implementation (default: its own)")
    p.add_argument("--compile", default="auto", help="nanoseek's train compile: auto (its default) | on | off")
    p.add_argument("--omp-wait-policy", default="", help="OMP_WAIT_POLICY for the workers ('' = the environment's, "
                   "what a user runs; PASSIVE helps on an oversubscribed machine)")
    p.add_argument("--no-check", action="store_true", help="skip the same-loss check")
    p.add_argument("--quick", action="store_true", help="smoke test: small preset, batch 4, 1 warm-up + 2 steps")
    p.add_argument("--out", default=None, help="markdown file whose training section to write")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.batch_size, args.warmup, args.steps = "small_deepseek_v3", 4, 1, 2
    return args


def main(argv=None, prog: str = "python -m bench.train") -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    if args.worker:
        print(json.dumps(run_worker(Spec(**json.loads(args.worker)))))
        return {}
    load_before = os.getloadavg()
    import torch
    threads = args.threads or torch.get_num_threads()
    presets = [p for p in args.presets.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    spec_of = lambda preset, system, folder="": Spec(preset, system, args.batch_size, args.seq_len, args.warmup,
                                                      args.steps, args.dtype, threads, 0, args.hf_attn,
                                                      args.hf_experts, folder, args.compile)
    args.dtype_shown = ("bf16 autocast, float32 master weights" if autocast_dtype(spec_of(presets[0], "nanoseek"))
                        else "float32")
    peaks = [spawn(spec_of("", "peak"), args.omp_wait_policy).get("peak_flops", 0.0)]
    checks, runs = {}, {p: {s: [] for s in systems} for p in presets}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            folder = Path(tmp) / preset
            nanoseek_model(spec_of(preset, "nanoseek")).save_pretrained(folder)   # the init both start from
            if not args.no_check:
                check = dataclasses.replace(spec_of(preset, "check", str(folder)), batch_size=2)
                checks[preset] = spawn(check, args.omp_wait_policy)
                print(f"{preset}: same-loss check {checks[preset]}", file=sys.stderr)
            for r in range(args.repeats):
                for system in (systems if r % 2 == 0 else systems[::-1]):   # alternate: drifting load hits all
                    result = spawn(spec_of(preset, system, str(folder)), args.omp_wait_policy)
                    runs[preset][system].append(result)
                    shown = result.get("error") or f"median step {statistics.median(result['step_seconds']):.3f} s"
                    print(f"{preset} {system} (repeat {r + 1}): {shown}", file=sys.stderr)
    peaks.append(spawn(spec_of("", "peak"), args.omp_wait_policy).get("peak_flops", 0.0))
    peak = max(peaks)      # a peak is the best the machine did; load on a shared VM only lowers it
    results = {p: {s: summarize(runs[p][s], peak) for s in systems} for p in presets}
    command = " ".join([prog, *map(shlex.quote, argv)])
    machine = machine_info(threads, load_before, os.getloadavg(), packages=(("transformers", "transformers"),),
                           note=f", OMP_WAIT_POLICY={args.omp_wait_policy}" if args.omp_wait_policy else "")
    text = render(results, checks, args, command, machine, peak)
    print(text)
    if args.out:
        write_section(Path(args.out), text, "train")
        print(f"wrote the training section of {args.out}", file=sys.stderr)
    return {"results": results, "checks": checks, "peak_flops": peak}


if __name__ == "__main__":
    main()
