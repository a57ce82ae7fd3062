"""House rules that a machine can check: data flows tokenizer -> model -> engine -> train/eval/server."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanoseek"
# rank of each top-level part; a module may import only parts of lower or equal rank
RANK = {"errors": 0, "configs": 0, "tokenizer": 0, "rewards": 0, "tasks": 0, "model": 1, "checkpoint": 1, "engine": 2,
        "train": 3, "eval": 3, "server": 3, "report": 3, "report_card": 3, "speedrun": 3, "cli": 9,
        "__init__": 9}


def _part(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    depth = len(module.relative_to(PACKAGE).parts) - 1
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:            # relative: resolve against the package path
                base = list(module.relative_to(PACKAGE).parts[: depth - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    parts.add(target[0])
                else:
                    parts.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("nanoseek."):
                parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nanoseek."))
    return {p.removesuffix(".py") for p in parts}


def test_imports_flow_one_way():
    bad = []
    for module in PACKAGE.rglob("*.py"):
        own = RANK.get(_part(module), 9)
        for part in _imported_parts(module):
            if RANK.get(part, 9) > own:
                bad.append(f"{module.relative_to(PACKAGE)} imports {part}")
    assert not bad, bad


def test_runtime_never_imports_test_oracles_or_pickle():
    for module in PACKAGE.rglob("*.py"):
        text = module.read_text()
        for banned in ("import transformers", "from transformers", "pickle.load", "weights_only=False"):
            assert banned not in text, f"{module}: {banned}"


def test_files_stay_small():
    too_big = [(m.name, n) for m in PACKAGE.rglob("*.py") if (n := len(m.read_text().splitlines())) > 500]
    assert not too_big, too_big
