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
    """A dataclass field with a help string (shown by --help); a list default is copied per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _flag_type(annotation):
    """str/int/float, or X for `X | None`; bool is handled separately."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})   # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), annotation


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """A `list[X]` field is a repeatable flag (`--model a --model b`); its default stands when none is given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, annotation = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if typing.get_origin(annotation) is list:
            # default None, not the list: argparse's append would extend the default in place
            parser.add_argument(flag, action="append", type=kind, default=None, choices=f.metadata.get("choices"),
                                help=f"{help_text} (repeatable; default: {f.default_factory()})")
        elif f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})",
                                choices=f.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    unset_lists = [f.name for f in dataclasses.fields(cls)
                   if values[f.name] is None and f.default_factory is not dataclasses.MISSING]
    return cls(**{k: v for k, v in values.items() if k not in unset_lists})
