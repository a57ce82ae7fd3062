"""A single-sequence generation loop over the model's cache argument, streaming token ids.

This is the simplest correct decoder: prefill the prompt into a `DenseCache`, then one token per
forward. It serves the CLI and the demo; batched serving (paged cache, continuous batching) is the
engine's job. Sampling: temperature 0 is greedy; otherwise top-k, then top-p over the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model import DenseCache, Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits (vocab,)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:   # keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids: set[int] | None = None,
                 seed: int | None = None) -> Iterator[int]:
    """Yield up to max_tokens new ids; stops after (and without yielding) a stop id."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    device = model.embed.weight.device
    cache = DenseCache(model.cfg, 1, len(prompt_ids) + max_tokens, dtype=model.embed.weight.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    for step in range(max_tokens):
        logits = model(ids, positions, cache)[0, -1]
        token = sample(logits, temperature, top_p, top_k, generator)
        if stop_ids and token in stop_ids:
            return
        yield token
        ids = torch.tensor([[token]], device=device)
        positions = positions[:, -1:] + 1
