"""The cache argument of the model: what attention layers store per token, and the simplest store.

The model hands each block its own layer of the cache, `cache.layer(i)` (MTP depth k gets layer
n_layers + k - 1). An attention layer computes its per-token cache entries and hands them to
`layer_cache.update(positions, *entries)`; it writes them at the given positions and returns every
entry the queries may see, heads-major as (heads, B, S, width), plus a boolean mask (B, T, S). A
layer's cache holds that layer's tensors, not a layer number, so a block's code is the same for
every layer (the engine compiles one graph for them all). Heads-major
is how the engine's caches store keys, so attention's batched matmuls read them without a copy.
What a layer stores:

- GQA (Llama, Qwen2): ONE tensor [k; v] along heads, (B, T, 2 * n_kv_heads, head_dim): one write and
  one gather per layer instead of two.
- MLA (DeepSeek): ONE tensor (B, T, kv_lora_rank + qk_rope_head_dim) = [kv_norm(c_kv); RoPE(k_pe)],
  the absorbed form of DeepSeek-V2 §2.1 — 576 values per token per layer for V3, whatever the
  head count (FlashMLA stores exactly this as a 576-dim key whose first 512 dims are the value).

`DenseCache` keeps each row contiguous in preallocated buffers: it is what `generate`-style loops
and the tests use. The engine's paged cache (engine/kv_cache.py) implements the same `update`.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def cache_entry_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of the tensors one attention layer caches."""
    if cfg.is_mla:
        return [(cfg.kv_lora_rank + cfg.qk_rope_head_dim,)]
    return [(2 * cfg.n_kv_heads, cfg.head_dim)]


class DenseCache:
    """Contiguous per-row cache: buffers (B, max_len, *entry) for each attention layer (MTP included).

    Rows may hold different lengths: a query at position p sees keys at positions 0..p of its row.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        n_layers = cfg.n_layers + cfg.n_mtp_layers
        self.max_len = max_len
        self.buffers = [[torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device)
                         for shape in cache_entry_shapes(cfg)] for _ in range(n_layers)]

    def layer(self, i: int) -> _DenseLayer:
        return _DenseLayer(self.buffers[i], self.max_len)

    def nbytes_per_token(self) -> int:
        return sum(b.element_size() * b[0, 0].numel() for layer in self.buffers for b in layer)


class _DenseLayer:
    """One layer of a DenseCache: its buffers (B, max_len, *entry)."""

    def __init__(self, buffers: list[torch.Tensor], max_len: int):
        self.buffers, self.max_len = buffers, max_len

    def update(self, positions: torch.Tensor, *entries: torch.Tensor):
        """Write entries (B, T, ...) at positions (B, T); return the entries of positions < S, each
        (heads, B, S, width) (heads = 1 for a one-dimensional entry), and mask (B, T, S)."""
        B, T = positions.shape
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache length {self.max_len}")
        rows = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, T)
        S = int(positions.max()) + 1
        out = []
        for buf, entry in zip(self.buffers, entries):
            buf[rows, positions] = entry.to(buf.dtype)
            seen = buf[:B, :S]
            out.append(seen.permute(2, 0, 1, 3) if seen.dim() == 4 else seen.unsqueeze(0))
        keys = torch.arange(S, device=positions.device)
        mask = keys.view(1, 1, S) <= positions.unsqueeze(-1)          # (B, T, S)
        return (*out, mask)


class PackedCache:
    """The cache argument for one forward over packed sequences that see each other by a mask.

    It stores nothing: `update` hands the forward's own entries back with `mask` (B, T, T), so
    attention runs over the same tokens as without a cache, restricted to what `mask` allows.
    GRPO packs a prompt once with its G completions after it, each completion seeing the prompt
    and itself only (train/rollout.py): every weight is then read once per micro-batch for P + G·L
    tokens, where G separate rows would cost G·(P + L). Autograd runs through it (nothing in place).
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def layer(self, i: int) -> PackedCache:
        return self                              # it stores nothing: every layer's is the same

    def update(self, positions: torch.Tensor, *entries: torch.Tensor):
        """entries (B, T, ...) -> the same entries heads-major (heads, B, T, width) and the mask (B, T, T)."""
        if self.mask.shape != (*positions.shape, positions.shape[1]):
            raise ValueError(f"PackedCache: mask {tuple(self.mask.shape)} does not fit tokens {tuple(positions.shape)}")
        return (*[e.permute(2, 0, 1, 3) if e.dim() == 4 else e.unsqueeze(0) for e in entries], self.mask)


def segment_mask(positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Who sees whom in a packed row (B, T): token i sees token j when j's position is not after i's
    and j is in segment 0 (the shared prefix) or in i's own segment. -> mask (B, T, T)."""
    seg_q, seg_k = segments.unsqueeze(-1), segments.unsqueeze(-2)
    return (positions.unsqueeze(-2) <= positions.unsqueeze(-1)) & ((seg_k == 0) | (seg_k == seg_q))
