"""What a run records as it goes: metrics.jsonl, PNG plots, and a progress bar.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per optimiser step; on resume the lines
after the checkpoint's step are dropped first, so the file of a resumed run equals an uninterrupted
one (timings aside). Plots are redrawn every `plot_every` steps and at the end, from the file
itself, so they survive restarts: every numeric key becomes a curve, list-valued keys (MTP loss per
depth, expert load per MoE layer) one curve per entry.

    log = MetricsLog(run_dir, enabled=session.main)
    log.truncate_after(step)          # when resuming
    log.write(metrics); log.plot(["loss", "lr", "grad_norm", "expert_load_max_over_mean"])
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# the plots a training run draws (GRPO adds its own keys)
TRAIN_PLOTS = ("loss", "mtp_loss", "lr", "grad_norm", "expert_load_max_over_mean", "tokens_per_s")


class MetricsLog:
    def __init__(self, run, enabled: bool = True):
        self.run, self.enabled = Path(run), enabled
        self.path = self.run / "metrics.jsonl"
        if enabled:
            self.run.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they are about to be replayed by a resumed run)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, keys=TRAIN_PLOTS) -> list[Path]:
        """One PNG per key present in the records: plots/<key>.png. Returns the files written."""
        if not self.enabled:
            return []
        records = self.records()
        written = []
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if points:
                written.append(plot_series(self.run / "plots" / f"{key}.png", key, points))
        return written


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, AttributeError):
        return None


def plot_series(file: Path, title: str, points: list[tuple[int, float | list]]) -> Path:
    """A line plot of (step, value) points; list values give one line per index."""
    import matplotlib
    matplotlib.use("Agg")                                   # files only, no display
    import matplotlib.pyplot as plt

    file.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [s for s, _ in points]
    if isinstance(points[0][1], list):
        width = max(len(v) for _, v in points)
        for i in range(width):
            ax.plot(steps, [v[i] if i < len(v) else math.nan for _, v in points], label=f"{title}[{i}]")
        ax.legend(fontsize=7)
    else:
        ax.plot(steps, [v for _, v in points])
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)
    return file


def progress(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (a no-op object when disabled, e.g. on ranks other than 0)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)
