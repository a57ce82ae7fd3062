"""Paged KV cache: a fixed pool of blocks, per-sequence block tables, and prefix caching.

Memory is one tensor per (layer, cache entry) of `num_blocks * block_size` token slots, allocated
once (no per-step reallocation). What a slot holds comes from the model (model/cache.py): k and v
for GQA, or MLA's absorbed latent — kv_lora_rank + qk_rope_head_dim values per token per layer.
Each tensor is heads-major, (heads, num_blocks, block_size, width) (heads = 1 for MLA's latent):
gathering a batch's blocks then yields (heads, B, S, width), where one batched matmul per layer
serves every (kv head, row) pair with no further copy; blocks are gathered whole with
`index_select`, which measured ~7x faster than indexing slot by slot (B = 32, 200 keys, bf16).
All four sizes are static for torch.compile (`_static`), so code inside a compiled forward reads
the block size from the tensor's shape: the `block_size` attribute would be a symbolic int there,
and integer division by it in every gathered element's index.

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
        self.entry_shapes = cache_entry_shapes(cfg)
        self.tensors = [[_static(torch.zeros(_heads(shape), num_blocks, block_size, shape[-1], dtype=dtype,
                                             device=device), 0, 1, 2, 3)
                         for shape in self.entry_shapes] for _ in range(n_layers)]
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                      # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # LRU order

    @property
    def num_free(self) -> int:
        return len(self.free)

    def bytes_per_token(self) -> int:
        return sum(t.element_size() * t.shape[0] * t.shape[3] for layer in self.tensors for t in layer)

    def read(self, layer_id: int, entry: int, slots: torch.Tensor) -> torch.Tensor:
        """What the given slots (N,) hold for one of a layer's entries: (N, *entry shape)."""
        buf = _slots(self.tensors[layer_id][entry])
        return buf[:, slots].transpose(0, 1).reshape(len(slots), *self.entry_shapes[entry])

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

    slots (B, T): where each new token's entries go; block_tables (B, W): each row's blocks;
    positions (B, T): the new tokens' positions. A query at position p sees its row's tokens 0..p.
    """

    def __init__(self, pool: BlockPool, slots: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor):
        self.pool, self.slots = pool, slots.flatten()
        # every row sees its W whole blocks (S = W * block_size keys, the mask hides the unwritten
        # and padding slots): the gathered memory stays one contiguous (heads, B, S, width) tensor,
        # which bmm takes as is; a narrower slice would make it copy
        S = block_tables.shape[1] * pool.block_size
        keys = torch.arange(S, device=positions.device)
        self.mask = keys.view(1, 1, S) <= positions.unsqueeze(-1)          # (B, T, S), shared by all layers
        self.block_rows = block_rows(pool, block_tables)

    @classmethod
    def for_rows(cls, pool: BlockPool, block_tables: list[list[int]], positions: torch.Tensor,
                 min_blocks: int = 1) -> PagedCache:
        """New tokens at positions (B, T) of rows whose blocks are block_tables: each goes to its slot.
        Every row sees at least `min_blocks` blocks (padding: block 0, masked)."""
        bs, tables = pool.block_size, padded_tables(block_tables, positions.device, min_blocks)     # (B, W)
        slots = tables.gather(1, positions // bs) * bs + positions % bs                                  # (B, T)
        return cls(pool, slots, tables, positions)

    def layer(self, i: int) -> _PagedLayer:
        return _PagedLayer(self, self.pool.tensors[i])


class _PagedLayer:
    """One layer of a PagedCache: that layer's pool tensors, and the forward's slots, blocks and mask."""

    def __init__(self, cache: PagedCache, tensors: list[torch.Tensor]):
        self.tensors, self.slots, self.block_rows, self.mask = tensors, cache.slots, cache.block_rows, cache.mask

    def update(self, positions: torch.Tensor, *entries: torch.Tensor):
        """Write entries (B, T, *shape); return each as (heads, B, S, width), and the mask (B, T, S)."""
        out = []
        for buf, entry in zip(self.tensors, entries):
            heads, width = buf.shape[0], buf.shape[3]
            new = entry.reshape(-1, heads, width).transpose(0, 1)                # (heads, B*T, width)
            _slots(buf).index_copy_(1, self.slots, new.to(buf.dtype))
            out.append(gather_blocks(buf, self.block_rows[heads]))
        return (*out, self.mask)


def padded_tables(block_tables: list[list[int]], device, min_width: int = 1) -> torch.Tensor:
    """Block tables of different lengths as one (B, W >= min_width) tensor, padded with block 0 (masked keys)."""
    width = max(min_width, *(len(t) for t in block_tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=device)


def block_rows(pool: BlockPool, block_tables: torch.Tensor) -> dict[int, torch.Tensor]:
    """Rows h * num_blocks + block of a pool tensor viewed as (heads * num_blocks, block_size * width),
    for every head and every block of every row of block_tables (B, W): {heads: (heads, B, W)} for
    each head count the pool's entries have."""
    return {heads: torch.arange(heads, device=block_tables.device).view(-1, 1, 1) * pool.num_blocks + block_tables
            for heads in {_heads(shape) for shape in pool.entry_shapes}}


def _static(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark dims of a cache tensor fixed for torch.compile (no effect in eager).

    The compiled forward is traced with dynamic shapes, and dynamo gives equal dynamic sizes one
    symbol ("duck sizing"): a decode mirror of capacity 64 traced beside SmolLM2's 64-wide heads
    made capacity the constant 64, so every rebuild to another capacity recompiled (~40 s each)
    until dynamo's recompile limit left the forward eager at 1.6 tok/s. Head counts, entry widths
    and the pool's slot count never change, so they are static and only batch size, capacity and
    block counts stay symbolic.
    """
    for d in dims:
        torch._dynamo.mark_static(t, d)
    return t


def gather_blocks(buf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Blocks of a pool tensor (heads, num_blocks, block_size, width) at block_rows' index
    (heads, B, W): one contiguous (heads, B, W * block_size, width) tensor.

    One index_select of whole blocks along dim 0 (along dim 1 it measured ~5x slower). The result
    is reinterpreted with as_strided, not view: compiled, inductor's view of a gathered buffer with
    symbolic sizes kept floor divisions and modulos it could not simplify, and it copied k and v
    element by element (~0.3 s of a 2,900-token prefill).
    """
    heads, _, bs, width = buf.shape
    _, B, W = index.shape
    rows = buf.view(-1, bs * width).index_select(0, index.flatten())
    S = W * bs
    return rows.as_strided((heads, B, S, width), (B * S * width, S * width, width, 1))


def _slots(buf: torch.Tensor) -> torch.Tensor:
    """A pool tensor (heads, num_blocks, block_size, width) as (heads, slots, width)."""
    return buf.view(buf.shape[0], -1, buf.shape[3])


def _heads(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 2 else 1


class DecodeMirror:
    """The decode batch's cache entries kept contiguous from step to step, beside the pool.

    A PagedCache gathers every row's blocks afresh in every layer of every step: at 32 rows of
    256 keys that copy is 10 ms of a 67 ms step (SmolLM2, bf16). From one step of a decode batch
    to the next only one token per row is new, so the mirror keeps the gathered copy, and the
    step writes its new entries into both pool and mirror. It is rebuilt with one gather when
    the batch changes: other rows or another order, a row that advanced other than by a
    mirrored decode (prefill, speculative verify, recompute), a row past the capacity. The
    cost is memory: the batch's entries a second time, B x capacity tokens (main layers only;
    MTP layers go through the pool). A lone row's copy is float32 (FLOAT32_ROWS), so for a
    bfloat16 model its attention differs from a batched row's by bf16 rounding.
    """

    HEADROOM = 64              # tokens of growth per row before a rebuild (~30 ms at 32 rows of SmolLM2); the
                               # C++ decode attention skips the unwritten keys, the torch path attends them
    FLOAT32_ROWS = 1           # batches this small keep float32 copies: bf16 bmm costs ~25 us a call on CPU
                               # whatever its size, float32 ~2x less at 1 row (attention then runs in float32)

    def __init__(self, pool: BlockPool, n_layers: int):
        self.pool, self.n_layers = pool, n_layers
        self.seqs: list = []
        self.lengths: list[int] = []       # tokens each row holds once the last mirrored step ran
        self.tensors: list[list[torch.Tensor]] = []
        self.capacity = 0

    def cache(self, seqs: list, positions: torch.Tensor) -> MirroredCache:
        """The cache argument for one decode token per row of seqs (positions (B, 1))."""
        computed = [s.num_computed for s in seqs]
        need = max(computed) + 1
        if not (len(seqs) == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs))
                and computed == self.lengths and need <= self.capacity):
            self._rebuild(seqs, need)
        self.lengths = [c + 1 for c in computed]
        return MirroredCache(self, positions, [s.block_table for s in seqs])

    def clear(self) -> None:
        """Drop the copy (no decode batch now): its memory goes back, the next decode rebuilds it."""
        self.seqs, self.lengths, self.tensors, self.capacity = [], [], [], 0

    def _rebuild(self, seqs: list, need: int) -> None:
        bs = self.pool.block_size
        width = max(len(s.block_table) for s in seqs) * bs
        capacity = max(-(-(need + self.HEADROOM) // bs) * bs, width)
        dtype = torch.float32 if len(seqs) <= self.FLOAT32_ROWS else self.pool.tensors[0][0].dtype
        if len(seqs) != len(self.seqs) or capacity > self.capacity or dtype != self.tensors[0][0].dtype:
            # zeros, not empty: masked keys get probability 0, but 0 * NaN garbage in a value would be NaN
            self.tensors = [[_static(torch.zeros(buf.shape[0], len(seqs), capacity, buf.shape[3], dtype=dtype,
                                                 device=buf.device), 0, 3)
                             for buf in layer] for layer in self.pool.tensors[:self.n_layers]]
            self.capacity = capacity
        index = block_rows(self.pool, padded_tables([s.block_table for s in seqs], self.pool.tensors[0][0].device))
        for layer, mirrors in zip(self.pool.tensors, self.tensors):
            for buf, mirror in zip(layer, mirrors):
                mirror[:, :, :width].copy_(gather_blocks(buf, index[buf.shape[0]]))
        self.seqs = list(seqs)


class MirroredCache:
    """The model's cache argument for a mirrored decode step: writes go to pool and mirror, reads
    come from the mirror (no gather)."""

    def __init__(self, mirror: DecodeMirror, positions: torch.Tensor, block_tables: list[list[int]]):
        self.mirror = mirror
        B = positions.shape[0]
        bs, device = mirror.pool.block_size, positions.device
        self.slots = torch.tensor([table[p // bs] * bs + p % bs for table, row in zip(block_tables, positions.tolist())
                                   for p in row], device=device)                         # (B*T,) pool slots
        # every row sees all `capacity` keys (the mask hides the rest): with S < capacity, the (row, head)
        # matrices would not be back to back and bmm copies k (measured 2.8x slower at 32 rows)
        S = mirror.capacity
        self.mask = torch.arange(S, device=device).view(1, 1, S) <= positions.unsqueeze(-1)   # (B, T, S)
        rows = torch.arange(B, device=device).unsqueeze(1)
        self.flat = (rows * mirror.capacity + positions).flatten()                      # (B*T,) mirror slots

    def layer(self, i: int) -> _MirroredLayer:
        if i >= self.mirror.n_layers:
            raise ValueError(f"layer {i} is an MTP layer: the decode mirror holds the main layers only")
        return _MirroredLayer(self, self.mirror.pool.tensors[i], self.mirror.tensors[i])


class _MirroredLayer:
    """One layer of a MirroredCache: its pool tensors and their mirrors."""

    def __init__(self, cache: MirroredCache, tensors: list[torch.Tensor], mirrors: list[torch.Tensor]):
        self.tensors, self.mirrors = tensors, mirrors
        self.slots, self.flat, self.mask = cache.slots, cache.flat, cache.mask

    def update(self, positions: torch.Tensor, *entries: torch.Tensor):
        for buf, mirror, entry in zip(self.tensors, self.mirrors, entries):
            heads, width = buf.shape[0], buf.shape[3]
            new = entry.reshape(-1, heads, width).transpose(0, 1).to(buf.dtype)      # (heads, B*T, width)
            _slots(buf).index_copy_(1, self.slots, new)
            mirror.view(heads, -1, width).index_copy_(1, self.flat, new.to(mirror.dtype))
        return (*self.mirrors, self.mask)       # each (heads, B, capacity, width)
