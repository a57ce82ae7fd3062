"""Dataclass configs -> command-line flags, and back.

Each stage has one config dataclass whose fields carry a `help` string in their metadata; the CLI
flags are generated from it (`--max-tokens` for `max_tokens`), so a field added to a config is a
flag at once and the two cannot drift. Presets are plain Python functions returning a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def arg(default, help: str, **kwargs):
    """A dataclass field with a help string (shown by --help)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _flag_type(annotation):
    """str/int/float, or X for `X | None`; bool is handled separately."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})   # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), annotation


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, _ = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})",
                                choices=f.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
