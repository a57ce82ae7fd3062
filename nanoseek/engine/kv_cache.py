"""Paged KV cache: a fixed pool of blocks, per-sequence block tables, and prefix caching.

Memory is one tensor per (layer, cache entry) of `num_blocks * block_size` token slots, allocated
once (no per-step reallocation). What a slot holds comes from the model (model/cache.py): k and v
for GQA, or MLA's absorbed latent — kv_lora_rank + qk_rope_head_dim values per token per layer.

Prefix caching (DeepSeek's context cache, vLLM's automatic prefix caching): a *full* block is
hashed with its token ids and its parent block's hash, so equal prefixes map to equal blocks.
Finished sequences release their blocks, but a hashed block keeps its contents until the pool
must reuse it (least recently freed first), so a later request with the same prefix skips that
prefill. `reset_prefix_cache()` forgets all hashes (weights changed, e.g. after a GRPO step).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..model.cache import cache_entry_shapes
from ..model.config import ModelConfig


def block_hashes(token_ids: list[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of token_ids: h_i = hash((h_{i-1}, block_i tokens)).
    `parent` continues a chain: the hash of the block just before token_ids[0]."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        n_layers = cfg.n_layers + cfg.n_mtp_layers
        slots = num_blocks * block_size
        self.tensors = [[torch.zeros(slots, *shape, dtype=dtype, device=device) for shape in cache_entry_shapes(cfg)]
                        for _ in range(n_layers)]
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                      # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # LRU order

    @property
    def num_free(self) -> int:
        return len(self.free)

    def bytes_per_token(self) -> int:
        return sum(t.element_size() * t[0].numel() for layer in self.tensors for t in layer)

    def allocate(self) -> int:
        """A fresh block (ref count 1); evicts the least recently freed cached block if it must."""
        if not self.free:
            raise RuntimeError("KV cache pool is out of blocks")
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def lookup(self, h: int) -> int | None:
        """The cached block with hash h, retained for the caller, or None."""
        block = self.cached.get(h)
        if block is not None:
            self.retain(block)
        return block

    def retain(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None          # most recently freed: evicted last

    def register(self, block: int, h: int) -> None:
        """Mark a block that became full as reusable under hash h (first writer wins)."""
        if self.block_hash[block] is None and h not in self.cached:
            self.block_hash[block] = h
            self.cached[h] = block

    def reset_prefix_cache(self) -> None:
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks


class PagedCache:
    """The model's `cache` argument for one forward over rows of (possibly) different sequences.

    slots (B, T): where each new token's entries go; block_tables (B, max_blocks): each row's blocks.
    A query at position p sees its row's tokens 0..p, gathered block by block from the pool.
    """

    def __init__(self, pool: BlockPool, slots: torch.Tensor, block_tables: torch.Tensor, seq_len: int):
        self.pool, self.slots = pool, slots.flatten()
        bs = pool.block_size
        offsets = torch.arange(bs, device=block_tables.device)
        # (B, S): pool slot of every visible key position, shared by all layers of this forward
        self.gather = (block_tables.unsqueeze(-1) * bs + offsets).flatten(1)[:, :seq_len]

    @classmethod
    def for_rows(cls, pool: BlockPool, block_tables: list[list[int]], positions: torch.Tensor) -> "PagedCache":
        """New tokens at positions (B, T) of rows whose blocks are block_tables: each goes to its slot."""
        bs, width = pool.block_size, max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=positions.device)  # (B, W)
        slots = tables.gather(1, positions // bs) * bs + positions % bs                                  # (B, T)
        return cls(pool, slots, tables, int(positions.max()) + 1)

    def update(self, layer_id: int, positions: torch.Tensor, *entries: torch.Tensor):
        out = []
        for buf, entry in zip(self.pool.tensors[layer_id], entries):
            buf.index_copy_(0, self.slots, entry.flatten(0, 1).to(buf.dtype))
            out.append(buf[self.gather])                                   # (B, S, ...)
        S = self.gather.shape[1]
        mask = torch.arange(S, device=positions.device).view(1, 1, S) <= positions.unsqueeze(-1)
        return (*out, mask)
