import pytest
import torch

from nanoseek.checkpoint.hf import load_hf_folder
from nanoseek.model import DenseCache, Transformer
from nanoseek.model.presets import deepseek_v3_671b, tiny_deepseek_v3, tiny_llama, tiny_qwen2

from hf_oracle import transformers_folder

YARN_UNEQUAL = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}

CONFIGS = {
    "llama_tied": tiny_llama(),
    "qwen2": tiny_qwen2(),
    "deepseek_v3_q_lora": tiny_deepseek_v3(),
    "deepseek_v3_no_q_lora": tiny_deepseek_v3(q_lora_rank=0),
    "deepseek_v3_yarn_mscale": tiny_deepseek_v3(rope_scaling=YARN_UNEQUAL, n_dense_layers=2, n_layers=4),
    "llama_llama3_rope": tiny_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    oracle = transformers_folder(CONFIGS[name], tmp_path)
    with pytest.warns(UserWarning, match="MTP") if CONFIGS[name].n_mtp_layers else _nothing():
        ours = load_hf_folder(tmp_path)
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        diff = (oracle(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("cfg", [tiny_llama(), tiny_qwen2(), tiny_deepseek_v3()], ids=["llama", "qwen2", "deepseek"])
def test_incremental_decode_matches_full_forward(cfg):
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(cfg, batch_size=2, max_len=32)
        steps = [model(ids[:, :7], torch.arange(7).expand(2, 7), cache)]      # prefill 7, then 1 by 1
        for t in range(7, 20):
            steps.append(model(ids[:, t:t + 1], torch.full((2, 1), t), cache))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_ragged_rows_in_one_cache():
    """Rows at different positions decode in one forward and each matches its own full forward."""
    cfg = tiny_deepseek_v3()
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    cache = DenseCache(cfg, batch_size=2, max_len=16)
    with torch.no_grad():
        model(a[:, :8], torch.arange(8)[None], cache_row(cache, 0))
        model(b[:, :4], torch.arange(4)[None], cache_row(cache, 1))
        step = model(torch.stack([a[0, 8:], b[0, 4:]]), torch.tensor([[8], [4]]), cache)
        assert (step[0, -1] - model(a)[0, -1]).abs().max() < 1e-4
        assert (step[1, -1] - model(b)[0, -1]).abs().max() < 1e-4


def cache_row(cache, row):
    """A view of one row of a DenseCache, for prefilling rows separately."""
    view = DenseCache.__new__(DenseCache)
    view.max_len = cache.max_len
    view.buffers = [[buf[row:row + 1] for buf in layer] for layer in cache.buffers]
    return view


def test_mtp_training_form_matches_cached_form():
    cfg = tiny_deepseek_v3(n_mtp_layers=2)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        train = model.mtp_logits(ids, hidden)
        assert [t.shape[1] for t in train] == [11, 10]
        cache = DenseCache(cfg, 1, 16)
        model.hidden_states(ids, torch.arange(12)[None], cache)
        pos = torch.arange(11)[None]
        logits1, h1 = model.mtp_forward(1, model.norm(hidden[:, :11]), ids[:, 1:], pos, cache)
        assert (logits1 - train[0]).abs().max() < 1e-4
        logits2, _ = model.mtp_forward(2, h1[:, :10], ids[:, 2:], pos[:, :10], cache)
        assert (logits2 - train[1]).abs().max() < 1e-4


def test_routing_is_reported_per_moe_layer():
    cfg = tiny_deepseek_v3()
    routing = []
    Transformer(cfg)(torch.randint(0, 256, (2, 6)), routing=routing)
    assert len(routing) == cfg.n_layers - cfg.n_dense_layers
    assert routing[0].indices.shape == (12, cfg.n_activated_experts) and routing[0].batch_shape == (2, 6)


def test_deepseek_v3_671b_parameter_counts():
    """Published: 671B total, 37B activated (README_WEIGHTS: 36.7B incl. 0.9B embedding + 0.9B head)."""
    with torch.device("meta"):
        model = Transformer(deepseek_v3_671b())
    total, active = model.num_params(), model.num_params(active=True)
    assert abs(total / 1e9 - 671) < 1.0, total
    assert abs(active / 1e9 - 37) < 1.0, active
    mtp_only = model.num_params(mtp=True) - total
    assert abs(mtp_only / 1e9 - 11.5) < 0.6, mtp_only
    assert model.flops_per_token(4096, training=False) > 2 * model.num_params(active=True, embedding=False)


def test_mtp_modules_train():
    """The MTP loss (V3 §2.2) back-propagates into the MTP module and the shared embedding."""
    cfg = tiny_deepseek_v3()
    model = Transformer(cfg)
    ids = torch.randint(0, 256, (2, 12))
    logits = model.mtp_logits(ids, model.hidden_states(ids))[0]          # (2, 11, V): at i predicts t_{i+2}
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0


def test_deepseek_v2_style_config_runs():
    """V2 settings through the same code: softmax scores, group-limited greedy, no bias, no q_lora."""
    from nanoseek.model import ModelConfig
    hf = tiny_deepseek_v3(q_lora_rank=0, n_mtp_layers=0).to_hf()
    hf.update(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
              norm_topk_prob=False, routed_scaling_factor=16.0)
    cfg = ModelConfig.from_hf(hf)
    model = Transformer(cfg)
    assert cfg.score_func == "softmax" and model.layers[1].ffn.gate.bias is None
    assert torch.isfinite(model(torch.randint(0, 256, (1, 9)))).all()


def test_a_bfloat16_model_keeps_float32_rope_frequencies():
    """model.to(bfloat16) must not round RoPE's inverse frequencies through bf16 on their way back
    to float32 (0.3162 -> 0.3164 is 0.4 rad of angle at position 1,000)."""
    from nanoseek.model.presets import tiny_llama
    model = Transformer(tiny_llama())
    exact = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, exact)


def test_a_tied_embedding_gets_the_dense_gradient_of_both_its_uses():
    """embed_tokens' sparse gradient lands in the head's dense one: .grad is the same dense tensor
    that dense embedding lookups give, repeated tokens included; untied models stay dense throughout."""
    torch.manual_seed(0)
    for cfg, tied in ((tiny_llama(), True), (tiny_llama(tie_word_embeddings=False), False)):
        model = Transformer(cfg)
        ids = torch.tensor([[3, 5, 3, 7, 3, 9]])
        grads = []
        for dense in (False, True):
            if dense:   # the plain lookup: a dense (V, D) gradient for the embedding's use
                model.embed_tokens = lambda i: torch.nn.functional.embedding(i, model.embed.weight)
            model.zero_grad(set_to_none=True)
            model(ids).float().logsumexp(-1).sum().backward()
            grads.append(model.embed.weight.grad)
        assert grads[0].layout == torch.strided and not grads[0].is_sparse
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
        assert (model.head is None) == tied
