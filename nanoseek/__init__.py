"""nanoseek: DeepSeek-R1 rebuilt small — one model (MLA, MoE, MTP; Llama and Qwen2 too), its
checkpoints (Hugging Face safetensors, DeepSeek FP8, GGUF) and tokenizer, with training, an
inference engine, an API server and R1's evaluation built on top.

    import nanoseek
    model = nanoseek.load_model("smollm2-135m")
    tokenizer = nanoseek.load_tokenizer("smollm2-135m")
"""

from .checkpoint import CheckpointError, load_model, load_tokenizer
from .model import ModelConfig, Transformer

__all__ = ["CheckpointError", "ModelConfig", "Transformer", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
