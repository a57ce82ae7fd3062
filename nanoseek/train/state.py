"""Run folders and atomic checkpoints that resume bit for bit.

A run folder holds:

    run/
      metrics.jsonl                one JSON object per optimiser step (rank 0 writes it)
      plots/*.png                  loss, lr, grad norm, expert load (train/metrics.py)
      checkpoints/step_00000100/   a Hugging Face folder: config.json, model.safetensors, tokenizer
        training_state/            optimizer.safetensors, rng.safetensors, state.json (step, data
                                   cursor, python/numpy RNG, counters, the stage's config)
        COMPLETE                   written last: only marked folders are resumed from
      latest -> checkpoints/step_00000100

Writing is atomic: everything goes to `checkpoints/.tmp-step_…`, every file and folder is fsynced,
the folder is renamed into place, then COMPLETE is written and fsynced. A process killed at any
moment leaves either the previous complete checkpoint or a folder that resume ignores (and the
next save removes). The last `keep` complete checkpoints are kept. No pickle anywhere: tensors go to
safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d{8})$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):   # files before the folders holding them
        _fsync(path)
    _fsync(folder)


# ---- RNG and optimizer state as tensors + JSON ----------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a training step may touch: torch (CPU, CUDA), python's random, numpy's global."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into safetensors-ready tensors and JSON-able groups."""
    sd = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, slots in sd["state"].items() for key, value in slots.items()
               if isinstance(value, torch.Tensor)}
    scalars = {f"{index}.{key}": value for index, slots in sd["state"].items() for key, value in slots.items()
               if not isinstance(value, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in {**tensors, **plain["scalars"]}.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in plain["param_groups"]]
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    for slots in state.values():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor) and key != "step":
                slots[key] = value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- checkpoints ----------------------------------------------------------------------------------

def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run) -> Path | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def save_checkpoint(run, step: int, model, optimizer, tokenizer=None, state: dict | None = None,
                    keep: int = 3) -> Path:
    """Write checkpoint `step` atomically (see the module docstring); returns its folder."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):               # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(run, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    model.save_pretrained(tmp, tokenizer=tokenizer)
    inner = tmp / "training_state"
    inner.mkdir()
    opt_tensors, opt_plain = optimizer_tensors(optimizer)
    save_file(opt_tensors, str(inner / "optimizer.safetensors"))
    rng_tensors, rng_plain = rng_state()
    save_file(rng_tensors, str(inner / "rng.safetensors"))
    body = {"step": step, "optimizer": opt_plain, "rng": rng_plain, **(state or {})}
    (inner / "state.json").write_text(json.dumps(body) + "\n")
    _fsync_tree(tmp)
    if final.exists():                              # an unmarked folder of a killed earlier write
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    (final / MARKER).write_text(f"{step}\n")
    _fsync(final / MARKER)
    _fsync(final)
    _point_latest(Path(run), final)
    for old in complete_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(run: Path, target: Path) -> None:
    link, tmp = run / "latest", run / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run), tmp)
    os.replace(tmp, link)


def read_training_state(folder) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, optimizer tensors, rng tensors) of a complete checkpoint folder."""
    inner = Path(folder) / "training_state"
    if not (Path(folder) / MARKER).is_file():
        raise ValueError(f"{folder}: not a complete checkpoint (no {MARKER} marker)")
    try:
        state = json.loads((inner / "state.json").read_text())
        return state, load_file(str(inner / "optimizer.safetensors")), load_file(str(inner / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{inner}: unreadable training state ({e})") from None
