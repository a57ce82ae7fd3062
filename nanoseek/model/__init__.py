"""The model: one Transformer for DeepSeek-V3/V2, Llama and Qwen2 (see transformer.py)."""

from .cache import DenseCache, PackedCache
from .config import ModelConfig
from .transformer import Transformer

__all__ = ["DenseCache", "ModelConfig", "PackedCache", "Transformer"]
