"""Running the stages in order, with a DONE.json marker each, so a rerun skips what is finished.

DIR/speedrun.json holds the resolved config (a rerun with other stage settings is refused: its
stages would not be the ones the markers describe) and the machine. Each stage writes under
DIR/<stage>/ and ends by writing DIR/<stage>/DONE.json atomically: its results plus wall_s and
flops. A stage interrupted mid-way leaves no marker; its wall time so far goes to PARTIAL.json
and is added to the rerun's, so the cost table counts every second spent on it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from .config import PRESETS, REPORT_ONLY, SpeedrunConfig, resolve
from .stages import Context, Stage, pipeline

MARKER, PARTIAL, SETTINGS = "DONE.json", "PARTIAL.json", "speedrun.json"


def write_json(path: Path, value: dict) -> None:
    """Atomic: a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def machine() -> dict:
    import torch
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def check_settings(run: Path, cfg: SpeedrunConfig, stages: list[Stage]) -> dict:
    """Write DIR/speedrun.json, or check that an existing one describes the same stages."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in REPORT_ONLY}
    path = run / SETTINGS
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            diff = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise ValueError(f"{run} holds a speedrun with other settings ({', '.join(diff)}): rerun it with "
                             "the same flags to resume, or choose another --out")
    else:
        saved = {"settings": settings, "machine": machine(), "started": _now(), "command": command(cfg)}
    saved.update(config=dataclasses.asdict(cfg), stages=[{"name": s.name, "label": s.label} for s in stages])
    write_json(path, saved)
    return saved


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command(cfg: SpeedrunConfig) -> str:
    """The command line that reruns (or resumes) this speedrun: its preset, folder and overrides."""
    base, parts = PRESETS[cfg.preset](), ["nanoseek speedrun", f"--preset {cfg.preset}", f"--out {cfg.out}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("preset", "out") and value != getattr(base, f.name):
            parts.append(f"--{f.name.replace('_', '-')} {value!r}" if isinstance(value, str) and (not value or " " in value)
                         else f"--{f.name.replace('_', '-')} {value}")
    return " ".join(parts)


def run_stage(ctx: Context, stage: Stage, index: int, total: int) -> dict:
    """The stage's DONE.json, read when it exists, else made by running it."""
    folder = ctx.run / stage.name
    marker = folder / MARKER
    if marker.exists():
        print(f"speedrun [{index}/{total}] {stage.name}: done before, skipped ({marker})", file=sys.stderr)
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / PARTIAL
    earlier = json.loads(partial.read_text())["wall_s"] if partial.exists() else 0.0
    print(f"speedrun [{index}/{total}] {stage.name}: {stage.label}" +
          (f" (resuming; {earlier:.0f} s spent before)" if earlier else ""), file=sys.stderr)
    started = time.perf_counter()
    try:
        result = stage.fn(ctx, folder)
    except BaseException:
        write_json(partial, {"wall_s": earlier + time.perf_counter() - started})
        raise
    result = {"stage": stage.name, "label": stage.label, **result,
              "wall_s": earlier + time.perf_counter() - started, "finished": _now()}
    write_json(marker, result)
    partial.unlink(missing_ok=True)
    return result


def main(cfg: SpeedrunConfig) -> dict:
    """Every stage of the preset (skipping finished ones), then DIR/report.md; returns the headline."""
    from ..report_card import write_report
    cfg = resolve(cfg)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    stages = pipeline(cfg)
    check_settings(run, cfg, stages)
    ctx = Context(cfg, run, {})
    try:
        for i, stage in enumerate(stages, 1):
            ctx.results[stage.name] = run_stage(ctx, stage, i, len(stages))
    except KeyboardInterrupt:
        print(f"\nspeedrun interrupted: finished stages are kept in {run}; rerun the same command to resume",
              file=sys.stderr)
        raise
    report, headline = write_report(run)
    print(f"\nreport card: {report}")
    for line in headline:
        print(f"  {line}")
    return {"report": str(report), "headline": headline}
