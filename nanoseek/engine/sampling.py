"""Sampling: vLLM's SamplingParams, per-sequence sampler state, and one batched, seeded `sample` step.

Each engine step turns logits (B, V), one row per sequence that needs a next token, into
token ids. Rows are processed in vLLM's order (V0's; V1 moved min-p before top-k/top-p):

    raw logprobs (if asked) -> repetition / presence / frequency penalties -> min_tokens ban
    -> greedy rows: argmax | random rows: temperature -> top-k -> top-p -> min-p -> draw

The draw is the inverse CDF: a random row takes one uniform u in [0, 1) and the first token, in
token-id order, whose running probability under the filtered distribution exceeds u. A seeded
row draws its u with its own `torch.Generator`, so a seeded request gives the same tokens whatever
else shares the batch; unseeded rows share the engine's generator, one u each in row order.

Two implementations of that draw (`draw`) agree token for token on the same uniforms. On the CPU
a C++ kernel (model/csrc/sampling.cpp) filters each row from two vectorised reads of it and a
selection over the few tokens the filters can keep (the R1 protocol's temperature 0.6 / top-p 0.95
keeps a median of 2 tokens of SmolLM2's 49152), so sampled rows cost about what greedy ones do;
before it, a stable sort of the vocabulary for top-p and an Exp(1) draw per token took 3.5x the
greedy step. Elsewhere (another device, no compiler) the torch path sorts each filtered row.
Penalties touch only each row's seen tokens; rows without penalties or bans are read as they are.

The engine, per sequence and per step:

    state = SamplerState(params, prompt_ids, vocab_size, eos_token_ids=eos, index=i)   # i-th of n
    token_ids, logprobs = sample(logits, states, generator)                            # each step
    state.append(token_id)                                                             # then this

Stopping is the engine's: EOS ends a sequence unless `ignore_eos` (the sampler never looks at it;
min_tokens bans EOS either way, as vLLM does), a `stop_token_ids` token ends it, `max_tokens` caps it.
Stop strings are the detokenizer's (detokenizer.py).

Left out on purpose: beam search, best_of, logit_bias / allowed_token_ids / bad_words, guided
decoding, prompt_logprobs, logprobs of the processed distribution (vLLM V1's default is raw).

    pytest -q tests/test_sampling.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import kernels

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20    # vLLM's default max_logprobs
NO_WEIGHT = -87.0    # the kernel's e^(s - max s) is 0 below this (e^-87 ~ 1.6e-38); `kept` counts above it


@dataclass
class SamplingParams:
    """How to pick a request's tokens; names and defaults are vLLM's."""
    n: int = 1                                   # independent samples of the prompt
    temperature: float = 1.0                     # 0 = greedy
    top_p: float = 1.0                           # keep the most likely tokens whose mass reaches top_p
    top_k: int = 0                               # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0                           # drop tokens less likely than min_p * the top token's p
    repetition_penalty: float = 1.0              # > 1 discourages any token of the prompt or output
    presence_penalty: float = 0.0                # subtracted once from each token already generated
    frequency_penalty: float = 0.0               # subtracted per occurrence in the output
    stop: str | list[str] | None = None          # stop strings (a list after __post_init__)
    stop_token_ids: list[int] | None = None      # token ids that end the sequence (a list after init)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False                     # keep going past EOS (the engine's job)
    max_tokens: int | None = 16
    min_tokens: int = 0                          # EOS and stop_token_ids are banned until this many
    seed: int | None = None                      # per-request RNG; the i-th of n samples uses seed + i
    logprobs: int | None = None                  # top logprobs per generated token; 0 = the chosen one only
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (vLLM's ranges)."""
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 f"{name} must be a finite number, got {value!r}")
        need(is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(is_int(self.top_k) and self.top_k >= -1,
             f"top_k must be an integer: 0 or -1 (all tokens) or >= 1, got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop),
             f"stop must be a string or a list of strings, got {self.stop!r}")
        need(all(self.stop), "stop strings must not be empty")
        need(all(is_int(i) and i >= 0 for i in self.stop_token_ids),
             f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}")
        need(is_int(self.min_tokens) and self.min_tokens >= 0,
             f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        need(self.seed is None or is_int(self.seed), f"seed must be None or an integer, got {self.seed!r}")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclass
class TokenLogprobs:
    """One generated token's logprobs under the raw model logits (log_softmax of the unprocessed row)."""
    token_id: int
    logprob: float
    rank: int                               # 1 = the most likely token
    top_logprobs: list[tuple[int, float]]   # the `params.logprobs` most likely (id, logprob), best first


class SamplerState:
    """One sequence's sampling state: its params, its RNG, and the token counts penalties need.

    The engine makes one per sequence (the i-th of a request's n samples passes index=i and is
    seeded with seed + i, as vLLM's child requests are), calls `sample` with the states of a step's
    rows, then `append` with each row's token. Rows with penalties keep the distinct tokens they
    have seen (the prompt's only for the repetition penalty) and each one's count in the output,
    as lists and as device tensors that `append` updates in place (S entries, not V). The tensors
    and the generator live on the logits' device, made at the first `sample`.
    """

    def __init__(self, params: SamplingParams, prompt_ids=(), vocab_size: int | None = None, *,
                 eos_token_ids=(), index: int = 0):
        self.params, self.vocab_size = params, vocab_size
        self.seed = None if params.seed is None else (params.seed + index) % 2**64
        self.output_ids: list[int] = []
        # min_tokens bans EOS and stop_token_ids alike; vLLM adds EOS whatever ignore_eos says.
        self.min_tokens_banned = list(dict.fromkeys([*eos_token_ids, *params.stop_token_ids]))
        self.has_penalties = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                              or params.frequency_penalty != 0.0)
        self.device: torch.device | None = None
        self.generator: torch.Generator | None = None
        self.seen_ids: list[int] = []                    # distinct tokens the penalties look at
        self.seen_counts: list[int] = []                 # each one's count in the output (0: prompt only)
        self._slot: dict[int, int] = {}                  # token -> its index in seen_ids
        self.penalty_ids: torch.Tensor | None = None     # (capacity,) int64: seen_ids on the device
        self.penalty_counts: torch.Tensor | None = None  # (capacity,) float32: seen_counts on the device
        if self.has_penalties and params.repetition_penalty != 1.0:
            for token in prompt_ids:
                self._see(token, 0)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    def append(self, token_id: int) -> None:
        """Record the token this sequence just got (after `sample`, before the next step)."""
        self.output_ids.append(token_id)
        if self.has_penalties:
            self._see(token_id, 1)

    def _see(self, token: int, count: int) -> None:
        slot = self._slot.get(token)
        if slot is None:
            slot = self._slot[token] = len(self.seen_ids)
            self.seen_ids.append(token)
            self.seen_counts.append(count)
            if self.penalty_ids is not None:
                if slot == len(self.penalty_ids):
                    self._to_device(2 * slot)
                else:
                    self.penalty_ids[slot], self.penalty_counts[slot] = token, count
        elif count:
            self.seen_counts[slot] += count
            if self.penalty_counts is not None:
                self.penalty_counts[slot] += count

    def _to_device(self, capacity: int) -> None:
        # Plain tensors even under inference_mode, so `append` may update them in either mode.
        with torch.inference_mode(False):
            n = len(self.seen_ids)
            self.penalty_ids = torch.zeros(max(capacity, 16), dtype=torch.long, device=self.device)
            self.penalty_counts = torch.zeros(max(capacity, 16), dtype=torch.float32, device=self.device)
            self.penalty_ids[:n] = torch.tensor(self.seen_ids, dtype=torch.long)
            self.penalty_counts[:n] = torch.tensor(self.seen_counts, dtype=torch.float32)

    def prepare(self, vocab_size: int, device: torch.device) -> None:
        """Build the device-side parts once, on the device the logits live on."""
        if self.device == device:
            return
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(f"logits have {vocab_size} columns but the state was made for {self.vocab_size}")
        bad = [i for i in [*self.seen_ids, *self.min_tokens_banned] if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} lie outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.device = vocab_size, device
        if self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        if self.has_penalties:
            self._to_device(2 * len(self.seen_ids))


@torch.no_grad()
def sample(logits: torch.Tensor, states: list[SamplerState], generator: torch.Generator | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row of logits (B, V), any float dtype; row i follows states[i]. Returns the B
    token ids and, per row, its TokenLogprobs (None where params.logprobs is None). Does not touch
    `logits` or the states' counts: call `state.append(token)` afterwards. `generator` serves
    unseeded rows (None = torch's default generator on the logits' device)."""
    _prepare(logits, states)
    B, V = logits.shape
    wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    raw_logprobs = logits[wanted].float().log_softmax(-1) if wanted else None   # (R, V), before any processing
    x = _edited(logits, states) if any(_needs_edit(s) for s in states) else logits   # (B, V)
    token_ids, _ = draw(x, *_knobs([s.params for s in states], logits.device),
                        _uniforms(states, generator, logits.device))
    tokens = token_ids.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * B
    if wanted:
        counts = [states[i].params.logprobs for i in wanted]
        entries = _token_logprobs(raw_logprobs, [tokens[i] for i in wanted], counts)
        for i, entry in zip(wanted, entries):
            logprobs[i] = entry
    return tokens, logprobs


def draw(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         min_p: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw of processed logits x (R, V) (penalties and bans already in): per row temperature
    (R,) float32 (0 = greedy: argmax), top_k (R,) int64, top_p and min_p (R,) float32, uniform (R,)
    float64 in [0, 1). A random row takes the inverse CDF of its filtered distribution, in token-id
    order, at `uniform`. Returns (token (R,) int64, kept (R,) int64: the size of each row's support,
    tokens within e^NO_WEIGHT of the best; 1 for greedy rows). The C++ kernel serves float32 and
    bfloat16 rows on the CPU once model/kernels.py has loaded it (the engine does); `draw_torch` the rest."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and kernels.loaded():
        return torch.ops.nanoseek.sample_rows(x, temperature, top_k, top_p, min_p, uniform)
    return draw_torch(x, temperature, top_k, top_p, min_p, uniform)


def draw_torch(x, temperature, top_k, top_p, min_p, uniform) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` in torch ops, any device: a float32 copy of the random rows, filtered by `_filter`."""
    R = x.shape[0]
    tokens = torch.zeros(R, dtype=torch.long, device=x.device)
    kept = torch.ones(R, dtype=torch.long, device=x.device)
    greedy = temperature <= 0
    if bool(greedy.any()):
        tokens[greedy] = x[greedy].float().argmax(-1)        # float32: torch's bf16 argmax is ~3x slower on CPU
    rows = (~greedy).nonzero()[:, 0]
    if rows.numel():
        s = x[rows].float() / temperature[rows, None]                        # (S, V)
        _filter(s, top_k[rows], top_p[rows], min_p[rows])
        probs = s.softmax(-1)
        cdf = probs.double().cumsum(-1)                                      # (S, V)
        total = cdf[:, -1:]
        target = torch.minimum(uniform[rows, None] * total, total.nextafter(torch.zeros_like(total)))
        tokens[rows] = torch.searchsorted(cdf, target, right=True)[:, 0]    # first id whose CDF passes it
        kept[rows] = (s - s.amax(-1, keepdim=True) >= NO_WEIGHT).sum(-1)
    return tokens, kept


def process_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """(B, V) -> a new float32 (B, V) whose row i is -inf outside the tokens row i may draw, the
    torch path's processing spelled out. Greedy rows get penalties and the min_tokens ban only;
    random rows also temperature and top-k/top-p/min-p."""
    _prepare(logits, states)
    out = _edited(logits, states)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        temperature, top_k, top_p, min_p = _knobs([states[i].params for i in rows], out.device)
        index = torch.tensor(rows, device=out.device)
        s = out[index] / temperature[:, None]
        _filter(s, top_k, top_p, min_p)
        out[index] = s
    return out


def _prepare(logits: torch.Tensor, states: list[SamplerState]) -> None:
    if logits.dim() != 2 or len(states) != logits.shape[0]:
        raise ValueError(f"{tuple(logits.shape)} logits (want one row per state) but {len(states)} sampler states")
    for state in states:
        state.prepare(logits.shape[1], logits.device)


def _needs_edit(state: SamplerState) -> bool:
    return state.has_penalties or (state.num_generated < state.params.min_tokens and bool(state.min_tokens_banned))


def _edited(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """A float32 copy of logits (B, V) with each row's penalties and min_tokens ban applied."""
    out = logits.to(torch.float32, copy=True)
    _apply_penalties(out, states)
    for i, state in enumerate(states):
        if state.num_generated < state.params.min_tokens and state.min_tokens_banned:
            out[i, state.min_tokens_banned] = float("-inf")
    return out


def _apply_penalties(logits: torch.Tensor, states: list[SamplerState]) -> None:
    """In place on a contiguous float32 (B, V), as vLLM and transformers: repetition divides positive /
    multiplies negative logits of tokens seen in the prompt or output; presence and frequency
    subtract over the output only. Touches only the seen entries of the rows with penalties."""
    rows = [i for i, s in enumerate(states) if s.has_penalties and s.seen_ids]
    if not rows:
        return
    device, V = logits.device, logits.shape[1]
    sizes = torch.tensor([len(states[i].seen_ids) for i in rows], device=device)
    ids = torch.cat([states[i].penalty_ids[:len(states[i].seen_ids)] for i in rows])        # (N,)
    counts = torch.cat([states[i].penalty_counts[:len(states[i].seen_ids)] for i in rows])  # (N,)
    params = [states[i].params for i in rows]

    def each(values):                    # one value per row -> one per seen entry (N,)
        return torch.tensor(values, dtype=torch.float32, device=device).repeat_interleave(sizes)

    flat = torch.tensor(rows, device=device).repeat_interleave(sizes) * V + ids
    repetition = each([p.repetition_penalty for p in params])
    seen = logits.view(-1)[flat]
    seen = torch.where(seen > 0, seen / repetition, seen * repetition)
    seen -= each([p.frequency_penalty for p in params]) * counts + each([p.presence_penalty for p in params]) * (counts > 0)
    logits.view(-1)[flat] = seen


def _filter(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place on temperature-scaled rows s (S, V): keep each row's top-k (ties with the k-th kept,
    as vLLM), then the smallest set of best tokens whose renormalised mass reaches top_p (the best
    one always), then drop tokens less likely than min_p times the best. top_k (S,) int64 (0, -1 or
    >= V: all), top_p (S,) float32 (1: all), min_p (S,) float32 (0: none)."""
    V = s.shape[1]
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)[:, None]                  # (S, 1)
    p = torch.where(top_p < 1, top_p, math.inf)[:, None]                           # rounding must not drop a tail
    picked = ((k < V) | (p < math.inf))[:, 0].nonzero()[:, 0]
    if picked.numel():
        sorted_logits, order = s[picked].sort(dim=-1, descending=True, stable=True)  # (P, V)
        kth = sorted_logits.gather(1, k[picked] - 1)                                 # (P, 1)
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p[picked]                                 # mass before >= top_p
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
        s[picked] = sorted_logits.scatter(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); renormalising changes neither side.
        log_min_p = torch.where(min_p > 0, min_p.double().log(), -math.inf).float()[:, None]
        s.masked_fill_(s < s.max(-1, keepdim=True).values + log_min_p, float("-inf"))


def _uniforms(states: list[SamplerState], generator: torch.Generator | None, device) -> torch.Tensor:
    """(B,) float64 in [0, 1), one per random row (0 for greedy rows): a seeded row's from its own
    generator, so it does not depend on the rest of the batch; the others' from `generator`, in row order."""
    u = torch.zeros(len(states), dtype=torch.float64, device=device)
    shared = [i for i, s in enumerate(states) if not s.params.greedy and s.generator is None]
    seeded = [i for i, s in enumerate(states) if not s.params.greedy and s.generator is not None]
    chunks = []
    if shared:
        where = generator.device if generator is not None else torch.device(device)
        chunks.append(torch.rand(len(shared), dtype=torch.float64, device=where, generator=generator).to(device))
    chunks += [torch.rand(1, dtype=torch.float64, device=device, generator=states[i].generator) for i in seeded]
    if chunks:
        u[torch.tensor(shared + seeded, device=device)] = torch.cat(chunks)
    return u


def _knobs(params: list[SamplingParams], device) -> list[torch.Tensor]:
    """The rows' filter settings as `draw` takes them: temperature (R,) float32 (0 for a greedy row),
    top_k (R,) int64, top_p and min_p (R,) float32, built on the host and moved once."""
    host = (torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
            torch.tensor([p.top_k for p in params], dtype=torch.long),
            torch.tensor([p.top_p for p in params], dtype=torch.float32),
            torch.tensor([p.min_p for p in params], dtype=torch.float32))
    return [t.to(device, non_blocking=True) for t in host]


def _token_logprobs(raw_logprobs: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TokenLogprobs]:
    """raw_logprobs (R, V), each row's chosen token and how many top entries it wants -> TokenLogprobs."""
    chosen = raw_logprobs.gather(1, torch.tensor(tokens, device=raw_logprobs.device)[:, None])  # (R, 1)
    ranks = (raw_logprobs >= chosen).sum(-1).tolist()                                # 1 = the best
    top = raw_logprobs.topk(max(counts), dim=-1)                                      # sorted, best first
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [TokenLogprobs(token, logprob, rank, list(zip(ids[:n], values[:n])))
            for token, logprob, rank, ids, values, n
            in zip(tokens, chosen[:, 0].tolist(), ranks, top_ids, top_values, counts)]
