"""Test helpers for the API server: a tiny checkpoint that thinks, a server process on loopback,
and raw HTTP / SSE helpers (stdlib only, so what the wire carries is what the tests see).

The checkpoint is a 2-layer random Llama over a byte-level vocabulary (256 bytes + chat and
<think> tokens), trained for a few hundred steps (~2 s) until its greedy answer to any chat turn
is, token for token, R1-shaped:

    prompt ... "<|im_start|>assistant\n<think>\n"  ->  "Two and two make four.</think>The answer is 4."

and, with thinking switched off (the template pre-fills "<think>\n\n</think>\n\n"), just the
answer. Training stops as soon as every target token is the argmax, so the distribution stays
broad enough that sampling with different seeds gives different text.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REASONING = "Two and two make four."
ANSWER = "The answer is 4."
# Qwen3-style: thinking on by default (the prompt ends in "<think>\n"), off with enable_thinking=false.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")
QUESTIONS = ["What is 2+2?", "Hi!", "Tell me a story about a dragon.", "x", "Please add two and two for me.",
             "What is the capital of France?", "Count to ten.", "Write a poem.", "Why is the sky blue?"]
SYSTEM = "You are a careful assistant. Think before you answer, then answer briefly."


def tiny_tokenizer():
    """Byte-level BPE without merges: one token per byte, plus the chat and think tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from nanoseek.tokenizer import Tokenizer, _byte_alphabet
    vocab = {char: byte for byte, char in _byte_alphabet().items()}
    backend = Backend(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     chat_template=CHAT_TEMPLATE)


def _examples(tok) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) pairs: thinking on and off, with and without a system message."""
    eos = tok.eos_token_id
    pairs = []
    for question in QUESTIONS:
        for thinking, system in ((True, False), (False, False), (True, True), (False, True)):
            messages = ([{"role": "system", "content": SYSTEM}] if system else []) + \
                       [{"role": "user", "content": question}]
            prompt = tok.apply_chat_template(messages, tokenize=True, enable_thinking=thinking)
            target = tok.encode(f"{REASONING}</think>{ANSWER}" if thinking else ANSWER) + [eos]
            pairs.append((prompt, target))
    return pairs


def train_thinking_model(tok, max_steps: int = 600):
    from nanoseek.model import Transformer
    from nanoseek.model.presets import tiny_llama
    torch.manual_seed(0)
    model = Transformer(tiny_llama(vocab_size=tok.vocab_size, tie_word_embeddings=False, max_seq_len=8192))
    pairs = _examples(tok)
    T = max(len(p) + len(t) for p, t in pairs)
    ids = torch.zeros(len(pairs), T, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100)
    for row, (prompt, target) in enumerate(pairs):
        seq = prompt + target
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) - 1: len(seq) - 1] = torch.tensor(target)   # position t predicts t + 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    mask = labels != -100
    for step in range(max_steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if bool((logits.argmax(-1) == labels)[mask].all()):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        raise RuntimeError(f"the tiny model did not learn its answer in {max_steps} steps (loss {loss.item():.3f})")
    return model.eval(), step


@lru_cache(maxsize=1)
def thinking_checkpoint() -> Path:
    """A Hugging Face folder with the trained tiny model and its tokenizer. Built once and kept in
    the temp folder under a key of this file's text and torch's version (~10 s of training saved
    per run on a busy machine); the tests check its answers anyway."""
    key = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"nanoseek-thinker-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    building = Path(tempfile.mkdtemp(prefix="nanoseek-thinker-build-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tiny tensors: a second thread only adds contention
    try:
        tok = tiny_tokenizer()
        model, _ = train_thinking_model(tok)
        model.save_pretrained(building, tokenizer=tok)
    finally:
        torch.set_num_threads(threads)
    try:
        building.rename(folder)           # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
    for stale in folder.parent.glob("nanoseek-thinker-*"):    # checkpoints of earlier versions of this file
        if stale != folder and not stale.name.startswith("nanoseek-thinker-build-"):
            shutil.rmtree(stale, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------- the server process

# One thread: a tiny model gains nothing from a second one on a shared 2-core machine. No C++
# kernels: their torch fallbacks are what they are tested against (test_kernels.py), and a server
# must not spend a minute compiling them whenever their sources change; the HTTP layer is under test.
SERVER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "NANOSEEK_KERNELS": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m nanoseek.cli serve ...` on a free loopback port; its output goes to a log file."""

    def __init__(self, model: str | Path, *flags: str, env: dict | None = None, startup_s: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="nanoseek-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "w")     # noqa: SIM115 (open for the process's lifetime)
        command = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model), "--port", str(self.port),
                   "--dtype", "float32", "--device", "cpu", *flags]
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **SERVER_ENV, **(env or {})})
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if request("GET", self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up in {startup_s} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        if self._log.closed:
            return self.output
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self.output = self.log()
            self._log.close()
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


# ---------------------------------------------------------------------------- raw HTTP

def request(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 30
            ) -> tuple[int, dict, bytes]:
    """One HTTP request; body may be bytes (sent as is) or JSON-able. -> (status, headers, body)."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_json(url: str, body, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    status, head, data = request("POST", url, body, headers, timeout)
    return status, head, json.loads(data) if data else None


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its event payloads, checking the framing: every event is exactly one
    `data: <payload>` line followed by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), repr(text[-80:])
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        events.append(block[len("data: "):])
    return events
