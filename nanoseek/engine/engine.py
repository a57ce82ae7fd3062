"""Engine: add_request / step / abort over a paged KV cache with continuous batching.

    step = schedule() -> model forward(s) -> sample -> append tokens -> finish or continue

All decoding sequences share one batched forward of (B, 1) tokens; prefill chunks run as
(1, n) forwards in the same step (attention cost stays linear in each sequence's own length;
only the last position's logits are projected onto the vocabulary). The engine knows token ids
only; text, chat templates and stop strings live in the LLM facade (llm.py).

Weights changing in place (a GRPO update) is noticed through the parameters' version counters and
drops the prefix cache, so a cache hit never serves entries computed by older weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .kv_cache import BlockPool, PagedCache
from .sampling import SamplerState, SamplingParams, sample
from .scheduler import Scheduler, Sequence


@dataclass
class EngineConfig:
    block_size: int = 16                    # tokens per KV block (and per prefix-cache unit)
    kv_cache_gb: float = 1.0                # pool size, unless num_blocks is given
    num_blocks: int | None = None
    max_num_seqs: int = 64                  # sequences in one decode batch at most
    max_num_batched_tokens: int = 1024      # per-step token budget (decodes + prefill chunks)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None        # default: the model's max_position_embeddings


@dataclass
class StepOutput:
    """What one step produced for one sequence (sample `index` of request `request_id`)."""
    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None, eos_token_ids=(), seed: int = 0):
        self.model, self.config = model.eval(), config or EngineConfig()
        c = self.config
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_model_len = c.max_model_len or model.cfg.max_seq_len
        probe = BlockPool(model.cfg, 1, c.block_size, self.dtype, "meta")
        num_blocks = c.num_blocks or max(int(c.kv_cache_gb * 2**30 / (probe.bytes_per_token() * c.block_size)), 1)
        self.pool = BlockPool(model.cfg, num_blocks, c.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, c.max_num_seqs, c.max_num_batched_tokens, c.enable_prefix_caching)
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.states: dict[Sequence, SamplerState] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)   # for unseeded requests
        self._weights_version = self._version()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_model_len "
                             f"{self.max_model_len}")
        seqs, parent = [], None
        for index in range(params.n):
            seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params, index, parent=parent)
            self.states[seq] = SamplerState(params, prompt_ids, vocab, eos_token_ids=self.eos_token_ids, index=index)
            self.scheduler.add(seq)
            seqs.append(seq)
            parent = parent or seq
        self.requests[request_id] = seqs

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks go back to the pool at once."""
        for seq in self.requests.pop(request_id, []):
            if seq.finish_reason is None:
                self.scheduler.finish(seq, "abort")
            self.states.pop(seq, None)

    def abort_sample(self, request_id: str, index: int, reason: str = "abort") -> None:
        """End one of a request's n samples (the LLM facade does this when a stop string appears)."""
        for seq in self.requests.get(request_id, []):
            if seq.index == index and seq.finish_reason is None:
                self.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        version = self._version()
        if version != self._weights_version:        # weights were updated in place
            self.pool.reset_prefix_cache()
            self._weights_version = version
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("the KV cache pool cannot fit any waiting request; raise kv_cache_gb")
            return []
        decodes = [s for s, n in batch.items() if s.num_remaining == 1]
        ready, rows = [], []
        if decodes:
            rows.append(self._forward(decodes, [1] * len(decodes)))
            ready.extend(decodes)
        for seq, n in batch.items():
            if seq.num_remaining > 1:
                completes = n == seq.num_remaining
                logits = self._forward([seq], [n], need_logits=completes)
                if completes:
                    rows.append(logits)
                    ready.append(seq)
        for seq, n in batch.items():
            self.scheduler.computed(seq, n)
        if not ready:
            return []
        logits = torch.cat(rows).float()
        tokens, logprobs = sample(logits, [self.states[s] for s in ready], self.generator)
        return [self._append(seq, token, lp) for seq, token, lp in zip(ready, tokens, logprobs)]

    def _forward(self, seqs: list[Sequence], counts: list[int], need_logits: bool = True):
        """Run (B, n) new tokens of seqs through the model; logits (B, vocab) of each row's last token."""
        bs, device = self.pool.block_size, self.device
        ids = [s.token_ids[s.num_computed: s.num_computed + n] for s, n in zip(seqs, counts)]
        positions = [list(range(s.num_computed, s.num_computed + n)) for s, n in zip(seqs, counts)]
        slots = [[s.block_table[p // bs] * bs + p % bs for p in pos] for s, pos in zip(seqs, positions)]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        positions_t = torch.tensor(positions, device=device)
        seq_len = int(positions_t.max()) + 1
        cache = PagedCache(self.pool, torch.tensor(slots, device=device), torch.tensor(tables, device=device), seq_len)
        hidden = self.model.hidden_states(torch.tensor(ids, device=device), positions_t, cache)
        return self.model.logits(hidden[:, -1]) if need_logits else None

    def _append(self, seq: Sequence, token: int, logprob) -> StepOutput:
        seq.token_ids.append(token)
        self.states[seq].append(token)
        p = seq.params
        reason = None
        if token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            reason = "stop"
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        elif len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        out = StepOutput(seq.request_id, seq.index, [token], [logprob] if logprob is not None else [],
                         num_cached_tokens=seq.num_cached_tokens)
        if reason is not None:
            self.finish(seq, reason)
            out.finished, out.finish_reason = True, reason
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.states.pop(seq, None)
        siblings = self.requests.get(seq.request_id, [])
        if all(s.finish_reason is not None for s in siblings):
            self.requests.pop(seq.request_id, None)

    def _version(self) -> int:
        return sum(p._version for p in self.model.parameters())
