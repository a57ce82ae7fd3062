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
