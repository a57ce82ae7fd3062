"""Engine benchmark: nanoseek against transformers' `generate` and llama.cpp, in one run, as ratios.

All systems run the embedded SmolLM2-135M-Instruct (Q4_1 GGUF) on the same prompt token ids, on
the same threads, each in its own process (a crash costs its column, not the run), loaded side by
side and measured in turn: every measurement is taken once per system before the next one, the
order rotating each repeat, so a slow spell of the machine (this VM's speed moves by a quarter
from minute to minute) hits every system alike instead of one system's whole column (the
systems: bench/engine_systems.py). transformers dequantizes the GGUF to float32 / bfloat16 and
serves static batches with left padding; llama-cpp-python runs the GGUF as it is (Q4_1) and,
having no batching in its Python API, serves concurrent requests one after another. Every request decodes greedily and ignores EOS, so each produces exactly `new_tokens`.

Measured per system: output tokens/s at 1, 8 and 32 concurrent requests of 128 new tokens (all
submitted at once), time to first token (TTFT), prefill tokens/s on a 512-token prompt, and the
TTFT of a request whose 1,000-token prefix is cached vs not. Ratios are nanoseek's speedup over
each peer: tokens/s divided by the peer's, or the peer's latency divided by nanoseek's. For
nanoseek alone, sampled decoding as R1's evaluation protocol and GRPO rollouts run it
(temperature 0.6, top-p 0.95, seeded, n = 4 samples of 8 prompts) beside greedy on the same shape.

Left out on purpose: GPUs (a CPU benchmark: the peers run on CPU), sampling for the peers
(greedy only), llama.cpp's HTTP server (its batching would need a second process), warm-up beyond one call.

    python -m bench.engine --quick                      # smoke test: 16 new tokens, 1 and 4 concurrent
    python -m bench.engine --out docs/benchmarks.md     # the full run, written into the docs
    python -m bench.engine --peers llama.cpp --hf-dtype float32
    nanoseek bench engine ...                           # the same, through the CLI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"  # optional; a built-in list otherwise
BUILTIN_QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas. "
    "A large pizza has 16 slices and a small pizza has 8 slices. If he eats it all, how many pieces does he eat that day?",
    "Ken created a care package to send to his brother, who was away at boarding school. Ken placed a box on a "
    "scale, and then he poured into the box enough jelly beans to bring the weight to 2 pounds. Then, he added "
    "enough brownies to cause the weight to triple. Next, he added another 2 pounds of jelly beans. And finally, "
    "he added enough gummy worms to double the weight once again. What was the final weight of the box of goodies, in pounds?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow, "
    "and there are 80% more of those in purple. There are only 25% as many green flowers as there are yellow and "
    "purple flowers. How many flowers does Mark have in his garden?",
    "Tina makes $18.00 an hour. If she works more than 8 hours per shift, she is eligible for overtime, which is "
    "paid by your hourly wage + 1/2 your hourly wage. If she works 10 hours every day for 5 days, how much money does she make?",
]


@dataclass
class Workload:
    """The prompts every system gets, as token ids (the same ids for all of them)."""
    prompts: list[list[int]]          # one chat-templated question per concurrent request
    long_prompt: list[int]            # exactly `prefill_tokens` ids of real text
    prefix: list[int]                 # exactly `prefix_tokens` ids shared by the cached-prefix requests
    suffixes: list[list[int]]         # distinct questions (+ the assistant turn) after the prefix
    new_tokens: int
    concurrency: list[int]
    repeats: int                      # every measurement is the median of this many runs


def read_questions(path: Path = GSM8K) -> tuple[list[str], str]:
    """Questions (and a long text) from GSM8K when the shared data folder exists, else a built-in list."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:200]]
        return [r["question"] for r in rows[:100]], "\n\n".join(r["question"] + "\n" + r["answer"] for r in rows[100:])
    return BUILTIN_QUESTIONS, "\n\n".join(BUILTIN_QUESTIONS * 12)


def build_workload(tokenizer, quick: bool, prefill_tokens: int = 512, prefix_tokens: int = 1000) -> Workload:
    questions, text = read_questions()
    # The chat template split at a marker: head + user content + tail is exactly the rendered prompt.
    head, tail = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}]).split("\x00")
    concurrency = [1, 4] if quick else [1, 8, 32]
    # Past the real questions (built-in list only) a request number keeps every prompt distinct.
    prompts = [tokenizer.encode(head + questions[i % len(questions)] + ("" if i < len(questions) else f" ({i})") + tail)
               for i in range(max(concurrency))]
    document = tokenizer.encode(head + "Read these worked examples.\n\n" + text)
    if len(document) < max(prefill_tokens, prefix_tokens):
        raise ValueError(f"only {len(document)} tokens of text for a {max(prefill_tokens, prefix_tokens)}-token prompt")
    suffixes = [tokenizer.encode(f"\n\nNow answer this question: {q}{tail}") for q in questions[:6]]
    return Workload(prompts, document[:prefill_tokens], document[:prefix_tokens], suffixes,
                    new_tokens=16 if quick else 128, concurrency=concurrency, repeats=1 if quick else 3)


# ---- measurements: units of one run each, a system's worker process runs them -------------------
# A unit is one sample of one measurement; the parent asks every system for the same unit in turn
# (their order rotated every repeat), so a slow spell of the machine hits all of them alike.

SAMPLED = dict(temperature=0.6, top_p=0.95, seed=0, n=4)   # R1's evaluation protocol, k = 4 samples


def units(work: Workload) -> list[list]:
    return [["throughput", n] for n in work.concurrency] + [["sampling"], ["ttft"], ["prefill"], ["prefix"]]


def run_unit(runner, work: Workload, unit: list, index: int) -> dict:
    """One sample of `unit` on `runner`; `index` (the repeat) picks the prompts that vary."""
    kind = unit[0]
    if kind == "throughput":        # N requests submitted at once: wall time and their TTFTs
        wall, ttfts = runner.generate(work.prompts[:unit[1]], work.new_tokens)
        return {"wall": wall, "ttft_mean": statistics.mean(ttfts), "ttft0": ttfts[0]}
    if kind == "sampling":          # nanoseek only: greedy then SAMPLED on the same shape, n = 4 each
        if not hasattr(runner, "sampled"):
            return {}
        prompts = work.prompts[:max(1, max(work.concurrency) // 4)]
        return {"greedy": runner.sampled(prompts, work.new_tokens, n=4),
                "sampled": runner.sampled(prompts, work.new_tokens, **SAMPLED)}
    if kind == "ttft":              # a single chat request, one new token
        return {"ttft": runner.generate([work.prompts[index % len(work.prompts)]], 1)[1][0]}
    if kind == "prefill":           # the long prompt, a fresh cache every time
        return {"ttft": runner.generate([work.long_prompt], 1)[1][0]}
    if kind == "prefix":            # prefix + question B, cold vs right after prefix + question A
        first, second = (work.prefix + work.suffixes[(2 * index + i) % len(work.suffixes)] for i in (0, 1))
        out = {"cold": runner.generate([second], 1)[1][0]}
        if runner.has_prefix_cache:
            out["warm"] = runner.cached_ttft(first, second)
        return out
    raise ValueError(f"unknown measurement {unit}")


def summarize(samples: dict, work: Workload) -> dict:
    """A system's metrics from its samples {unit key: [one dict per repeat]}: medians over the repeats
    (single runs of one system varied by 5-10% on a 2-core VM; a busy spell can cost 30%)."""
    out = {}
    for n in work.concurrency:
        runs = sorted(samples.get(f"throughput {n}", []), key=lambda r: r["wall"])
        if runs:
            run = runs[len(runs) // 2]                 # the run of median wall time, with its TTFTs
            out[f"tok_s@{n}"] = n * work.new_tokens / run["wall"]
            out[f"ttft_mean@{n}"] = run["ttft_mean"]
            if n == 1:   # the steady decode rate, without the prefill (what llama-bench's tg reports)
                out["decode_tok_s"] = (work.new_tokens - 1) / (run["wall"] - run["ttft0"])
    median = lambda unit, key: statistics.median(r[key] for r in samples[unit]) \
        if samples.get(unit) and all(key in r for r in samples[unit]) else None
    prompts = max(1, max(work.concurrency) // 4)
    for kind in ("greedy", "sampled"):
        if (wall := median("sampling", kind)) is not None:
            out[f"{kind}_n4_tok_s"] = prompts * 4 * work.new_tokens / wall
    if "sampled_n4_tok_s" in out:
        out["sampled_vs_greedy"] = out["sampled_n4_tok_s"] / out["greedy_n4_tok_s"]
    if (ttft := median("ttft", "ttft")) is not None:
        out["ttft"] = ttft
    if (ttft := median("prefill", "ttft")) is not None:
        out["prefill_tok_s"] = len(work.long_prompt) / ttft
    cold, warm = median("prefix", "cold"), median("prefix", "warm")
    if cold is not None:
        out["ttft_uncached"] = cold
    if warm is not None:
        out["ttft_cached"], out["prefix_speedup"] = warm, cold / warm
    return out


def worker_main(system: str, args, gguf: Path, tokenizer, threads: int) -> None:
    """A system's own process: build it, warm it up, then run the units the parent sends, one JSON
    line in and one out. Protocol lines go to the original stdout, anything the libraries print to
    stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    send = lambda obj: (channel.write(json.dumps(obj) + "\n"), channel.flush())
    work = build_workload(tokenizer, args.quick)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from bench.engine_systems import make_runner
    try:
        runner = make_runner(system, args, gguf, pad_id, threads)
    except ImportError as e:  # nanoseek's engine on an old checkout, a peer without the bench extra
        send({"error": f"not measured: {e}"})
        return
    runner.generate(work.prompts[:2], 2)  # warm-up: first-call allocations and kernel selection
    send({"name": runner.name, "weights": runner.weights})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("close"):
            send({"notes": runner.notes})
            return
        send(run_unit(runner, work, request["unit"], request["index"]))


class Worker:
    """The parent's handle on one system's process (python -m bench.engine --worker SYSTEM ...)."""

    def __init__(self, system: str, argv: list[str]):
        import subprocess
        import threading
        self.system, self.tail, self.error = system, [], None
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.engine", "--worker", system, *argv], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._echoing = threading.Thread(target=self._echo, daemon=True)
        self._echoing.start()
        hello = self._read()
        self.name, self.weights = hello.get("name", system), hello.get("weights", "")

    def _echo(self) -> None:      # the worker's progress to our stderr; its last lines kept for a crash note
        for line in self.proc.stderr:
            sys.stderr.write(line)
            self.tail = (self.tail + [line])[-20:]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:              # it exited: its last words are on stderr, once the echo has read them
            code = self.proc.wait()
            self._echoing.join(timeout=5)
            return self._failed(f"{self.system} exited (code {code}): {''.join(self.tail)[-600:].strip()}")
        reply = json.loads(line)
        return self._failed(reply["error"]) if "error" in reply else reply

    def _failed(self, error: str) -> dict:
        self.error = error
        return {"error": error}

    def ask(self, request: dict) -> dict | None:
        """The reply to `request`, or None once the process has failed (self.error says why)."""
        if self.error:
            return None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                  # _read reports the exit
        reply = self._read()
        return None if self.error else reply

    def close(self) -> list[str]:
        reply = self.ask({"close": True}) or {}
        self.proc.wait()
        return reply.get("notes", [])


# ---- report ---------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    label: str
    fmt: str
    higher_is_better: bool = True
    scale: float = 1.0


def table_rows(work: Workload) -> list[Row]:
    n_prefill, n_prefix = len(work.long_prompt), len(work.prefix)
    rows = [Row(f"tok_s@{n}", f"output tok/s, {n} concurrent × {work.new_tokens} new", "{:.1f}") for n in work.concurrency]
    prompts = max(1, max(work.concurrency) // 4)
    shape = f"{prompts} prompt{'s' * (prompts > 1)} × n = 4 × {work.new_tokens} new"
    rows.append(Row("greedy_n4_tok_s", f"output tok/s, {shape}, greedy", "{:.1f}"))
    rows.append(Row("sampled_n4_tok_s", f"output tok/s, {shape}, temperature 0.6, top-p 0.95, seeded", "{:.1f}"))
    rows.append(Row("sampled_vs_greedy", "sampled ÷ greedy output tok/s (×)", "{:.2f}"))
    rows.append(Row("decode_tok_s", "decode tok/s, 1 request, after its first token", "{:.1f}"))
    rows.append(Row("ttft", "TTFT, 1 request (ms)", "{:.0f}", False, 1e3))
    rows.append(Row(f"ttft_mean@{max(work.concurrency)}", f"TTFT, mean of {max(work.concurrency)} concurrent (ms)",
                    "{:.0f}", False, 1e3))
    rows.append(Row("prefill_tok_s", f"prefill tok/s, {n_prefill}-token prompt", "{:.0f}"))
    rows.append(Row("ttft_uncached", f"TTFT, {n_prefix:,}-token prefix not cached (ms)", "{:.0f}", False, 1e3))
    rows.append(Row("ttft_cached", f"TTFT, {n_prefix:,}-token prefix cached (ms)", "{:.0f}", False, 1e3))
    rows.append(Row("prefix_speedup", "TTFT speedup from the cached prefix (×)", "{:.1f}"))
    return rows


def targets(work: Workload) -> list[tuple[str, str, str | None, float]]:
    """(description, metric, peer to divide by or None for nanoseek's own value, minimum) — the issue's goals."""
    top = f"tok_s@{max(work.concurrency)}"
    return [(f"{max(work.concurrency)} concurrent vs transformers float32", top, "transformers float32", 5.0),
            (f"{max(work.concurrency)} concurrent vs transformers bfloat16", top, "transformers bfloat16", 2.0),
            ("single stream vs llama.cpp", "tok_s@1", "llama.cpp", 1.0),
            ("prefill vs llama.cpp", "prefill_tok_s", "llama.cpp", 2.0),
            ("TTFT with the prefix cached vs not", "prefix_speedup", None, 10.0),
            ("sampled (temperature 0.6, top-p 0.95, seeded, n = 4) vs greedy", "sampled_vs_greedy", None, 0.9)]


def ratio(results: dict, row_key: str, peer: str, higher_is_better: bool = True) -> float | None:
    """nanoseek's speedup over `peer` on one metric (> 1: nanoseek is better), None if either is missing."""
    ours, theirs = results.get("nanoseek", {}).get(row_key), results.get(peer, {}).get(row_key)
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for every benchmark's machine line."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def machine_info(threads: int, load_before: tuple, load_after: tuple, note: str = "",
                 packages=(("transformers", "transformers"), ("llama_cpp", "llama-cpp-python"))) -> str:
    """CPU, threads, versions of torch and the peers' `packages` (module, name), load before / after."""
    import torch
    versions = [f"torch {torch.__version__}"]
    for module, name in packages:
        try:
            versions.append(f"{name} {__import__(module).__version__}")
        except ImportError:
            pass
    load = " / ".join(", ".join(f"{x:.2f}" for x in avg) for avg in (load_before, load_after))
    # a load well above `threads` means something else shared the CPUs: the numbers are then suspect
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads for every system{note}; "
            f"{', '.join(versions)}; Python {platform.python_version()}; load average (1, 5, 15 min) before / "
            f"after the run: {load}")


def render(results: dict, columns: dict, work: Workload, command: str, machine: str, notes: list[str]) -> str:
    peers = [name for name in columns if name != "nanoseek"]
    head = ["metric"] + [name if columns[name] in name else f"{name} ({columns[name]})" for name in columns]
    head += [f"nanoseek ÷ {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows(work):
        cells = [row.label]
        for name in columns:
            value = results.get(name, {}).get(row.key)
            cells.append("—" if value is None else row.fmt.format(value * row.scale))
        for peer in peers:
            r = ratio(results, row.key, peer, row.higher_is_better)
            cells.append("—" if r is None else f"{r:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    goal_lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for text, key, peer, goal in targets(work):
        value = ratio(results, key, peer) if peer else results.get("nanoseek", {}).get(key)
        shown = "—" if value is None else f"{value:.2f}×"
        met = "—" if value is None else ("yes" if value >= goal else "no")
        goal_lines.append(f"| {text} | {shown} | ≥ {goal:g}× | {met} |")
    mean_prompt = statistics.mean(len(p) for p in work.prompts)
    return "\n".join([
        "## Engine: nanoseek vs transformers vs llama.cpp on SmolLM2-135M-Instruct (Q4_1 GGUF)", "",
        f"Command: `{command}`  ", f"Machine: {machine}  ",
        f"Workload: {len(work.prompts)} chat-templated questions (mean {mean_prompt:.0f} prompt tokens), greedy, "
        f"EOS ignored so every request makes exactly {work.new_tokens} tokens; all concurrent requests are "
        f"submitted at once; each number is the median of {work.repeats} runs, the systems (each in its own "
        f"process) taking turns at every measurement. Weight dtype in each column header. "
        f"Ratios are nanoseek's speedup (tokens/s ÷ the "
        f"peer's, or the peer's latency ÷ nanoseek's): above 1× nanoseek is faster.", "",
        *lines, "", *goal_lines, "", *(f"- {note}" for note in notes)]) + "\n"


def write_section(path: Path, text: str, name: str = "engine") -> None:
    """Replace benchmark `name`'s section of `path` (between its markers), or append it."""
    start, end = f"<!-- bench {name}: start -->", f"<!-- bench {name}: end -->"
    section = f"{start}\n{text}{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\nResults, with the commands that made them.\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        new = before + section + ("\n" + after if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def parse_args(argv, prog: str):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name or .gguf file (the peers need a GGUF)")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens, 1 and 4 concurrent, no repeats")
    p.add_argument("--peers", default="transformers,llama.cpp", help="comma list of transformers, llama.cpp (or none)")
    p.add_argument("--dtype", default="auto", help="nanoseek's weight dtype (auto: LLM's default)")
    p.add_argument("--quantization", default="auto",
                   help="nanoseek's quantization: auto (LLM's default) | none | int8 (W8A8) | int4 (weights)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="nanoseek's torch.compile: auto (its default) | on | off (warm-up not timed)")
    p.add_argument("--hf-dtype", default="float32,bfloat16", help="transformers' weight dtypes, comma list")
    p.add_argument("--no-nanoseek", action="store_true", help="run the peers only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every system (default: torch's)")
    p.add_argument("--out", default=None, help="markdown file whose engine section to write (e.g. docs/benchmarks.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)      # run one system's process (internal)
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m bench.engine") -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    load_before = os.getloadavg()
    import torch
    from nanoseek.checkpoint import resolve
    from nanoseek import load_tokenizer
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    gguf = resolve(args.model)
    if gguf.suffix != ".gguf":
        raise SystemExit(f"{args.model}: the peers run a GGUF file; pass a built-in name or a .gguf path")
    tokenizer = load_tokenizer(gguf)
    if args.worker:
        worker_main(args.worker, args, gguf, tokenizer, threads)
        return {}
    work = build_workload(tokenizer, args.quick)
    peers = [p.strip() for p in args.peers.split(",") if p.strip() not in ("", "none")]
    systems = [] if args.no_nanoseek else ["nanoseek"]
    notes = []
    if "transformers" in peers:
        systems += [f"transformers:{dtype}" for dtype in args.hf_dtype.split(",")]
        notes.append("transformers: the Q4_1 GGUF dequantized to the dtype shown; one static batch per "
                     "concurrency level (every request waits for the batch's prefill), sdpa attention.")
    if "llama.cpp" in peers:
        systems.append("llama.cpp")
        notes.append("llama.cpp: its Python API has no batching, so N concurrent requests run one after another "
                     "(TTFT of request i includes the i-1 before it); its prefix cache is llama-cpp-python's "
                     "longest-common-prefix reuse of the previous prompt.")
    worker_argv = ["--model", args.model, "--dtype", args.dtype, "--quantization", args.quantization,
                   "--compile", args.compile, "--threads", str(threads), *(["--quick"] if args.quick else [])]
    workers = []
    for system in systems:   # each in its own process: a crash costs its column, not the run
        print(f"{system}: starting its process ...", file=sys.stderr)
        workers.append(Worker(system, worker_argv))
    samples = {w.name: {} for w in workers}
    for r in range(work.repeats):
        for unit in units(work):
            for w in workers[r % len(workers):] + workers[:r % len(workers)]:   # the order rotates each repeat
                reply = w.ask({"unit": unit, "index": r})
                if reply is not None:
                    samples[w.name].setdefault(" ".join(map(str, unit)), []).append(reply)
        print(f"bench engine: repeat {r + 1}/{work.repeats} done", file=sys.stderr)
    results, columns = {}, {}
    for w in workers:
        notes += w.close() if not w.error else []
        if w.error:
            notes.append(f"{w.system}: {w.error}")
            print(f"note: {w.system}: {w.error}", file=sys.stderr)
        if samples[w.name]:
            results[w.name], columns[w.name] = summarize(samples[w.name], work), w.weights
    if not results:
        raise SystemExit("bench engine: no system was measured:\n" + "\n".join(notes[-len(workers):]))
    if "nanoseek" not in columns:
        columns = {"nanoseek": args.dtype, **columns}
    command = " ".join([prog, *map(shlex.quote, argv)])
    text = render(results, columns, work, command, machine_info(threads, load_before, os.getloadavg()), notes)
    print(text)
    if args.out:
        write_section(Path(args.out), text)
        print(f"wrote the engine section of {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
