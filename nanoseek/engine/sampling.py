"""Sampling: vLLM's SamplingParams, per-sequence sampler state, and one batched, seeded `sample` step.

Each engine step turns logits (B, V), one row per sequence that needs a next token, into
token ids. Rows are processed in vLLM's order (V0's; V1 moved min-p before top-k/top-p):

    raw logprobs (if asked) -> repetition / presence / frequency penalties -> min_tokens ban
    -> greedy rows: argmax | random rows: temperature -> top-k -> top-p -> min-p -> draw

The per-row knobs become (B, 1) tensors, so the filters run batched. The draw is the exponential
race (Gumbel-max): token = argmax(p / q) with q ~ Exp(1) per vocab entry. A seeded row draws its
q with its own `torch.Generator`, so a seeded request gives the same tokens whatever else shares
the batch; unseeded rows share the engine's generator.

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

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20    # vLLM's default max_logprobs


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
    rows, then `append` with each row's token. Vocab-sized tensors exist only for rows with
    penalties and are updated in place; they and the generator live on the logits' device,
    made at the first `sample`.
    """

    def __init__(self, params: SamplingParams, prompt_ids=(), vocab_size: int | None = None, *,
                 eos_token_ids=(), index: int = 0):
        self.params, self.vocab_size = params, vocab_size
        self.seed = None if params.seed is None else (params.seed + index) % 2**64
        self.prompt_ids = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        self.output_ids: list[int] = []
        # min_tokens bans EOS and stop_token_ids alike; vLLM adds EOS whatever ignore_eos says.
        self.min_tokens_banned = list(dict.fromkeys([*eos_token_ids, *params.stop_token_ids]))
        self.has_penalties = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                              or params.frequency_penalty != 0.0)
        self.device: torch.device | None = None
        self.generator: torch.Generator | None = None
        self.prompt_mask: torch.Tensor | None = None     # (V,) bool: token is in the prompt
        self.output_counts: torch.Tensor | None = None   # (V,) float32: times generated so far

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    def append(self, token_id: int) -> None:
        """Record the token this sequence just got (after `sample`, before the next step)."""
        self.output_ids.append(token_id)
        if self.output_counts is not None:
            self.output_counts[token_id] += 1

    def prepare(self, vocab_size: int, device: torch.device) -> None:
        """Build the device-side parts once, on the device the logits live on."""
        if self.device == device:
            return
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(f"logits have {vocab_size} columns but the state was made for {self.vocab_size}")
        bad = [i for i in [*self.prompt_ids, *self.min_tokens_banned] if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} lie outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.device = vocab_size, device
        if self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        if self.has_penalties:
            # Plain tensors even under inference_mode, so `append` may update them in either mode.
            with torch.inference_mode(False):
                self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                self.prompt_mask[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
                self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
                self.output_counts.index_add_(0, torch.tensor(self.output_ids, dtype=torch.long, device=device),
                                              torch.ones(len(self.output_ids), device=device))


@torch.no_grad()
def sample(logits: torch.Tensor, states: list[SamplerState], generator: torch.Generator | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row of logits (B, V), any float dtype (processing runs on a float32 copy); row i
    follows states[i]. Returns the B token ids and, per row, its TokenLogprobs (None where
    params.logprobs is None). Does not touch `logits` or the states' counts: call
    `state.append(token)` afterwards. `generator` serves unseeded rows (None = torch's default generator)."""
    B, V = logits.shape
    wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    raw_logprobs = logits[wanted].float().log_softmax(-1) if wanted else None   # (R, V), before any processing
    processed = process_logits(logits, states)
    random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if len(random_rows) < B:
        token_ids = processed.argmax(-1)                               # (B,) right for greedy rows
    if random_rows:
        noise = _exponential_noise([states[i] for i in random_rows], V, logits.device, generator)  # (R, V)
        # argmax(p / q) = argmax(logit - log q): Gumbel-max, no softmax needed; -inf entries stay out.
        if len(random_rows) == B:
            token_ids = (processed - noise.log_()).argmax(-1)
        else:
            rows = torch.tensor(random_rows, device=logits.device)
            token_ids[rows] = (processed[rows] - noise.log_()).argmax(-1)
    tokens = token_ids.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * B
    if wanted:
        counts = [states[i].params.logprobs for i in wanted]
        entries = _token_logprobs(raw_logprobs, [tokens[i] for i in wanted], counts)
        for i, entry in zip(wanted, entries):
            logprobs[i] = entry
    return tokens, logprobs


def process_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """(B, V) -> a new (B, V) whose row i is -inf outside the tokens row i may draw. Greedy rows get
    penalties and the min_tokens ban only; random rows also temperature and top-k/top-p/min-p."""
    if len(states) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(states)} sampler states")
    for state in states:
        state.prepare(logits.shape[1], logits.device)
    out = logits.to(torch.float32, copy=True)
    _apply_penalties(out, states)
    for i, state in enumerate(states):
        if state.num_generated < state.params.min_tokens and state.min_tokens_banned:
            out[i, state.min_tokens_banned] = float("-inf")
    random = [not s.params.greedy for s in states]
    if not any(random):
        return out
    out.div_(_per_row([s.params.temperature if r else 1.0 for s, r in zip(states, random)], out.device))
    _apply_top_k_top_p(out, [s.params for s, r in zip(states, random) if r], [i for i, r in enumerate(random) if r])
    min_p = [s.params.min_p if r else 0.0 for s, r in zip(states, random)]
    if any(min_p):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); renormalising changes neither side.
        log_min_p = [math.log(m) if m > 0 else -math.inf for m in min_p]
        floor = out.max(-1, keepdim=True).values + _per_row(log_min_p, out.device)
        out.masked_fill_(out < floor, float("-inf"))
    return out


def _apply_penalties(logits: torch.Tensor, states: list[SamplerState]) -> None:
    """In place, as vLLM and transformers: repetition divides positive / multiplies negative logits of
    tokens seen in the prompt or output; presence and frequency subtract over the output only."""
    rows = [i for i, s in enumerate(states) if s.has_penalties]
    if not rows:
        return
    counts = torch.stack([states[i].output_counts for i in rows])                 # (P, V)
    generated = counts > 0                                                        # (P, V)
    seen = generated | torch.stack([states[i].prompt_mask for i in rows])         # (P, V)
    params = [states[i].params for i in rows]
    repetition = _per_row([p.repetition_penalty for p in params], logits.device)
    frequency = _per_row([p.frequency_penalty for p in params], logits.device)
    presence = _per_row([p.presence_penalty for p in params], logits.device)
    index = torch.tensor(rows, device=logits.device)
    sub = logits[index]                                                           # (P, V)
    sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub -= frequency * counts + presence * generated
    logits[index] = sub


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    """In place on logits[rows]: keep each row's top-k (ties with the k-th kept, as vLLM), then the
    smallest set of best tokens whose renormalised mass reaches top_p (the best one always)."""
    V = logits.shape[1]
    keep_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    keep_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]  # rounding must not drop a tail
    picked = [j for j, (k, p) in enumerate(zip(keep_k, keep_p)) if k < V or p != math.inf]
    if not picked:
        return
    device = logits.device
    index = torch.tensor([rows[j] for j in picked], device=device)
    sorted_logits, order = logits[index].sort(dim=-1, descending=True, stable=True)  # (S, V)
    k = torch.tensor([keep_k[j] for j in picked], device=device)[:, None]          # (S, 1)
    kth = sorted_logits.gather(1, k - 1)                                             # (S, 1)
    sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs                                           # (S, V)
    drop = mass_before >= _per_row([keep_p[j] for j in picked], device)
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    logits[index] = sorted_logits.scatter(1, order, sorted_logits)


def _exponential_noise(states: list[SamplerState], V: int, device, generator) -> torch.Tensor:
    """(R, V) Exp(1) noise: a seeded row from its own generator (batch-independent), the others from
    `generator` on its device. Clamped above 0 so log(q) is finite."""
    noise = torch.empty(len(states), V, device=device)
    shared = [j for j, s in enumerate(states) if s.generator is None]
    where = generator.device if generator is not None else torch.device(device)
    if len(shared) == len(states) and where == noise.device:
        noise.exponential_(generator=generator)          # the common case: one draw, no copies
    elif shared:
        draw = torch.empty(len(shared), V, device=where).exponential_(generator=generator)
        noise[torch.tensor(shared, device=device)] = draw.to(device)
    for j, state in enumerate(states):
        if state.generator is not None:
            noise[j].exponential_(generator=state.generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _per_row(values: list[float], device) -> torch.Tensor:
    """One float per row as a (B, 1) column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _token_logprobs(raw_logprobs: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TokenLogprobs]:
    """raw_logprobs (R, V), each row's chosen token and how many top entries it wants -> TokenLogprobs."""
    chosen = raw_logprobs.gather(1, torch.tensor(tokens, device=raw_logprobs.device)[:, None])  # (R, 1)
    ranks = (raw_logprobs >= chosen).sum(-1).tolist()                                # 1 = the best
    top = raw_logprobs.topk(max(counts), dim=-1)                                      # sorted, best first
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [TokenLogprobs(token, logprob, rank, list(zip(ids[:n], values[:n])))
            for token, logprob, rank, ids, values, n
            in zip(tokens, chosen[:, 0].tolist(), ranks, top_ids, top_values, counts)]
