"""nanoseek: DeepSeek-R1 rebuilt small — one model (MLA, MoE, MTP; Llama and Qwen2 too), its
checkpoints (Hugging Face safetensors, DeepSeek FP8, GGUF) and tokenizer, an inference engine
(paged KV cache, continuous batching, prefix caching), with training, an API server and R1's
evaluation built on top.

    from nanoseek import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))[0].text)

    model = nanoseek.load_model("smollm2-135m"); tokenizer = nanoseek.load_tokenizer("smollm2-135m")
"""

from .checkpoint import CheckpointError, load_model, load_tokenizer
from .engine.llm import LLM
from .engine.sampling import SamplingParams
from .model import ModelConfig, Transformer

__all__ = ["LLM", "CheckpointError", "ModelConfig", "SamplingParams", "Transformer", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
