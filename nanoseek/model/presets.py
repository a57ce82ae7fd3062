"""Model presets as Python functions: DeepSeek's published shapes and tiny random-init models.

The tiny ones exercise every code path (MLA with and without query compression, YaRN, sigmoid
group-limited routing with the balancing bias, dense-first layers, MTP) in milliseconds on a CPU;
tests and the engine's examples use them. Overrides are keyword arguments: `tiny_deepseek_v3(q_lora_rank=0)`.
"""

from __future__ import annotations

from .config import ModelConfig


def deepseek_v3_671b() -> ModelConfig:
    """DeepSeek-V3 / R1 (inference/configs/config_671B.json; HF config.json names mapped)."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=129280, dim=7168, n_layers=61, n_heads=128, inter_dim=18432,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, moe_inter_dim=2048, n_dense_layers=3,
        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        route_scale=2.5, n_mtp_layers=1, max_seq_len=163840, rope_theta=10000.0, rope_interleave=True,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        init_std=0.006, norm_eps=1e-6, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
    )


def tiny_deepseek_v3(**overrides) -> ModelConfig:
    """3 layers (1 dense), MLA with q_lora, 8 sigmoid experts in 4 groups (top-2 groups), 1 MTP, YaRN."""
    cfg = ModelConfig(
        model_type="deepseek_v3", vocab_size=256, dim=64, n_layers=3, n_heads=4, inter_dim=128,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=32, n_dense_layers=1,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        route_scale=2.5, n_mtp_layers=1, max_seq_len=512, rope_interleave=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1,
    )
    return cfg.replace(**overrides).validate()


def tiny_llama(**overrides) -> ModelConfig:
    """2 layers, GQA 4/2 heads, tied embeddings (as SmolLM2)."""
    cfg = ModelConfig(model_type="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, inter_dim=128, tie_word_embeddings=True, rope_theta=10000.0,
                      max_seq_len=512, norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    return cfg.replace(**overrides).validate()


def tiny_qwen2(**overrides) -> ModelConfig:
    """2 layers, GQA 4/2 heads, q/k/v biases, untied head."""
    return tiny_llama(model_type="qwen2", qkv_bias=True, tie_word_embeddings=False, rope_theta=1e6,
                      **overrides)


def small_deepseek_v3(**overrides) -> ModelConfig:
    """~3M parameters that learn the synthetic arithmetic corpus in minutes on 2 CPU cores.

    Every V3 part at small width: MLA with query compression, 1 dense + 3 MoE layers of 8 sigmoid
    experts (top-2 of 4 groups, bias-balanced) plus a shared one, one MTP module. The vocabulary is
    set by the BPE trained for the run (train/bpe.py); 512 is a placeholder.
    """
    cfg = ModelConfig(
        model_type="deepseek_v3", vocab_size=512, dim=192, n_layers=4, n_heads=6, inter_dim=512,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=128, n_dense_layers=1,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        route_scale=2.5, n_mtp_layers=1, max_seq_len=1024, rope_interleave=True, rope_theta=10000.0,
        init_std=0.02, norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
    )
    return cfg.replace(**overrides).validate()


def deepseek_v3_100m(**overrides) -> ModelConfig:
    """~95M parameters in all (~37M active; 106M with MTP), 16 experts: the larger configuration of `nanoseek bench train`."""
    cfg = small_deepseek_v3(dim=512, n_layers=8, n_heads=8, inter_dim=1536, q_lora_rank=192, kv_lora_rank=128,
                            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                            n_activated_experts=2, moe_inter_dim=384, n_expert_groups=4, n_limited_groups=2,
                            vocab_size=16384)
    return cfg.replace(**overrides).validate()


# presets a training run can start from (`nanoseek train pretrain --model NAME`)
TRAINING_PRESETS = {f.__name__: f for f in (small_deepseek_v3, deepseek_v3_100m, tiny_deepseek_v3, tiny_llama,
                                            tiny_qwen2)}
