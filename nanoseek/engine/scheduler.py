"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, `schedule()` returns {sequence: n_tokens} under a token budget:
1. running sequences that are decoding get 1 token each (they all run in one batched forward);
   when the pool has no block for a new token, the most recently admitted sequence is preempted —
   its blocks are freed and it goes back to the front of the queue, to be recomputed later
   (vLLM's recompute preemption: the output is unchanged, only time is lost);
2. sequences still prefilling get a chunk of their remaining prompt (chunked prefill);
3. waiting sequences are admitted while budget, blocks and the batch-size limit allow; on
   admission their prompt's full blocks are looked up in the prefix cache and reused.

Worked example, budget 64 tokens, block 16: A decoding, B with 100 prompt tokens waiting ->
step 1: {A: 1, B: 63}; step 2: {A: 1, B: 37}; step 3: {A: 1, B: 1} (B now decodes too).

Speculative decoding (speculative.py) sets `seq.num_lookahead` = k drafts to verify: that decode
runs 1 + k tokens, so blocks for 1 + k are reserved and the step reads {A: 1 + k}. When the pool
is short, the lookahead drops to 0 for that step (a plain decode) before anything is preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockPool, block_hashes


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]                 # prompt + generated so far
    num_prompt_tokens: int
    params: object = None                # SamplingParams (engine-level; the scheduler does not read it)
    index: int = 0                       # which of the request's n samples
    parent: "Sequence | None" = None     # n > 1: wait until the parent's prompt is cached, then share it
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0                # tokens whose KV entries are in the cache
    num_cached_tokens: int = 0           # prompt tokens served by the prefix cache
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks so far
    num_preemptions: int = 0
    num_lookahead: int = 0               # draft tokens its next decode verifies (speculative decoding)
    finish_reason: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_remaining(self) -> int:
        """Tokens to run before the next sample: 1 when decoding, more while (re)filling the cache."""
        return len(self.token_ids) - self.num_computed

    @property
    def prompt_cached(self) -> bool:
        return self.num_computed >= self.num_prompt_tokens


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 enable_prefix_caching: bool = True, prefix_hit_margin: int = 0):
        self.pool, self.max_num_seqs, self.budget = pool, max_num_seqs, max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        # a prefix hit gives back the blocks holding its last `prefix_hit_margin` tokens, to be recomputed:
        # MTP cache entries of a block's last tokens depend on the tokens after it (speculative.py)
        self.prefix_hit_margin = prefix_hit_margin
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def check_fits(self, num_prompt_tokens: int) -> None:
        """A prompt that could never run, even alone in the pool, is refused up front."""
        needed = -(-(num_prompt_tokens + 1) // self.pool.block_size)
        if needed > self.pool.num_blocks:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens needs {needed} KV blocks; the pool has "
                             f"{self.pool.num_blocks} (raise the cache size)")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> dict[Sequence, int]:
        batch, budget = {}, self.budget
        for seq in [s for s in self.running if s.num_remaining == 1]:  # 1. decodes
            if seq not in self.running:                                # preempted below by a later one
                continue
            if seq.num_lookahead and not self.reserve(seq, 1 + seq.num_lookahead):
                seq.num_lookahead = 0                                  # drafts never cost a preemption
            while not self.reserve(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                batch.pop(victim, None)
                if victim is seq:
                    break
            if seq in self.running:
                batch[seq] = 1 + seq.num_lookahead
                budget -= batch[seq]
        for seq in [s for s in self.running if s.num_remaining > 1]:   # 2. chunked prefills
            n = min(seq.num_remaining, budget)
            if n > 0 and self.reserve(seq, n):
                batch[seq] = n
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:   # 3. admissions
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.prompt_cached and seq.parent.finish_reason is None:
                break                                                  # its siblings share the prompt soon
            self._admit(seq)
            n = min(seq.num_remaining, budget)
            if not self.reserve(seq, n):
                self._free(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch[seq] = n
            budget -= n
        return batch

    def _admit(self, seq: Sequence) -> None:
        """Reuse cached full blocks of the tokens (prompt, plus outputs after a preemption); the last
        token is always computed, since its logits give the next sample."""
        if not self.enable_prefix_caching:
            return
        bs = self.pool.block_size
        for h in block_hashes(seq.token_ids[:-1], bs):
            block = self.pool.lookup(h)
            if block is None:
                break
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        for _ in range(min(-(-self.prefix_hit_margin // bs), len(seq.block_table))):
            self.pool.release(seq.block_table.pop())
            seq.block_hashes.pop()
        seq.num_computed = len(seq.block_table) * bs
        if seq.num_preemptions == 0:      # hits are reported for the prompt as first submitted
            seq.num_cached_tokens = min(seq.num_computed, seq.num_prompt_tokens)

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Make sure seq has blocks for n more tokens; all or nothing."""
        needed = -(-(seq.num_computed + n) // self.pool.block_size) - len(seq.block_table)
        if needed > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(max(needed, 0)))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.appendleft(seq)
        seq.num_lookahead = 0                  # its drafts are gone; it re-prefills first
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.pool.release(block)
        seq.block_table, seq.num_computed, seq.block_hashes = [], 0, []

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq are in the cache: hash the blocks that just became full."""
        seq.num_computed += n
        if not self.enable_prefix_caching:
            return
        bs = self.pool.block_size
        done, full = len(seq.block_hashes), min(seq.num_computed, len(seq.token_ids)) // bs
        if full > done:                  # extend the chain from the last hash, not from token 0
            parent = seq.block_hashes[-1] if done else None
            for i, h in enumerate(block_hashes(seq.token_ids[done * bs: full * bs], bs, parent), done):
                self.pool.register(seq.block_table[i], h)
                seq.block_hashes.append(h)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove seq (running or waiting) and release its blocks at once (abort or completion)."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
