"""Pretraining runs end to end: exact resume, SIGKILL during checkpoint writes, torchrun DDP, and
checkpoints that transformers opens with the same logits. Tiny presets, float32, a few steps each."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.train.pretrain import PretrainConfig, main
from nanoseek.train.state import MARKER, complete_checkpoints, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    file = tmp_path_factory.mktemp("data") / "arith.jsonl"
    with file.open("w") as f:
        for _ in range(400):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"text": f"{a} + {b} = <think>{a} + {b} = {a + b}</think> {a + b}"}) + "\n")
    return file


def _config(corpus, out, **overrides) -> PretrainConfig:
    base = dict(model="tiny_deepseek_v3", data=str(corpus), out=str(out), steps=6, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, save_every=3, keep_last=10, dtype="float32", peak_tflops=1.0,
                plot_every=3, vocab_size=300)
    return PretrainConfig(**{**base, **overrides})


def _flags(cfg: PretrainConfig) -> list[str]:
    out = []
    for key, value in vars(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out


def _tensors(folder: Path) -> dict:
    return {**load_file(str(folder / "model.safetensors")),
            **{"opt." + k: v for k, v in load_file(str(folder / "training_state/optimizer.safetensors")).items()}}


def _assert_bitwise_equal(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    main(_config(corpus, tmp_path / "a"))
    assert [p.name for p in complete_checkpoints(tmp_path / "a")] == ["step_00000003", "step_00000006"]
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    shutil.rmtree(tmp_path / "b/checkpoints/step_00000006")       # as if killed after step 3's save
    main(_config(corpus, tmp_path / "b", resume=True))
    _assert_bitwise_equal(tmp_path / "a/checkpoints/step_00000006", tmp_path / "b/checkpoints/step_00000006")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")       # metrics.jsonl replayed, not duplicated
    state = json.loads((tmp_path / "b/latest/training_state/state.json").read_text())
    assert state["step"] == 6 and state["data"]["position"] > 0 and state["config"]["steps"] == 6
    plots = {p.name for p in (tmp_path / "b/plots").glob("*.png")}
    assert {"loss.png", "lr.png", "grad_norm.png", "expert_load_max_over_mean.png", "mtp_loss.png"} <= plots
    first, last = _losses(tmp_path / "a")[0], _losses(tmp_path / "a")[-1]
    assert last < first


def test_a_run_is_never_overwritten_without_resume(corpus, tmp_path):
    main(_config(corpus, tmp_path / "a", steps=1))
    with pytest.raises(ValueError, match="--resume"):
        main(_config(corpus, tmp_path / "a", steps=1))


def test_leftovers_of_a_killed_write_are_ignored_and_cleaned(corpus, tmp_path):
    main(_config(corpus, tmp_path / "a", steps=3))
    root = tmp_path / "a/checkpoints"
    (root / ".tmp-step_00000006-999").mkdir()
    (root / ".tmp-step_00000006-999/model.safetensors").write_bytes(b"\0" * 10)
    shutil.copytree(root / "step_00000003", root / "step_00000006")
    (root / "step_00000006" / MARKER).unlink()                      # renamed, never marked complete
    assert latest_checkpoint(tmp_path / "a").name == "step_00000003"
    main(_config(corpus, tmp_path / "a", resume=True))
    assert not list(root.glob(".tmp-*"))
    assert (root / "step_00000006" / MARKER).is_file()


def _cli(cfg: PretrainConfig, *prefix: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *prefix, "-m", "nanoseek.cli", "train", "pretrain", *_flags(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    return out


def test_sigkill_during_checkpoint_writes_leaves_a_resumable_run(corpus, tmp_path):
    reference = _config(corpus, tmp_path / "ref", steps=8, save_every=1)
    _finish(_cli(reference))
    victim = _config(corpus, tmp_path / "victim", steps=8, save_every=1, resume=True)
    rng = random.Random(0)
    for _ in range(3):                     # kill at random moments: mid-step or mid-write
        proc = _cli(victim)
        deadline = time.time() + 120
        while latest_checkpoint(victim.out) is None or not list(Path(victim.out, "checkpoints").iterdir()):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _finish(_cli(victim))
    _assert_bitwise_equal(tmp_path / "ref/checkpoints/step_00000008", tmp_path / "victim/checkpoints/step_00000008")


def test_torchrun_two_processes_equal_one_with_twice_the_accumulation(corpus, tmp_path):
    two = _config(corpus, tmp_path / "ddp", steps=3, batch_size=2, grad_accum=1, save_every=3)
    one = _config(corpus, tmp_path / "single", steps=3, batch_size=2, grad_accum=2, save_every=3)
    _finish(_cli(two, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    _finish(_cli(one))
    state = json.loads((tmp_path / "ddp/latest/training_state/state.json").read_text())
    assert state["world_size"] == 2
    assert len(state["replica_checksums"]) == 2 and len(set(state["replica_checksums"])) == 1
    a, b = load_file(str(tmp_path / "ddp/latest/model.safetensors")), load_file(str(tmp_path / "single/latest/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-3, msg=key)
    da, db = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert da == pytest.approx(db, rel=1e-5)


def test_checkpoint_opens_in_transformers_with_the_same_logits(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    import nanoseek
    main(_config(corpus, tmp_path / "a", steps=2, save_every=2))
    folder = tmp_path / "a/latest"
    ours = nanoseek.load_model(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("12 + 30 = <think>", add_special_tokens=False).input_ids])
    assert ids.tolist()[0] == nanoseek.load_tokenizer(folder).encode("12 + 30 = <think>")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
    assert ours.cfg.n_mtp_layers == 1 and len(ours.mtp) == 1      # the MTP module is in the folder too
