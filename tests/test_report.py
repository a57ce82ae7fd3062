"""Cost arithmetic of the report card against hand-computed cases."""

import math

import pytest

from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama
from nanoseek.report import (LIST_PRICES, dollars_per_point, energy_dollars, energy_kwh, price_table,
                             rollout_flops, served_usd_per_million, training_flops, wall_dollars)


def test_training_flops_from_flops_per_token_of_a_real_model():
    # tiny_llama: 2 layers, dim 64, 4 heads of 16, 2 KV heads, inter 128, vocab 256, tied embeddings.
    # Per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 = 12,288; MLP 3·64·128 = 24,576; 2 norms 128.
    # Non-embedding params: 2 × 36,992 + final norm 64 = 74,048; the tied head still runs: + 256·64.
    # Forward per token: 2 × 90,432 + attention 2 layers × 2 × 4 heads × (16 + 16) × T/2 (T = 32: 8,192)
    # = 189,056; training × 3 = 567,168 FLOPs per token.
    model = Transformer(tiny_llama())
    assert model.flops_per_token(32, training=True) == 567_168
    assert training_flops(model.flops_per_token(32, training=True), 1000) == 567_168_000
    assert training_flops(6 * 37e9, 14.8e12) == pytest.approx(3.2856e24)   # DeepSeek-V3, 6·N·D only


def test_rollout_flops_are_two_per_active_parameter_per_token():
    assert rollout_flops(1_000_000, 1000) == 2e9
    assert rollout_flops(1_000_000, 1000, prompt_tokens=500) == 3e9
    # a MoE counts only its active parameters: V3's 37B active, 1M output tokens -> 7.4e16
    assert rollout_flops(37_000_000_000, 1_000_000) == pytest.approx(7.4e16)


def test_wall_dollars_and_energy():
    assert wall_dollars(2.788e6 * 3600, 2.0) == pytest.approx(5.576e6)     # V3 report Table 1
    assert wall_dollars(1200, 0.10) == pytest.approx(0.10 / 3)             # 20 minutes at $0.10/h
    kwh = energy_kwh(1200, 65.0)                                          # 65 W × 1/3 h = 21.667 Wh
    assert kwh == pytest.approx(65 / 3 / 1000)
    assert energy_dollars(kwh, 0.30) == pytest.approx(0.0065)
    assert energy_kwh(3600, 1000) == 1.0


def test_dollars_per_accuracy_point():
    assert dollars_per_point(0.05, 0.12, 0.31) == pytest.approx(0.05 / 19)
    assert dollars_per_point(1.0, 0.0, 1.0) == pytest.approx(0.01)
    assert dollars_per_point(1.0, 0.5, 0.5) is None                      # nothing gained: no price
    assert dollars_per_point(1.0, 0.6, 0.4) is None
    with pytest.raises(ValueError, match="accuracy_after"):
        dollars_per_point(1.0, 0.1, 31.0)                                 # a percentage, not a fraction


def test_served_price_per_million_tokens():
    # DeepSeek's day-6 decode: $16 per node-hour over 14,800 tok/s = $0.3003 per 1M output tokens
    assert served_usd_per_million(14_800, 16.0) == pytest.approx(16 / (14_800 * 3600) * 1e6)
    assert served_usd_per_million(14_800, 16.0) == pytest.approx(0.3003, abs=1e-4)
    # 700 tok/s on a $0.10/h VM: 2.52M tokens an hour -> $0.0397 per 1M
    assert served_usd_per_million(700, 0.10) == pytest.approx(0.10 / 2.52)
    with pytest.raises(ValueError, match="tokens_per_s"):
        served_usd_per_million(0, 0.10)


def test_list_prices_and_table():
    r1, o1 = LIST_PRICES["deepseek-reasoner"], LIST_PRICES["openai-o1"]
    assert (r1.input_cache_hit, r1.input_cache_miss, r1.output) == (0.14, 0.55, 2.19)
    assert o1.output / r1.output == pytest.approx(27.4, abs=0.05)         # "~27x cheaper"
    rows = price_table(served=0.04)
    names = [name for name, _, _ in rows]
    assert names[:3] == ["deepseek-reasoner", "deepseek-chat", "openai-o1"] and len(rows) == 5
    assert rows[3][1] is None and rows[3][2] == pytest.approx(0.3003, abs=1e-4)
    assert rows[-1][1:] == (0.04, 0.04)
    assert len(price_table()) == 4


@pytest.mark.parametrize("bad", [-1, math.nan, "3", True])
def test_bad_inputs_name_the_argument(bad):
    with pytest.raises(ValueError, match="seconds"):
        wall_dollars(bad, 1.0)
