"""The speedrun's report card: DIR/report.md and DIR/plots/*.png, drawn from the run's own files.

    path, headline = write_report("runs/speedrun-scratch")

Everything comes from what the stages wrote: DIR/speedrun.json (settings, machine, stage order),
each DIR/<stage>/DONE.json (results, wall time, FLOPs) and each training stage's metrics.jsonl
(the curves). Money is report.py's arithmetic on the wall times at the prices the config states.
Sections: headline, quality before/after (held-out task and real set), training, plots, MTP
speculative decoding, cost (per stage, $ per accuracy point, served $/1M tokens beside the list
prices), and the command that serves the trained model. A stage without a marker is listed as
not run; nothing is filled in for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import (LIST_PRICES, PRICES_AS_OF, dollars_per_point, energy_dollars, energy_kwh, price_table,
                     served_usd_per_million, wall_dollars)
from .train.metrics import plot_series

PLOT_KEYS = ("loss", "mtp_loss", "expert_load_max_over_mean", "reward_mean", "accuracy", "eval_accuracy",
             "response_length", "policy_loss", "kl")


def load_run(run: Path) -> tuple[dict, dict]:
    """(DIR/speedrun.json, {stage: DONE.json}) for the stages that finished, in pipeline order."""
    meta = json.loads((run / "speedrun.json").read_text())
    done = {}
    for stage in meta["stages"]:
        marker = run / stage["name"] / "DONE.json"
        if marker.exists():
            done[stage["name"]] = json.loads(marker.read_text())
    return meta, done


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def _usd(x) -> str:
    if x is None:
        return "n/a"
    return f"${x:.2f}" if x >= 1 else f"${x:.4f}" if x >= 1e-3 else f"${x:.2e}"


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _evals(done: dict) -> list[dict]:
    return [d for d in done.values() if "heldout" in d]


def _points(done: dict, which: str) -> tuple[float, float] | None:
    """(first evaluated model's pass@1, the served GRPO model's) on `which` set, if both ran."""
    evals = [d for d in _evals(done) if "pass@1" in d[which]]
    after = done.get("eval_grpo", {}).get(which, {})
    if len(evals) < 2 or "pass@1" not in after:
        return None
    return evals[0][which]["pass@1"], after["pass@1"]


def headline(meta: dict, done: dict) -> list[str]:
    cfg, lines = meta["config"], []
    for which in ("heldout", "real"):
        pair, first = _points(done, which), next(iter(_evals(done)), {}).get(which, {})
        if pair:
            lines.append(f"{first['name']}: pass@1 {_pct(pair[0])} -> {_pct(pair[1])} "
                         f"({100 * (pair[1] - pair[0]):+.1f} points)")
        elif first.get("skipped"):
            lines.append(f"{first['name']}: skipped ({first['skipped']})")
    wall = sum(d["wall_s"] for d in done.values())
    lines.append(f"wall {_dur(wall)}, {_usd(wall_dollars(wall, cfg['usd_per_hour']))} at ${cfg['usd_per_hour']}/h, "
                 f"{sum(d.get('flops', 0) for d in done.values()):.2e} FLOPs")
    speed = done.get("speed")
    if speed and speed.get("mtp"):
        lines.append(f"MTP drafts: {_pct(speed['runs']['1']['acceptance_rate'])} accepted, "
                     f"{speed['speedup_single_stream']:.2f}x single-stream tokens/s")
    if speed:
        served = served_usd_per_million(speed["served_tokens_per_s"], cfg["usd_per_hour"])
        lines.append(f"served here: {_usd(served)} per 1M tokens at {speed['served_tokens_per_s']:.0f} tok/s "
                     f"(deepseek-reasoner output: ${LIST_PRICES['deepseek-reasoner'].output})")
    return lines


def _quality(meta: dict, done: dict) -> list[str]:
    evals = _evals(done)
    if not evals:
        return ["No evaluation has finished yet."]
    first = evals[0]
    k = first["heldout"]["samples"]
    real_name = first["real"]["name"]
    out = [f"| model | held-out {first['heldout']['name']}: pass@1 [95% CI] | cons@{k} | tokens/answer | "
           f"{real_name}: pass@1 [95% CI] | cons@{k} | tokens/answer |", "|---|---|---|---|---|---|---|"]
    for d in evals:
        h, r = d["heldout"], d["real"]
        real = ("skipped", "", "") if "skipped" in r else (f"{_pct(r['pass@1'])}{_ci(r['pass@1_ci95'])}",
                                                           _pct(r["cons"]), f"{r['mean_response_tokens']:.1f}")
        out.append(f"| {d['label']} (`{d['model']}`, {d['template']}) | {_pct(h['pass@1'])}{_ci(h['pass@1_ci95'])} | "
                   f"{_pct(h['cons'])} | {h['mean_response_tokens']:.1f} | {real[0]} | {real[1]} | {real[2]} |")
    protocol = (f"{k} samples per problem at temperature 0.6, top-p 0.95 (R1's protocol: pass@1 = mean "
                f"correctness, cons@{k} = majority vote)" if k > 1 else "greedy decoding (k = 1)")
    out += ["", f"{first['heldout']['problems']} held-out problems (the task's test split, disjoint from "
            f"training), {first['real'].get('problems', 0)} of {real_name}; {protocol}; answers graded by "
            "nanoseek.rewards, the verifier GRPO trains with. Prompt templates as in train/rollout.py."]
    if "skipped" in first["real"]:
        out.append(f"The real set was skipped: {first['real']['skipped']} (`--real-data PATH` names one).")
    g = done.get("grpo")
    if g and g.get("greedy_eval_first") is not None:
        out.append(f"GRPO's own greedy check on {g['eval_size']} held-out problems: {_pct(g['greedy_eval_first'])} "
                   f"at step 0, {_pct(g['greedy_eval_last'])} after step {g['steps']}.")
    return out


def _training(done: dict) -> list[str]:
    out = ["| stage | steps | tokens | loss first -> last | notes |", "|---|---|---|---|---|"]
    for d in done.values():
        if "rejection_sampling" in d and "skipped" in d:
            rs = d["rejection_sampling"]
            out.append(f"| {d['label']} | | | | rejection sampling: {rs['kept']} rows kept of {rs['samples']} "
                       f"samples: {d['skipped']} |")
        elif "rollout_flops" in d:
            note = (f"reward {d['reward_first']:.3f} -> {d['reward_last']:.3f}, response length "
                    f"{d['response_length_first']:.1f} -> {d['response_length_last']:.1f} tokens; "
                    f"preset {d['preset']}, G={d['group_size']}, {d['prompts_per_step']} prompts/step, lr {d['lr']}")
            out.append(f"| {d['label']} | {d['steps']} | {d['generated_tokens']} generated | | {note} |")
        elif "final_loss" in d:
            m = d["model_numbers"]
            note = (f"{m['model_type']}, {m['params'] / 1e6:.2f}M params ({m['active_params'] / 1e6:.2f}M active)"
                    + (f", MTP loss {d['final_mtp_loss']:.3f}" if d.get("final_mtp_loss") is not None else ""))
            if "rejection_sampling" in d:
                rs = d["rejection_sampling"]
                note += (f"; rejection sampling: {rs['kept']} rows kept of {rs['samples']} samples from "
                         f"{rs['prompts']} problems ({_pct(rs['acceptance_rate'])} verified correct, "
                         f"{rs['truncated']} cut off)")
            out.append(f"| {d['label']} | {d['steps']} | {d['tokens']} | {d['first_loss']:.3f} -> "
                       f"{d['final_loss']:.3f} | {note} |")
    return out if len(out) > 2 else ["No training stage has finished yet."]


def draw_plots(run: Path, meta: dict, done: dict) -> list[Path]:
    """plots/<stage>-<key>.png from each finished stage's metrics.jsonl, and plots/accuracy.png."""
    written = []
    for name in done:
        path = run / name / "metrics.jsonl"
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for key in PLOT_KEYS:
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if points:
                written.append(plot_series(run / "plots" / f"{name}-{key}.png", f"{name}: {key}", points))
    evals = _evals(done)
    if evals:
        written.append(_accuracy_bars(run / "plots" / "accuracy.png", evals))
    return written


def _accuracy_bars(file: Path, evals: list[dict]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    x = list(range(len(evals)))
    for offset, which in ((-0.2, "heldout"), (0.2, "real")):
        values = [100 * d[which]["pass@1"] if "pass@1" in d[which] else 0.0 for d in evals]
        ax.bar([i + offset for i in x], values, width=0.4, label=evals[0][which]["name"])
    ax.set_xticks(x, [d["label"] for d in evals], fontsize=7, rotation=15)
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("accuracy by stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file)
    plt.close(fig)
    return file


def _plots(run: Path, plots: list[Path], done: dict) -> list[str]:
    out = [f"![{p.stem}](plots/{p.name})" for p in plots]
    if not any("expert_load" in p.name for p in plots):
        out.append("No expert-load curve: the trained model is dense (no MoE layers).")
    return out or ["No plots yet."]


def _mtp(meta: dict, done: dict) -> list[str]:
    speed = done.get("speed")
    if not any(s["name"] == "speed" for s in meta["stages"]):
        return [f"The `{meta['config']['preset']}` preset has no speed stage (`nanoseek bench engine` measures "
                "serving)."]
    if not speed:
        return ["The speed stage has not run yet."]
    rows = ["| drafts per step | single-stream tok/s | batched tok/s | acceptance | tokens/step | "
            "same tokens as 0 drafts (single / batched) |", "|---|---|---|---|---|---|"]
    for k, r in speed["runs"].items():
        same = "/".join("yes" if r[f"same_tokens_{m}"] else "no" for m in ("single", "batched"))
        rows.append(f"| {k} | {r['single_stream_tokens_per_s']:.1f} | {r['batched_tokens_per_s']:.1f} | "
                    f"{_pct(r['acceptance_rate'])} | {r['tokens_per_step'] or 1.0:.2f} | {same} |")
    dtype = next(iter(speed["runs"].values()))["dtype"]
    out = [f"`{speed['model']}` in {dtype}, {speed['prompts']} held-out prompts, greedy, at most "
           f"{speed['max_tokens']} new tokens; single stream = one request at a time, batched = all at once."
           + (" In bfloat16 a batch's make-up changes the rounding, so batched greedy text can drift between "
              "the two runs (the float32 check below has no such rounding)." if dtype == "bfloat16" else ""), ""] + rows + [""]
    if speed["mtp"]:
        exact = speed.get("float32_same_tokens")
        if exact is not None:
            out.append(f"In float32, greedy text with MTP drafts {'equals' if exact else 'DIFFERS FROM'} plain "
                       "greedy text on these prompts (one request at a time).")
        out.append(f"Speed-up from one MTP draft per step: {speed['speedup_single_stream']:.2f}x single stream, "
                   f"{speed['speedup_batched']:.2f}x batched (DeepSeek-V3 §5.4.3: 85-90% acceptance, 1.8x TPS).")
    else:
        out.append("The served model has no MTP module (a dense model): no speculative decoding to measure.")
    return out


def _cost(meta: dict, done: dict) -> list[str]:
    cfg = meta["config"]
    price, watts, tariff = cfg["usd_per_hour"], cfg["watts"], cfg["usd_per_kwh"]
    out = [f"Stated prices: this machine at ${price}/hour, drawing {watts:.0f} W, electricity at ${tariff}/kWh "
           "(`--usd-per-hour`, `--watts`, `--usd-per-kwh`).", "",
           "| stage | wall | FLOPs | machine $ | energy kWh | energy $ | held-out gain | $ per point |",
           "|---|---|---|---|---|---|---|---|"]
    names, previous = list(done), None
    for i, name in enumerate(names):
        d = done[name]
        usd, kwh = wall_dollars(d["wall_s"], price), energy_kwh(d["wall_s"], watts)
        gain = per_point = ""
        if "heldout" in d:
            previous = d["heldout"]["pass@1"]
        elif previous is not None and i + 1 < len(names) and "heldout" in done[names[i + 1]]:
            after = done[names[i + 1]]["heldout"]["pass@1"]
            gain, per_point = f"{100 * (after - previous):+.1f}", _usd(dollars_per_point(usd, previous, after))
        out.append(f"| {name} | {_dur(d['wall_s'])} | {d.get('flops', 0):.2e} | {_usd(usd)} | {kwh:.4f} | "
                   f"{_usd(energy_dollars(kwh, tariff))} | {gain} | {per_point} |")
    wall = sum(d["wall_s"] for d in done.values())
    total_usd, kwh = wall_dollars(wall, price), energy_kwh(wall, watts)
    out.append(f"| **total** | {_dur(wall)} | {sum(d.get('flops', 0) for d in done.values()):.2e} | "
               f"{_usd(total_usd)} | {kwh:.4f} | {_usd(energy_dollars(kwh, tariff))} | | |")
    for which in ("heldout", "real"):
        pair = _points(done, which)
        if pair:
            name = _evals(done)[0][which]["name"]
            out.append(f"\nWhole run per {name} point (first evaluated model -> served model, every stage's "
                       f"wall time): {_usd(dollars_per_point(total_usd, *pair))}"
                       + ("" if pair[1] > pair[0] else " (no gain: no price per point)"))
    speed = done.get("speed")
    if speed:
        served = served_usd_per_million(speed["served_tokens_per_s"], price)
        out += ["", f"Served cost on this machine: {speed['served_tokens_per_s']:.0f} generated tokens/s "
                f"(batched, measured) at ${price}/h = {_usd(served)} per 1M tokens. List prices as of "
                f"{PRICES_AS_OF}:", "", "| | input $/1M (cache miss) | output $/1M |", "|---|---|---|"]
        for name, inp, outp in price_table(served, label=f"this run: `{speed['model']}` here"):
            out.append(f"| {name} | {'n/a' if inp is None else _usd(inp)} | {_usd(outp)} |")
    return out


def render(run: Path) -> tuple[str, list[str]]:
    """The report card's markdown (plots drawn on the way) and its headline lines."""
    run = Path(run)
    meta, done = load_run(run)
    plots = draw_plots(run, meta, done)
    lines = headline(meta, done)
    missing = [s["name"] for s in meta["stages"] if s["name"] not in done]
    m = meta["machine"]
    serve = f"nanoseek serve --model {run / 'grpo' / 'latest'}"
    doc = [f"# nanoseek speedrun: `{meta['config']['preset']}`", "",
           f"`{meta['command']}` started {meta['started']} on {m['cpu']} ({m['cores']} cores, "
           f"{m['torch_threads']} torch threads, torch {m['torch']}{', ' + m['cuda'] if m['cuda'] else ''}).", "",
           *(f"- {line}" for line in lines), *([f"- not run yet: {', '.join(missing)}"] if missing else []),
           "", "## Quality before and after", "", *_quality(meta, done),
           "", "## Training", "", *_training(done),
           "", "## Plots", "", *_plots(run, plots, done),
           "", "## MTP speculative decoding and serving speed", "", *_mtp(meta, done),
           "", "## Cost", "", *_cost(meta, done),
           "", "## Serve the trained model", ""]
    if "checkpoint" in done.get("distill", {}):
        doc += [f"The distilled student serves the same way: `nanoseek serve --model {run / 'distill' / 'latest'}`. "
                "The GRPO model:", ""]
    doc += ["```", serve, "```"]
    return "\n".join(doc) + "\n", lines + [f"serve it: {serve}"]


def write_report(run) -> tuple[Path, list[str]]:
    text, lines = render(Path(run))
    path = Path(run) / "report.md"
    path.write_text(text)
    return path, lines
