"""Per-sample records: the JSONL an eval writes as it goes, and resuming from it.

One line per finished sample, flushed at once, so an interrupted run loses only the samples in
flight:

    {"model": "smollm2-135m", "problem_id": "multiarith:17", "sample_index": 2, "reasoning": "...",
     "completion": "The answer is 39.",
     "extracted": "39", "correct": true, "finish_reason": "stop", "prompt_tokens": 96,
     "cached_tokens": 96, "completion_tokens": 57, "setup": "3f2a9c1d0e4b"}

`setup` fingerprints what decides a sample besides its problem and index (sampling settings,
prompt wording, chat template on or off): a resumed run refuses a file written with other
settings instead of mixing the two. Sample i of a problem is drawn with seed `problem_seed + i`,
so a run resumed with more samples (--samples 8 after 4) or more problems (a larger --limit)
keeps every sample it had and draws only the new ones.

Left out: several writers on one file at once (the last writer's lines would interleave).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path

FIELDS = ("model", "problem_id", "sample_index", "completion", "extracted", "correct")


def setup_fingerprint(**settings) -> str:
    """A short hash of the settings that decide a sample's text."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def problem_seed(seed: int, problem_id: str) -> int:
    """The seed of sample 0 of a problem; sample i uses this + i. Depends on the id, not the position,
    so the same problem draws the same samples whatever --limit or data order selected it."""
    return zlib.crc32(f"{seed}:{problem_id}".encode()) & 0x7FFFFFFF


def load_records(path: str | Path, setup: str) -> dict[tuple[str, str, int], dict]:
    """(model, problem_id, sample_index) -> record, from an earlier run's file (empty if none).

    A line that is not a record is an error naming file and line, except a cut-off last line (a
    run killed mid-write), which is skipped with a note: that sample is drawn again.
    """
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    records: dict[tuple[str, str, int], dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(f not in record for f in FIELDS):
                raise ValueError(f"a record needs the fields {', '.join(FIELDS)}")
            key = (str(record["model"]), str(record["problem_id"]), int(record["sample_index"]))
        except (ValueError, TypeError) as e:
            if number == len(lines):      # no newline after it: cut off mid-write
                print(f"note: {path}:{number}: incomplete last line skipped (its sample is drawn again)",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a sample record ({e})") from None
        if record.get("setup") != setup:
            raise ValueError(f"{path}:{number}: written with other sampling settings or prompt (setup "
                             f"{record.get('setup')} vs {setup} now); rerun with those flags or another --output")
        records.setdefault(key, record)           # a duplicate (two runs on one file) keeps the first
    return records


class RecordWriter:
    """Appends records to the JSONL, one flushed line each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent != Path(""):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mend_last_line()
        self.file = open(self.path, "a", encoding="utf-8")

    def _mend_last_line(self) -> None:
        """A file that does not end in a newline: a whole last record gets its newline, a cut-off one
        (what load_records skipped) is removed, so the next record starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            with open(self.path, "ab") as f:
                f.write(b"\n")
        except ValueError:
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
