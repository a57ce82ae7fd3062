"""Cost accounting for the report card: FLOPs, dollars, energy, $/accuracy point, served $/1M tokens.

Every function is plain arithmetic on numbers a run measured (tokens, seconds, tokens/s) and prices
the caller states (the machine's $/hour, its watts, the $/kWh): nothing here reads a clock, a file
or a model, so the report can show its sums and tests can check them by hand.

    train = training_flops(model.flops_per_token(seq_len, training=True), tokens_seen)
    gen = rollout_flops(model.num_params(active=True, embedding=False), generated_tokens)
    usd = wall_dollars(seconds, usd_per_hour=0.10)
    kwh = energy_kwh(seconds, watts=65.0); energy_dollars(kwh, usd_per_kwh=0.30)
    dollars_per_point(usd, accuracy_before=0.12, accuracy_after=0.31)    # accuracies in [0, 1]
    served_usd_per_million(tokens_per_s=700.0, usd_per_hour=0.10)
    LIST_PRICES["deepseek-reasoner"].output                              # $2.19 per 1M tokens

Left out on purpose: the report card's markdown and plots (they come with `nanoseek speedrun`),
carbon intensity, amortised hardware purchase, and prices after the R1 launch (DeepSeek and
OpenAI have changed theirs since; the table is dated).

FLOP accounting follows Kaplan et al. / PaLM: a matmul of an N-parameter model costs 2·N FLOPs per
token forward and 6·N forward + backward; `Transformer.flops_per_token` adds the attention
scores and values at the mean causal length and already holds the ×3 for training.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

SECONDS_PER_HOUR = 3600.0
JOULES_PER_KWH = 3.6e6


def training_flops(flops_per_token: float, tokens: int) -> float:
    """FLOPs of a training run: `model.flops_per_token(seq_len, training=True)` × tokens trained on.

    Example: DeepSeek-V3 as 6·N_active alone, 6 × 37e9 × 14.8e12 tokens = 3.29e24 FLOPs.
    """
    _check_non_negative(flops_per_token=flops_per_token, tokens=tokens)
    return float(flops_per_token) * tokens


def rollout_flops(active_params: int, generated_tokens: int, prompt_tokens: int = 0) -> float:
    """FLOPs of sampling (GRPO rollouts, rejection sampling, evaluation): 2·N_active per token.

    Each generated token is one forward pass of the active (non-embedding) weights; prompt tokens
    cost the same in prefill when they are not already cached. Attention over the context is left
    out (small next to 2·N at these lengths; `flops_per_token(seq_len, training=False)` has it).
    Example: 1M params, 1,000 generated + 500 prompt tokens -> 2 × 1e6 × 1,500 = 3e9.
    """
    _check_non_negative(active_params=active_params, generated_tokens=generated_tokens, prompt_tokens=prompt_tokens)
    return 2.0 * active_params * (generated_tokens + prompt_tokens)


def wall_dollars(seconds: float, usd_per_hour: float) -> float:
    """What `seconds` of this machine cost at a stated rental price.

    Example: DeepSeek-V3's 2.788M H800 GPU-hours at $2/GPU-hour = $5.576M (V3 report, Table 1).
    """
    _check_non_negative(seconds=seconds, usd_per_hour=usd_per_hour)
    return seconds / SECONDS_PER_HOUR * usd_per_hour


def energy_kwh(seconds: float, watts: float) -> float:
    """Energy at a stated average power draw: watts × hours / 1000. 65 W for 20 min = 0.02167 kWh."""
    _check_non_negative(seconds=seconds, watts=watts)
    return watts * seconds / JOULES_PER_KWH


def energy_dollars(kwh: float, usd_per_kwh: float) -> float:
    """The electricity bill of `kwh` at a stated tariff."""
    _check_non_negative(kwh=kwh, usd_per_kwh=usd_per_kwh)
    return kwh * usd_per_kwh


def dollars_per_point(dollars: float, accuracy_before: float, accuracy_after: float) -> float | None:
    """Dollars per percentage point of accuracy gained; accuracies are fractions in [0, 1].

    None when nothing was gained (a price per point lost means nothing).
    Example: $0.05 moving pass@1 from 0.12 to 0.31 -> $0.05 / 19 points = $0.00263 per point.
    """
    for name, value in (("accuracy_before", accuracy_before), ("accuracy_after", accuracy_after)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    _check_non_negative(dollars=dollars)
    points = (accuracy_after - accuracy_before) * 100.0
    return dollars / points if points > 0 else None


def served_usd_per_million(tokens_per_s: float, usd_per_hour: float) -> float:
    """$ per 1M tokens served on hardware rented at `usd_per_hour` that sustains `tokens_per_s`.

    Example (DeepSeek's own, open-infra day 6): an H800 node (8 GPUs × $2/h = $16/h) decoding
    14.8K output tokens/s -> 16 / (14,800 × 3600) × 1e6 = $0.300 per 1M output tokens.
    """
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be positive, got {tokens_per_s!r}")
    _check_non_negative(usd_per_hour=usd_per_hour)
    return usd_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * 1e6


class ListPrice(NamedTuple):
    """A public API price, USD per 1M tokens."""
    input_cache_hit: float
    input_cache_miss: float
    output: float                # reasoning (CoT) tokens bill as output
    note: str


PRICES_AS_OF = "2025-01/02, at the DeepSeek-R1 launch"
PRICES_SOURCE = ("DeepSeek API docs (pricing-details-usd, copies dated 2025-02); OpenAI o1 via its pricing page "
                 "mirrors; see docs deepseek-facts.md §7")
LIST_PRICES = {
    "deepseek-reasoner": ListPrice(0.14, 0.55, 2.19, "DeepSeek-R1, 64K context, 32K CoT"),
    "deepseek-chat": ListPrice(0.07, 0.27, 1.10, "DeepSeek-V3, standard price (after the launch promotion)"),
    "openai-o1": ListPrice(7.50, 15.00, 60.00, "OpenAI o1, cached input at $7.50"),
}
# DeepSeek's own serving cost (open-infra day 6, 2025-02-27/28): decode at 14.8K output tokens/s
# per H800 node of 8 GPUs at the $2/GPU-hour the V3 report assumes.
DEEPSEEK_DECODE_TOKENS_PER_S_PER_NODE = 14_800
DEEPSEEK_NODE_USD_PER_HOUR = 8 * 2.0


def price_table(served: float | None = None, label: str = "this run, served here") -> list[tuple[str, float | None, float]]:
    """Rows (name, input $/1M at a cache miss, output $/1M) for the report: the list prices, DeepSeek's
    own decode cost, and `served` ($/1M, from `served_usd_per_million`) for this machine when given.

    This machine's row uses one number for input and output: a measured rate of generated tokens
    (prefill is far cheaper per token, so it over-states the input price).
    """
    rows = [(name, p.input_cache_miss, p.output) for name, p in LIST_PRICES.items()]
    own = served_usd_per_million(DEEPSEEK_DECODE_TOKENS_PER_S_PER_NODE, DEEPSEEK_NODE_USD_PER_HOUR)
    rows.append(("deepseek serving cost (day 6, decode)", None, own))     # decode only: no input price
    if served is not None:
        rows.append((label, served, served))
    return rows


def _check_non_negative(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:   # NaN fails too
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
