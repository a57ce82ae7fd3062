import pytest
import torch

from nanoseek.engine.kv_cache import BlockPool, PagedCache, block_hashes
from nanoseek.model import DenseCache, Transformer
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama


def test_block_hashes_chain_over_prefixes():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [0] * 8, 16)
    c = block_hashes([99] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b                    # the partial last block is not hashed
    assert not set(a) & set(c)                       # a different first block changes every hash


def test_pool_reuses_freed_cached_blocks_until_evicted():
    pool = BlockPool(tiny_llama(), num_blocks=2, block_size=4)
    x = pool.allocate()
    pool.register(x, 123)
    pool.release(x)
    assert pool.num_free == 2 and pool.lookup(123) == x and pool.num_free == 1
    pool.release(x)
    y = pool.allocate()                              # the never-cached block goes first (LRU)
    assert y != x and pool.lookup(123) == x
    pool.release(x)
    pool.allocate()                                  # now x must be reused: its hash is dropped
    assert pool.lookup(123) is None
    with pytest.raises(RuntimeError, match="out of blocks"):
        pool.allocate()


def test_pool_size_follows_mla_latent():
    cfg = tiny_deepseek_v3(n_mtp_layers=0)
    pool = BlockPool(cfg, 4, 16)
    assert pool.bytes_per_token() == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


@pytest.mark.parametrize("cfg", [tiny_llama(), tiny_deepseek_v3()], ids=["gqa", "mla"])
def test_paged_forward_matches_dense_cache(cfg):
    """Blocks scattered over the pool in any order give the same logits as a contiguous cache."""
    model = Transformer(cfg).eval()
    pool = BlockPool(cfg, num_blocks=8, block_size=4)
    table = [5, 1, 7, 2]                                         # 16 slots, deliberately shuffled
    ids = torch.randint(0, 256, (1, 13))

    def paged(start, end):
        positions = torch.arange(start, end)[None]
        slots = torch.tensor([[table[p // 4] * 4 + p % 4 for p in range(start, end)]])
        return model(ids[:, start:end], positions, PagedCache(pool, slots, torch.tensor([table]), positions))

    with torch.no_grad():
        got = torch.cat([paged(0, 9), paged(9, 10), paged(10, 13)], dim=1)
        want = model(ids, torch.arange(13)[None], DenseCache(cfg, 1, 16))
    assert (got - want).abs().max() < 1e-5


def test_caches_return_heads_major_entries_that_reshape_without_a_copy():
    """The update contract (model/cache.py): entries come back (heads, B, S, width); the paged
    gather is one contiguous block, so attention's (Hkv * B, S, D) views of k and v copy nothing."""
    cfg = tiny_llama()
    Hkv, D = cfg.n_kv_heads, cfg.head_dim
    pool = BlockPool(cfg, num_blocks=8, block_size=4)
    tables = torch.tensor([[3, 6], [1, 0]])                              # 2 rows of 2 blocks: S = 8
    positions = torch.tensor([[5, 6], [1, 2]])
    slots = tables.gather(1, positions // 4) * 4 + positions % 4
    entry = torch.randn(2, 2, 2 * Hkv, D)
    kv, mask = PagedCache(pool, slots, tables, positions).layer(0).update(positions, entry)
    assert kv.shape == (2 * Hkv, 2, 8, D) and mask.shape == (2, 2, 8) and kv.is_contiguous()
    for half in (kv[:Hkv], kv[Hkv:]):
        assert half.reshape(Hkv * 2, 8, D).data_ptr() == half.data_ptr()     # a view, not a copy
    # row 0's token at position 5 sits at key 5 of its row; row 1's at position 2 at key 2
    assert torch.equal(kv[:, 0, 5], entry[0, 0]) and torch.equal(kv[:, 1, 2], entry[1, 1])
    dense, _ = DenseCache(cfg, 2, 8).layer(0).update(positions, entry)
    assert dense.shape == (2 * Hkv, 2, 7, D) and torch.equal(dense[:, 0, 5], entry[0, 0])
