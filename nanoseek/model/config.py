"""ModelConfig: one dataclass for DeepSeek-V3/V2 (MLA + MoE + MTP), Llama and Qwen2.

Inside nanoseek the fields carry DeepSeek-V3 reference names (`dim`, `n_heads`, `kv_lora_rank`,
`n_routed_experts`, `score_func`, `route_scale`, ...). `config.json` keeps Hugging Face's names, so
`from_hf` / `to_hf` are the only places that know both. Both transformers 4.x (`rope_scaling`,
top-level `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `rope_interleave`, `dtype`)
spellings are read; `to_hf` writes both so either version loads what nanoseek saves.

Left out on purpose: sliding-window attention, partial rotary factors other than 1, and model
families other than the three above (an unknown `model_type` is rejected with a clear message).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILIES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
            "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str = "llama"          # deepseek_v3 | deepseek_v2 | llama | qwen2
    vocab_size: int = 32000
    dim: int = 512                      # hidden size d
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8                 # GQA key/value heads (dense families)
    head_dim: int = 64                  # GQA head size (dense families)
    inter_dim: int = 1376               # dense SwiGLU width
    norm_eps: float = 1e-6
    qkv_bias: bool = False              # Qwen2: bias on q/k/v projections
    o_bias: bool = False                # Llama `attention_bias` also puts one on o_proj
    tie_word_embeddings: bool = False
    max_seq_len: int = 4096             # max_position_embeddings
    init_std: float = 0.02              # initializer_range (V3 used 0.006)
    # rotary embedding, Hugging Face semantics (see model/layers.py)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "yarn"|"llama3"|"linear", "factor": ..., ...}
    rope_interleave: bool = False       # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...
    # MLA (DeepSeek-V2 §2.1); kv_lora_rank == 0 means the model uses GQA instead
    q_lora_rank: int = 0                # 0: plain wq, no query compression (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeekMoE (DeepSeek-V3 §2.1.2); n_routed_experts == 0 means every layer is dense
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0
    moe_inter_dim: int = 0
    n_dense_layers: int = 0             # first_k_dense_replace
    n_expert_groups: int = 1            # n_group
    n_limited_groups: int = 1           # topk_group
    score_func: str = "softmax"         # softmax (V2) | sigmoid (V3)
    topk_method: str = "greedy"         # greedy | group_limited_greedy (V2) | noaux_tc (V3, uses the bias)
    norm_topk_prob: bool = False
    route_scale: float = 1.0            # routed_scaling_factor
    # multi-token prediction (DeepSeek-V3 §2.2)
    n_mtp_layers: int = 0               # num_nextn_predict_layers
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, repr=False)   # unknown config.json keys, written back

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Dims that RoPE rotates: the decoupled rope part for MLA, the whole head for GQA."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.is_moe and layer_id >= self.n_dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ModelConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid model config: {msg}")
        need(self.model_type in FAMILIES, f"model_type {self.model_type!r} is not one of {sorted(FAMILIES)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        if self.is_mla:
            need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim > 0, "qk_rope_head_dim must be even and > 0")
            need(self.v_head_dim > 0, "v_head_dim must be > 0")
        else:
            need(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                 f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
            need(self.head_dim % 2 == 0, "head_dim must be even")
        if self.is_moe:
            need(0 < self.n_activated_experts <= self.n_routed_experts, "need 0 < num_experts_per_tok <= n_routed_experts")
            need(self.n_routed_experts % self.n_expert_groups == 0, "n_routed_experts must divide into n_group groups")
            need(1 <= self.n_limited_groups <= self.n_expert_groups, "need 1 <= topk_group <= n_group")
            need(self.score_func in ("softmax", "sigmoid"), f"scoring_func {self.score_func!r} is not softmax/sigmoid")
            need(self.moe_inter_dim > 0, "moe_intermediate_size must be > 0")
        return self

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported model_type {model_type!r}: nanoseek runs {sorted(FAMILIES)}")
        g = hf.get
        n_heads = g("num_attention_heads", 32)
        dim = g("hidden_size", 4096)
        rope = dict(g("rope_parameters") or g("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or g("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope = None if rope_type in ("default", None) else {**rope, "rope_type": rope_type}
        deepseek = model_type.startswith("deepseek")
        cfg = cls(
            model_type=model_type, vocab_size=g("vocab_size", 32000), dim=dim,
            n_layers=g("num_hidden_layers", 32), n_heads=n_heads,
            n_kv_heads=g("num_key_value_heads") or n_heads,
            head_dim=g("head_dim") or dim // n_heads, inter_dim=g("intermediate_size", 11008),
            norm_eps=g("rms_norm_eps", 1e-6),
            qkv_bias=model_type == "qwen2" or bool(g("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(g("attention_bias", False)),
            tie_word_embeddings=bool(g("tie_word_embeddings", False)),
            max_seq_len=g("max_position_embeddings", 4096), init_std=g("initializer_range", 0.02),
            rope_theta=float(rope_theta), rope_scaling=rope,
            rope_interleave=bool(g("rope_interleave", True)) if deepseek else False,
            bos_token_id=g("bos_token_id"), eos_token_id=g("eos_token_id"),
            torch_dtype=str(g("dtype") or g("torch_dtype") or "float32").replace("torch.", ""),
        )
        if deepseek:
            n_routed = g("n_routed_experts") or 0
            default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
            cfg = cfg.replace(
                q_lora_rank=g("q_lora_rank") or 0, kv_lora_rank=g("kv_lora_rank", 512),
                qk_nope_head_dim=g("qk_nope_head_dim", 128), qk_rope_head_dim=g("qk_rope_head_dim", 64),
                v_head_dim=g("v_head_dim", 128), n_routed_experts=n_routed,
                n_shared_experts=g("n_shared_experts") or 0, n_activated_experts=g("num_experts_per_tok") or 0,
                moe_inter_dim=g("moe_intermediate_size", 0), n_dense_layers=g("first_k_dense_replace") or 0,
                n_expert_groups=g("n_group") or 1, n_limited_groups=g("topk_group") or 1,
                score_func=g("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax"),
                topk_method=g("topk_method", default_method),
                norm_topk_prob=bool(g("norm_topk_prob", model_type == "deepseek_v3")),
                route_scale=float(g("routed_scaling_factor", 1.0)),
                n_mtp_layers=g("num_nextn_predict_layers", g("num_mtp_layers", 0)) or 0,
            )
        known = _HF_KEYS | {"architectures", "rope_parameters", "rope_scaling", "torch_dtype", "dtype",
                            "transformers_version", "num_mtp_layers"}
        cfg.extra = {k: v for k, v in hf.items() if k not in known}
        return cfg.validate()

    def to_hf(self) -> dict:
        """A config.json dict that transformers 4.x and 5.x both load as the same model."""
        rope_params = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        hf = {
            **self.extra,
            "architectures": [FAMILIES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "intermediate_size": self.inter_dim,
            "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_seq_len, "initializer_range": self.init_std,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "rope_parameters": rope_params,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype, "dtype": self.torch_dtype, "hidden_act": "silu",
        }
        if self.model_type.startswith("deepseek"):
            hf.update(
                num_key_value_heads=self.n_heads, q_lora_rank=self.q_lora_rank or None,
                kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                n_routed_experts=self.n_routed_experts or None, n_shared_experts=self.n_shared_experts or None,
                num_experts_per_tok=self.n_activated_experts or None, moe_intermediate_size=self.moe_inter_dim,
                first_k_dense_replace=self.n_dense_layers, n_group=self.n_expert_groups,
                topk_group=self.n_limited_groups, scoring_func=self.score_func, topk_method=self.topk_method,
                norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.route_scale,
                num_nextn_predict_layers=self.n_mtp_layers, rope_interleave=self.rope_interleave,
                attention_bias=False,
            )
        else:
            hf.update(num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim)
            if self.model_type == "llama":
                hf.update(attention_bias=self.o_bias, mlp_bias=False)
        return hf


# Keys that from_hf interprets; anything else is kept in `extra` and written back unchanged.
_HF_KEYS = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
    "max_position_embeddings", "initializer_range", "rope_theta", "rope_interleave", "bos_token_id",
    "eos_token_id", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "first_k_dense_replace", "n_group", "topk_group", "scoring_func", "topk_method", "norm_topk_prob",
    "routed_scaling_factor", "num_nextn_predict_layers", "hidden_act", "mlp_bias",
}
