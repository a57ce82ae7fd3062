"""Where training text comes from: .txt and .jsonl files, folders, globs, or the built-in corpus.

`read_documents` gives pretraining documents, `read_conversations` chat examples, each as a list of
(where, value) pairs, `where` being "path:line" so that later stages can still name a bad row.
Every row is checked here, when the data is read, never inside a training step: a malformed one
raises DataError("path:line: what is wrong"), or with skip_bad=True is skipped, counted and
reported in one warning per file.

Formats:
    .txt    one file = one document (blank lines are paragraphs inside it, not separators)
    .jsonl  one JSON object a line; blank lines are ignored.
            pretraining: {"text": "..."}
            SFT: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
                 or a pair: prompt/completion, prompt/response, question/answer, instruction/output
    "builtin"  nanoseek.tasks.corpus.synthetic_documents / synthetic_sft_examples(n, seed);
    "builtin:NAME"  the same drawn from the corpus's mix NAME (tasks/corpus.py MIXES: word_problems)

Left out on purpose: Parquet/Arrow, streaming reads of corpora larger than memory, remote URLs.

    docs, skipped = read_documents(["corpus/", "extra/*.jsonl"], skip_bad=True)
"""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")
PAIR_FIELDS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("instruction", "output"))


class DataError(ValueError):
    """Training data that cannot be used; the message starts with "path:line:" where a row is to blame."""


class _BadRow(Exception):
    """A row-level problem, turned into DataError (or a skip) with the row's location attached."""


def data_files(data) -> list[Path]:
    """Files named by `data`: a path, a folder (every .txt/.jsonl below it, sorted), a glob, or a list of these."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if not items:
        raise DataError("no data given")
    files = []
    for item in items:
        path = Path(item)
        if any(c in str(item) for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"{item}: no such file or folder")
        if not found:
            raise DataError(f"{item}: no {' or '.join(SUFFIXES)} files found")
        files += found
    for file in files:
        if file.suffix not in SUFFIXES:
            raise DataError(f"{file}: unsupported file type {file.suffix!r} (expected {', '.join(SUFFIXES)})")
    return files


def read_documents(data, *, skip_bad: bool = False, builtin_size: int = 20_000,
                   seed: int = 0) -> tuple[list[tuple[str, str]], int]:
    """Pretraining documents [(where, text)] and the number of malformed rows skipped."""
    if mix := builtin_mix(data):
        from nanoseek.tasks.corpus import (
            synthetic_documents,  # lazily: only this data needs it
        )
        texts = synthetic_documents(builtin_size, seed, mix)
        return _collect(data, ((f"{data}:{i}", {"text": t}) for i, t in enumerate(texts)), _document, skip_bad)
    out, skipped = [], 0
    for file in data_files(data):
        rows = [(str(file), {"text": _read_text(file)})] if file.suffix == ".txt" else _jsonl_rows(file)
        got, bad = _collect(file, rows, _document, skip_bad)
        out, skipped = out + got, skipped + bad
    return out, skipped


def read_conversations(data, *, skip_bad: bool = False, builtin_size: int = 2_000,
                       seed: int = 0) -> tuple[list[tuple[str, list[dict]]], int]:
    """Chat examples [(where, messages)] and the number of malformed rows skipped."""
    if mix := builtin_mix(data):
        from nanoseek.tasks.corpus import synthetic_sft_examples
        chats = synthetic_sft_examples(builtin_size, seed, mix)
        return _collect(data, ((f"{data}:{i}", {"messages": m}) for i, m in enumerate(chats)), _conversation, skip_bad)
    out, skipped = [], 0
    for file in data_files(data):
        if file.suffix != ".jsonl":
            raise DataError(f"{file}: chat examples must be .jsonl rows with 'messages' or a prompt/answer pair")
        got, bad = _collect(file, _jsonl_rows(file), _conversation, skip_bad)
        out, skipped = out + got, skipped + bad
    return out, skipped


def builtin_mix(data) -> str | None:
    """The built-in corpus mix `data` names ("builtin" is "all", "builtin:NAME" is NAME), else None."""
    if not isinstance(data, str) or not (data == "builtin" or data.startswith("builtin:")):
        return None
    from nanoseek.tasks.corpus import MIXES
    mix = data.partition(":")[2] or "all"
    if mix not in MIXES:
        raise DataError(f"{data}: no built-in mix {mix!r} (choose one of {', '.join(MIXES)})")
    return mix


def _collect(source, rows, parse, skip_bad: bool):
    """Parse every (where, row); a _BadRow raises DataError, or is skipped and warned about once per source."""
    out, bad, first = [], 0, None
    for where, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise row
            out.append((where, parse(row)))
        except _BadRow as e:
            if not skip_bad:
                raise DataError(f"{where}: {e}") from None
            bad, first = bad + 1, first or f"{where}: {e}"
    if bad:
        warnings.warn(f"{source}: skipped {bad} malformed row(s); first: {first}", stacklevel=3)
    return out, bad


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e})") from None


def _jsonl_rows(file: Path):
    """(where, parsed object or _BadRow) for each non-blank line."""
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            row = _BadRow(f"not valid JSON ({e})")
        yield f"{file}:{number}", row


def _document(row) -> str:
    text = _field(row, "text")
    if not text.strip():
        raise _BadRow("empty document")
    return text


def _field(row, name: str, kind=str):
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise _BadRow(f"missing field {name!r} (fields: {', '.join(map(repr, row)) or 'none'})")
    if not isinstance(row[name], kind):
        raise _BadRow(f"field {name!r} must be a {kind.__name__}, got {type(row[name]).__name__}")
    return row[name]


def _conversation(row) -> list[dict]:
    """A 'messages' list, or a prompt/answer pair turned into a user and an assistant message."""
    if isinstance(row, dict) and "messages" not in row:
        for prompt, answer in PAIR_FIELDS:
            if prompt in row and answer in row:
                row = {"messages": [{"role": "user", "content": _field(row, prompt)},
                                    {"role": "assistant", "content": _field(row, answer)}]}
                break
    messages = _field(row, "messages", list)
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRow(f"messages[{k}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise _BadRow(f"messages[{k}].{key} must be a string, got {type(message.get(key)).__name__}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _BadRow("no non-empty assistant message to learn from")
    return messages
