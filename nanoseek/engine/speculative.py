"""MTP speculative decoding: DeepSeek-V3's multi-token-prediction modules draft, the model verifies.

DeepSeek-V3 §5.4.3: the token drafted by its 1-depth MTP module is accepted 85-90% of the time,
for 1.8x the tokens per second. The modules are used as vLLM and SGLang use DeepSeek's weights
(model/mtp.py): module k at position i reads eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),
h^0 being the main model's normed final hidden state, and predicts t_{i+k+1}.

One decode step of a greedy sequence of n tokens whose last one, t_{n-1}, is not in the cache yet,
and whose previous step left drafts d_1..d_k (guesses for t_n..t_{n+k-1}):

  verify  the main model runs [t_{n-1}, d_1, ..., d_k] at positions n-1..n-1+k: one (B, 1 + k)
          forward for all speculating sequences. The sampler then picks the token of each position
          in turn and goes on while the pick equals the next draft: 1..k+1 tokens per step. Picking
          with the sampler (greedy rows: argmax after penalties and the min_tokens ban) makes the
          output exactly plain greedy decoding's, logprobs and stops included.
  cache   the KV entries of positions n-1..n-1+a (a accepted drafts) are kept: num_computed
          advances by 1 + a. Rejected positions stay stale in their blocks, overwritten before any
          query at that position reads them (writes come before attention, model/cache.py).
  draft   the MTP modules run over the positions whose inputs became known, fed the main model's
          normed hidden states kept from the forwards (`record`). Module j at position p reads
          t_{p+j}: its entry is final once t_{p+j} is known; one computed from a draft token is
          provisional and recomputed at the next step (`DraftState.start`). From the last position
          n'-2 (n' tokens after the step) module 1 drafts t_{n'}, module 2, fed that draft, drafts
          t_{n'+1}, ...; past the model's last module K, module K runs again one position on, fed its
          own output hidden state in place of h^{K-1} (vLLM's reuse, EAGLE's approximation).

Every sequence keeps its MTP cache filled (prompt chunks and sampled requests included, so a
prefix-cache block carries valid MTP entries whoever computed it); only greedy sequences draft.
Prefix hits give back the block of their last K tokens (Scheduler.prefix_hit_margin), whose MTP
entries depend on the tokens after the block.

Left out on purpose: drafts for sampled requests (rejection sampling, Leviathan et al. 2023, would
keep their distribution exact; they decode one token per step), draft trees, separate draft models.

    pytest -q tests/test_speculative.py
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .kv_cache import PagedCache
from .sampling import sample
from .scheduler import Scheduler, Sequence


@dataclass
class SpecStats:
    """Engine totals over the decode steps that verified drafts (one count per sequence per step)."""
    num_steps: int = 0
    num_draft_tokens: int = 0          # drafts verified
    num_accepted_tokens: int = 0       # drafts equal to the model's own pick
    num_emitted_tokens: int = 0        # tokens those steps produced: accepted + one pick per step

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)

    @property
    def tokens_per_step(self) -> float:
        return self.num_emitted_tokens / max(self.num_steps, 1)


@dataclass
class DraftState:
    """One sequence's MTP bookkeeping: every module's entries at positions < start are final."""
    start: int
    epoch: int                           # seq.num_preemptions it was made under: a preemption resets it
    hidden: torch.Tensor                 # (L, D) normed h^0 at positions start..start+L-1
    drafts: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    """What verifying one sequence's drafts gave."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    num_accepted: int = 0
    finish_reason: str | None = None


class MTPSpeculator:
    def __init__(self, model: Transformer, scheduler: Scheduler, num_speculative_tokens: int, max_model_len: int):
        if model.cfg.n_mtp_layers < 1:
            raise ValueError("speculative decoding needs a model with MTP layers (num_nextn_predict_layers >= 1)")
        self.model, self.scheduler, self.pool = model, scheduler, scheduler.pool
        self.k, self.max_model_len = num_speculative_tokens, max_model_len
        self.depth = min(num_speculative_tokens, model.cfg.n_mtp_layers)   # K: modules chained at one position
        self.states: dict[Sequence, DraftState] = {}
        self.stats = SpecStats()

    # ------------------------------------------------------------------ bookkeeping
    def sync(self, seqs) -> None:
        """(Re)start the state of sequences just admitted, or re-admitted after a preemption: entries
        before num_computed came from the prefix cache (or nowhere, num_computed = 0)."""
        for seq in seqs:
            state = self.states.get(seq)
            if state is None or state.epoch != seq.num_preemptions:
                empty = self.model.embed.weight.new_empty(0, self.model.cfg.dim)
                self.states[seq] = DraftState(seq.num_computed, seq.num_preemptions, empty)
                seq.num_lookahead = 0

    def forget(self, seq: Sequence) -> None:
        self.states.pop(seq, None)

    def record(self, seq: Sequence, normed: torch.Tensor, first_position: int) -> None:
        """Keep normed h^0 (T, D) of positions first_position.. for the MTP modules."""
        state = self.states[seq]
        if first_position != state.start + len(state.hidden):
            raise RuntimeError(f"MTP hidden states of {seq.request_id!r} are not contiguous")
        state.hidden = torch.cat([state.hidden, normed])

    def draft_budget(self, seq: Sequence) -> int:
        """Drafts worth verifying next step: all k, unless max_tokens or max_model_len end it sooner
        (k drafts give up to k + 1 tokens). 0 for sampled requests and sequences not decoding."""
        if not seq.params.greedy or seq.num_computed != len(seq.token_ids) - 1:
            return 0
        room = self.max_model_len - len(seq.token_ids) - 1
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(self.k, room))

    # ------------------------------------------------------------------ verify
    def verify_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and positions (B, 1 + max lookahead): [t_{n-1}, d_1..d_L] at n-1..n-1+L, short rows
        padded by repeating their last token (the same entries written twice, a logit never read)."""
        T = 1 + max(s.num_lookahead for s in seqs)
        ids, positions = [], []
        for seq in seqs:
            row = [seq.token_ids[-1]] + self.states[seq].drafts[:seq.num_lookahead]
            ids.append(row + [row[-1]] * (T - len(row)))
            positions.append([seq.num_computed + min(t, len(row) - 1) for t in range(T)])
        device = self.model.embed.weight.device
        return torch.tensor(ids, device=device), torch.tensor(positions, device=device)

    def accept(self, seqs: list[Sequence], logits: torch.Tensor, sampler_states: dict, push,
               generator) -> list[Verdict]:
        """logits (B, T, V) float of the verify forward; position j's row predicts the token after input j.
        Pick position 0 of every row, then position 1 of the rows whose pick equalled d_1, ... `push(seq,
        token)` appends a pick (the sampler state too, so penalties see it) and returns a finish reason."""
        verdicts = [Verdict() for _ in seqs]
        active, j = list(range(len(seqs))), 0
        while active:
            rows = torch.tensor(active, device=logits.device)
            tokens, logprobs = sample(logits[rows, j], [sampler_states[seqs[b]] for b in active], generator)
            still = []
            for b, token, logprob in zip(active, tokens, logprobs):
                seq, verdict = seqs[b], verdicts[b]
                verdict.token_ids.append(token)
                if logprob is not None:
                    verdict.logprobs.append(logprob)
                verdict.finish_reason = push(seq, token)
                if j < seq.num_lookahead and token == self.states[seq].drafts[j]:
                    verdict.num_accepted += 1               # its KV entry (input j + 1) holds the true token
                    if verdict.finish_reason is None:
                        still.append(b)
            active, j = still, j + 1
        for seq, verdict in zip(seqs, verdicts):
            self.stats.num_steps += 1
            self.stats.num_draft_tokens += seq.num_lookahead
            self.stats.num_accepted_tokens += verdict.num_accepted
            self.stats.num_emitted_tokens += len(verdict.token_ids)
        return verdicts

    # ------------------------------------------------------------------ draft
    def propose(self, seqs: list[Sequence], finishing: set) -> None:
        """After a step's tokens are appended: bring each sequence's MTP cache up to date and leave
        new drafts (and seq.num_lookahead) for the greedy ones that go on decoding."""
        rows = []                                   # (seq, window end, new start, draft budget)
        for seq in seqs:
            state = self.states[seq]
            budget = 0 if seq in finishing else self.draft_budget(seq)
            # entries whose module-K input t_{p+K} is known become final
            final = max(state.start, min(seq.num_computed, len(seq.token_ids) - self.depth))
            end = seq.num_computed if budget else final
            if end > state.start:
                rows.append((seq, end, final, budget))
            state.drafts, seq.num_lookahead = [], 0
        if not rows:
            return
        drafts, last_hidden = self._run_chain(rows)
        self._run_reuse(rows, drafts, last_hidden)
        for (seq, _, final, budget), row_drafts in zip(rows, drafts):
            state = self.states[seq]
            state.hidden = state.hidden[final - state.start:]
            state.start = final
            state.drafts = row_drafts[:budget]
            seq.num_lookahead = len(state.drafts)

    def _run_chain(self, rows) -> tuple[list[list[int]], torch.Tensor]:
        """Modules 1..K over each row's window [start, end), batched as (B, W) with short rows padded
        by repeating their last position. Drafting rows take module j's pick at their last position
        as the token module j + 1 reads there. Returns the picks and each row's last h^K (B, D)."""
        model, device = self.model, self.model.embed.weight.device
        seqs = [seq for seq, *_ in rows]
        starts = [self.states[seq].start for seq in seqs]
        W = max(end - start for (_, end, _, _), start in zip(rows, starts))
        positions = [[min(start + w, end - 1) for w in range(W)] for (_, end, _, _), start in zip(rows, starts)]
        prev = torch.stack([self.states[seq].hidden[torch.tensor(pos, device=device) - start]
                            for seq, pos, start in zip(seqs, positions, starts)])          # (B, W, D) normed h^0
        positions_t = torch.tensor(positions, device=device)                              # (B, W)
        dtype = model.embed.weight.dtype
        cache = PagedCache.for_rows(self.pool, [s.block_table for s in seqs], positions_t)
        rope = model.rotary(positions_t, dtype)
        last = torch.tensor([end - 1 - start for (_, end, _, _), start in zip(rows, starts)], device=device)
        batch = torch.arange(len(rows), device=device)
        drafting = [b for b, row in enumerate(rows) if row[3] > 0]
        tokens = [list(seq.token_ids) for seq in seqs]             # drafting rows grow by each pick
        drafts: list[list[int]] = [[] for _ in rows]
        for j in range(1, self.depth + 1):
            next_ids = torch.tensor([[tokens[b][p + j] for p in pos] for b, pos in enumerate(positions)],
                                    device=device)                                       # (B, W) t_{p+j}
            # the module itself, not mtp_forward: only the drafting rows' last position needs logits
            prev = model.mtp[j - 1](prev, model.embed(next_ids), rope, positions_t, model.mtp_cache(cache, j))   # (B, W, D) h^j
            if drafting:
                picks = model.output_head(prev[batch, last][drafting]).argmax(-1).tolist()
                for b, token in zip(drafting, picks):
                    tokens[b].append(token)
                    drafts[b].append(token)
        return drafts, prev[batch, last]

    def _run_reuse(self, rows, drafts: list[list[int]], last_hidden: torch.Tensor) -> None:
        """Drafts K+1..k: module K again at positions n-1, n, ..., fed its own last hidden state and
        last draft. Its entries there are provisional; blocks for them are reserved if the pool has
        them, else the row stops at K drafts."""
        model, device, K = self.model, self.model.embed.weight.device, self.depth
        budgets = [row[3] for row in rows]
        for b, (seq, _, _, budget) in enumerate(rows):
            if budget > K and not self.scheduler.reserve(seq, budget - K):
                budgets[b] = K
        for extra in range(1, self.k - K + 1):
            live = [b for b, budget in enumerate(budgets) if budget >= K + extra]
            if not live:
                return
            seqs = [rows[b][0] for b in live]
            positions = torch.tensor([[len(seq.token_ids) - 2 + extra] for seq in seqs], device=device)  # (R, 1)
            ids = torch.tensor([[drafts[b][-1]] for b in live], device=device)
            prev = last_hidden[live].unsqueeze(1)                                        # (R, 1, D)
            cache = PagedCache.for_rows(self.pool, [s.block_table for s in seqs], positions)
            rope = model.rotary(positions, prev.dtype)
            h = model.mtp[K - 1](prev, model.embed(ids), rope, positions, model.mtp_cache(cache, K))[:, 0]               # (R, D)
            for b, token in zip(live, model.output_head(h).argmax(-1).tolist()):
                drafts[b].append(token)
            last_hidden = last_hidden.index_copy(0, torch.tensor(live, device=device), h)
