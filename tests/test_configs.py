import argparse
import dataclasses

import pytest

from nanoseek.configs import add_config_args, arg, config_from_args


@dataclasses.dataclass
class Example:
    model: list[str] = arg(["base"], "repeatable")
    steps: list[int] = arg([], "repeatable ints")
    rate: float = arg(0.5, "a float")
    name: str | None = arg(None, "optional")
    verbose: bool = arg(False, "a switch")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, Example)
    return config_from_args(Example, parser.parse_args(argv))


def test_list_field_is_a_repeatable_flag():
    cfg = parse(["--model", "a", "--model", "b", "--steps", "3", "--steps", "7"])
    assert cfg.model == ["a", "b"] and cfg.steps == [3, 7]


def test_list_default_stands_and_is_not_shared():
    first, second = parse([]), parse(["--model", "x"])
    assert first.model == ["base"] and first.steps == [] and second.model == ["x"]
    first.model.append("mutated")
    assert parse([]).model == ["base"] and Example().model == ["base"]


def test_scalar_fields_unchanged():
    cfg = parse(["--rate", "0.25", "--name", "n", "--verbose"])
    assert (cfg.rate, cfg.name, cfg.verbose) == (0.25, "n", True)
    assert parse([]).name is None
    with pytest.raises(SystemExit):
        parse(["--steps", "not-an-int"])
