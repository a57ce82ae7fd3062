"""nanoseek speedrun: presets and flags, stage markers and resuming, the report card from fixed inputs
(hand-computed dollars), and a shortened `scratch` speedrun end to end, interrupted and resumed (slow)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek.report_card import render, write_report
from nanoseek.speedrun import SpeedrunConfig, cpu, resolve, scratch
from nanoseek.speedrun.run import check_settings, command, run_stage
from nanoseek.speedrun.stages import Context, Stage, pipeline
from nanoseek.speedrun.training import grpo_settings, task_of

ROOT = Path(__file__).resolve().parents[1]
MULTIARITH = ROOT.parent / "shared" / "data" / "multiarith.jsonl"


# ---- config ---------------------------------------------------------------------------------------

def test_presets_and_flags():
    cfg = resolve(SpeedrunConfig())
    assert cfg == dataclasses.replace(cpu(), out="runs/speedrun-cpu")
    cfg = resolve(SpeedrunConfig(preset="scratch", pretrain_steps=7, out="x"))
    assert cfg.pretrain_steps == 7 and cfg.sft_steps == scratch().sft_steps and cfg.model == "small_deepseek_v3"
    assert [s.name for s in pipeline(cfg)] == ["pretrain", "eval_pretrain", "sft", "eval_sft", "grpo", "eval_grpo",
                                               "distill", "eval_distill", "speed"]
    with pytest.raises(ValueError, match="--grpo-steps must be >= 1"):
        resolve(SpeedrunConfig(grpo_steps=0))
    with pytest.raises(ValueError, match="unknown speedrun preset"):
        resolve(SpeedrunConfig(preset="gpu"))
    assert "--pretrain-steps 7" in command(cfg) and "--sft-steps" not in command(cfg)


def test_cpu_preset_takes_the_grpo_preset_at_run_time(monkeypatch):
    from nanoseek.train import grpo
    cfg = resolve(SpeedrunConfig(out="x"))
    preset = grpo.PRESETS["smollm2_addition"]()
    g = grpo_settings(cfg, "smollm2-135m", "x/grpo")
    assert (g.task, g.task_knobs, g.lr, g.group_size, g.max_new_tokens) == \
           (preset.task, preset.task_knobs, preset.lr, preset.group_size, preset.max_new_tokens)
    assert g.steps == cfg.grpo_steps == 20          # the speedrun's own count, where the preset's run peaked
    assert task_of(cfg) == (preset.task, grpo.parse_knobs(preset.task_knobs), preset.template, preset.max_new_tokens)
    retuned = lambda: dataclasses.replace(preset, max_new_tokens=preset.max_new_tokens + 13, lr=1e-6)  # noqa: E731
    monkeypatch.setitem(grpo.PRESETS, "smollm2_addition", retuned)
    g = grpo_settings(cfg, "smollm2-135m", "x/grpo")
    assert (g.max_new_tokens, g.lr) == (preset.max_new_tokens + 13, 1e-6)
    assert grpo_settings(dataclasses.replace(cfg, grpo_steps=3), "m", "o").steps == 3


def test_reasoning_preset_cold_starts_smollm2_then_runs_its_grpo_preset(tmp_path):
    from nanoseek.speedrun.training import cold_start_data
    from nanoseek.train import grpo
    cfg = resolve(SpeedrunConfig(preset="reasoning", out=str(tmp_path)))
    assert [s.name for s in pipeline(cfg)] == ["eval_base", "sft", "eval_sft", "grpo", "eval_grpo"]
    preset = grpo.PRESETS["smollm2_word_problems"]()
    g = grpo_settings(cfg, "sft/latest", "x/grpo")
    assert (g.model, g.task, g.task_knobs, g.steps, g.max_new_tokens) == ("sft/latest", "word_problems", "steps=2",
                                                                         preset.steps, 128)
    assert task_of(cfg) == ("word_problems", {"steps": 2}, "chat", 128)
    rows = [json.loads(line) for line in cold_start_data(tmp_path / "c.jsonl", 30, 0, "chat", "word_problems")
            .read_text().splitlines()]
    asked = [r["messages"][0]["content"] for r in rows]
    assert len(rows) == 30 and all(q.endswith("\nGive the final answer as a number on the last line.") for q in asked)
    assert any("\nThen " in r["messages"][1]["content"] for r in rows)       # two-step stories are worked
    check_settings(tmp_path, cfg, pipeline(cfg))
    assert "no speed stage" in render(tmp_path)[0]


def test_a_folder_with_other_settings_is_refused(tmp_path):
    cfg = resolve(SpeedrunConfig(preset="scratch", out=str(tmp_path)))
    check_settings(tmp_path, cfg, pipeline(cfg))
    check_settings(tmp_path, dataclasses.replace(cfg, usd_per_hour=3.0), pipeline(cfg))   # prices only: fine
    with pytest.raises(ValueError, match="other settings \\(sft_steps\\)"):
        check_settings(tmp_path, dataclasses.replace(cfg, sft_steps=5), pipeline(cfg))


# ---- markers ----------------------------------------------------------------------------------------

def test_finished_stages_are_skipped_and_interrupted_ones_keep_their_time(tmp_path):
    calls = []

    def work(ctx, folder):
        calls.append(folder.name)
        (folder / "out.txt").write_text("x")
        return {"flops": 5.0}

    def interrupted(ctx, folder):
        calls.append(folder.name)
        time.sleep(0.05)
        raise KeyboardInterrupt

    ctx = Context(resolve(SpeedrunConfig(out=str(tmp_path))), tmp_path, {})
    first = run_stage(ctx, Stage("a", "A", work), 1, 2)
    assert first["flops"] == 5.0 and first["label"] == "A" and (tmp_path / "a" / "DONE.json").exists()
    mtime = (tmp_path / "a" / "out.txt").stat().st_mtime_ns
    assert run_stage(ctx, Stage("a", "A", work), 1, 2) == first and calls == ["a"]
    assert (tmp_path / "a" / "out.txt").stat().st_mtime_ns == mtime
    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, Stage("b", "B", interrupted), 2, 2)
    assert not (tmp_path / "b" / "DONE.json").exists()
    spent = json.loads((tmp_path / "b" / "PARTIAL.json").read_text())["wall_s"]
    assert spent >= 0.05
    done = run_stage(ctx, Stage("b", "B", work), 2, 2)
    assert done["wall_s"] >= spent and not (tmp_path / "b" / "PARTIAL.json").exists()


# ---- the report card from fixed inputs --------------------------------------------------------------

def _eval(label, model, heldout, real):
    def one(name, p, problems):
        return {"name": name, "problems": problems, "samples": 4, "pass@1": p, "pass@1_ci95": [p - 0.05, p + 0.05],
                "cons": p + 0.01, "mean_response_tokens": 40.0, "truncated": 0.0, "flops": 1e9}
    return {"stage": "", "label": label, "model": model, "template": "chat", "wall_s": 60.0, "flops": 2e9,
            "heldout": one("arithmetic digits=2,ops=+", heldout, 100),
            "real": one("multiarith", real, 50) if real is not None else
            {"name": "multiarith", "skipped": "../shared/data/multiarith.jsonl not found"}}


def _fixed_run(root: Path, real=True) -> Path:
    cfg = resolve(SpeedrunConfig(out=str(root), usd_per_hour=0.36, watts=100.0, usd_per_kwh=0.2))
    stages = pipeline(cfg)
    check_settings(root, cfg, stages)
    done = {
        "eval_base": _eval("smollm2-135m (before)", "smollm2-135m", 0.20, 0.10 if real else None),
        "grpo": {"label": "GRPO", "checkpoint": "grpo/latest", "steps": 3, "task": "arithmetic",
                 "template": "chat", "group_size": 8, "prompts_per_step": 8, "lr": 5e-6, "preset": "smollm2_addition",
                 "greedy_eval_first": 0.2, "greedy_eval_last": 0.45, "eval_size": 200, "reward_first": 0.25,
                 "reward_last": 0.5, "response_length_first": 30.0, "response_length_last": 20.0,
                 "generated_tokens": 4000, "rollout_flops": 1e12, "update_flops": 2e12, "flops": 3e12,
                 "wall_s": 3600.0},
        "eval_grpo": _eval("after GRPO", "grpo/latest", 0.45, 0.12 if real else None),
        "speed": {"label": "serving", "model": "grpo/latest", "prompts": 16, "max_tokens": 64, "mtp": False,
                  "runs": {"0": {"single_stream_tokens_per_s": 50.0, "batched_tokens_per_s": 100.0,
                                 "acceptance_rate": None, "tokens_per_step": None, "dtype": "float32",
                                 "same_tokens_single": True, "same_tokens_batched": True}},
                  "served_tokens_per_s": 100.0, "flops": 1e10, "wall_s": 30.0},
    }
    for name, value in done.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "DONE.json").write_text(json.dumps(value))
    (root / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_accuracy": 0.2},
        *({"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "response_length": 30 - s, "policy_loss": 0.01 * s}
          for s in (1, 2, 3)),
        {"step": 3, "eval_accuracy": 0.45}]))
    return root


def test_report_card_from_fixed_inputs(tmp_path):
    run = _fixed_run(tmp_path)
    text, headline = render(run)
    for section in ("## Quality before and after", "## Training", "## Plots",
                    "## MTP speculative decoding and serving speed", "## Cost", "## Serve the trained model"):
        assert section in text
    # quality: both models on both sets, with intervals
    assert "| smollm2-135m (before) (`smollm2-135m`, chat) | 20.0% [15.0, 25.0] | 21.0% | 40.0 | 10.0% [5.0, 15.0]" in text
    assert "GRPO's own greedy check on 200 held-out problems: 20.0% at step 0, 45.0% after step 3." in text
    # cost, by hand: GRPO 3600 s at $0.36/h = $0.36, 100 W x 1 h = 0.1 kWh = $0.02; +25 points -> $0.0144/point
    assert "| grpo | 60.0 min | 3.00e+12 | $0.3600 | 0.1000 | $0.0200 | +25.0 | $0.0144 |" in text
    # whole run: 60 + 3600 + 60 + 30 s = 3750 s -> $0.375; per held-out point $0.375 / 25 = $0.0150
    assert "| **total** | 62.5 min |" in text and "$0.3750" in text
    assert "Whole run per arithmetic digits=2,ops=+ point" in text and "$0.0150" in text
    # served: $0.36/h at 100 tok/s = 0.36 / 360,000 x 1e6 = $1.00 per 1M tokens, beside the list prices
    assert "| this run: `grpo/latest` here | $1.00 | $1.00 |" in text
    assert "| deepseek-reasoner | $0.5500 | $2.19 |" in text and "| openai-o1 | $15.00 | $60.00 |" in text
    assert "no MTP module" in text and "No expert-load curve" in text
    assert text.rstrip().endswith("```") and f"nanoseek serve --model {run / 'grpo' / 'latest'}" in text
    assert headline[0] == "arithmetic digits=2,ops=+: pass@1 20.0% -> 45.0% (+25.0 points)"
    assert headline[-1] == f"serve it: nanoseek serve --model {run / 'grpo' / 'latest'}"
    # plots: drawn from metrics.jsonl, every one linked
    for key in ("reward_mean", "accuracy", "eval_accuracy", "response_length", "policy_loss"):
        png = run / "plots" / f"grpo-{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{png.name})" in text
    assert (run / "plots" / "accuracy.png").exists()


def test_report_card_without_the_real_set_says_why(tmp_path):
    path, headline = write_report(_fixed_run(tmp_path, real=False))
    text = path.read_text()
    assert "multiarith: skipped (../shared/data/multiarith.jsonl not found)" in headline
    assert "The real set was skipped: ../shared/data/multiarith.jsonl not found" in text
    assert "| skipped |" in text


def test_report_card_lists_stages_not_run(tmp_path):
    run = _fixed_run(tmp_path)
    (run / "speed" / "DONE.json").unlink()
    text, _ = render(run)
    assert "not run yet: speed" in text and "The speed stage has not run yet." in text


# ---- end to end (slow) ------------------------------------------------------------------------------

def _speedrun_command(out: Path) -> list[str]:
    # 1-digit sums: a briefly trained tiny model gets ~1% of its samples right, enough for 512 draws
    flags = {"preset": "scratch", "out": out, "model": "tiny_deepseek_v3", "task-knobs": "digits=1,ops=+",
             "pretrain-steps": 30, "corpus-size": 1000, "sft-steps": 24, "grpo-steps": 2, "distill-steps": 4,
             "rs-prompts": 32, "rs-samples": 16, "eval-size": 13, "real-size": 3, "max-new-tokens": 40,
             "real-max-tokens": 24, "speed-prompts": 2, "speed-tokens": 16, "student-size": "dim=64,n_layers=2",
             "real-data": MULTIARITH if MULTIARITH.exists() else ""}
    return [sys.executable, "-m", "nanoseek.cli", "speedrun", *(f"--{k}={v}" for k, v in flags.items())]


@pytest.mark.slow
def test_shortened_scratch_speedrun_interrupted_and_resumed(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(_speedrun_command(out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while not (out / "sft" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)           # ^C in the middle of SFT, after its first checkpoint
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log[-3000:]
    assert (out / "pretrain" / "DONE.json").exists() and not (out / "sft" / "DONE.json").exists(), log[-3000:]
    interrupted_at = int((out / "sft" / "latest").resolve().name.removeprefix("step_"))
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "pretrain").rglob("*"), *(out / "eval_pretrain").rglob("*")]
            if p.is_file()}

    rerun = subprocess.run(_speedrun_command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "pretrain: done before, skipped" in rerun.stderr and "eval_pretrain: done before, skipped" in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept             # finished stages were not redone
    sft = json.loads((out / "sft" / "DONE.json").read_text())
    assert sft["resumed_from_step"] == interrupted_at > 0 and sft["steps"] == 24

    report = (out / "report.md").read_text()
    assert f"report card: {out / 'report.md'}" in rerun.stdout
    for stage in ("pretrain", "eval_pretrain", "sft", "eval_sft", "grpo", "eval_grpo", "distill", "eval_distill",
                  "speed"):
        done = json.loads((out / stage / "DONE.json").read_text())
        assert done["wall_s"] > 0 and done["flops"] > 0, stage
        assert f"| {stage} |" in report
    for label in ("base (pretrained)", "after SFT", "after GRPO", "distilled tiny_qwen2"):
        assert f"| {label} (`" in report
    for key in ("pretrain-loss", "pretrain-mtp_loss", "pretrain-expert_load_max_over_mean", "grpo-reward_mean",
                "grpo-accuracy", "grpo-response_length", "distill-loss", "accuracy"):
        assert (out / "plots" / f"{key}.png").exists() and f"(plots/{key}.png)" in report
    speed = json.loads((out / "speed" / "DONE.json").read_text())
    assert speed["mtp"] and speed["runs"]["1"]["draft_tokens"] > 0
    assert 0 <= speed["runs"]["1"]["acceptance_rate"] <= 1 and speed["speedup_single_stream"] > 0
    assert f"| 1 | {speed['runs']['1']['single_stream_tokens_per_s']:.1f} |" in report
    distill = json.loads((out / "distill" / "DONE.json").read_text())
    rs = distill["rejection_sampling"]
    assert rs["kept"] > 0 and f"{rs['kept']} rows kept of {rs['samples']} samples" in report
    assert (out / "distill" / "latest" / "config.json").exists()
    if MULTIARITH.exists():
        assert "multiarith: pass@1" in report
    assert report.rstrip().endswith("```") and f"nanoseek serve --model {out / 'grpo' / 'latest'}" in report


def test_report_card_when_rejection_sampling_kept_nothing(tmp_path):
    cfg = resolve(SpeedrunConfig(preset="scratch", out=str(tmp_path)))
    check_settings(tmp_path, cfg, pipeline(cfg))
    rs = {"prompts": 16, "samples": 64, "correct": 0, "kept": 0, "acceptance_rate": 0.0, "truncated": 9,
          "duplicates": 0, "prompts_kept": 0, "generated_tokens": 900, "seconds": 2.0, "flops": 1e9}
    done = {"eval_sft": _eval("after SFT", "sft/latest", 0.1, 0.0),
            "eval_grpo": _eval("after GRPO", "grpo/latest", 0.3, 0.05),
            "distill": {"label": "rejection sampling + distillation", "rejection_sampling": rs, "flops": 1e9,
                        "skipped": "none of the teacher's 64 samples was verified correct, so no student was trained",
                        "wall_s": 4.0},
            "eval_distill": {"label": "distilled tiny_qwen2", "skipped": "no model to evaluate: distill was skipped",
                             "flops": 0.0, "wall_s": 0.1}}
    for name, value in done.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "DONE.json").write_text(json.dumps(value))
    text, headline = render(tmp_path)
    assert "0 rows kept of 64 samples: none of the teacher's 64 samples was verified correct" in text
    assert "distilled tiny_qwen2 (`" not in text and "The distilled student" not in text
    assert headline[0] == "arithmetic digits=2,ops=+: pass@1 10.0% -> 30.0% (+20.0 points)"
    assert "not run yet: pretrain, eval_pretrain, sft, grpo, speed" in text
