"""A real tokenizer for models trained from scratch: byte-level BPE learned from the training text.

A scratch model does not need SmolLM2's 49k vocabulary (its embedding and head would dwarf a 3M-
parameter model). This trains a small byte-level BPE with the `tokenizers` library on the run's own
documents: digits are split one per token (as Llama 3 and DeepSeek-V3 do, so arithmetic sees every
digit), byte fallback means any text encodes, and DeepSeek-R1's special tokens and chat template
come with it, so `nanoseek chat`, the engine and transformers' AutoTokenizer open the result.

    tok = train_bpe(documents, vocab_size=512)
    tok.save_pretrained(folder)
"""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from ..tokenizer import Tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK = ("<think>", "</think>")        # ordinary added tokens: detokenised text keeps them

# DeepSeek-R1's template, trimmed: earlier turns' reasoning is dropped as R1's is (§ API rules),
# the reply opens with "<｜Assistant｜>" and closes with EOS.
R1_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if not loop.last and '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def train_bpe(texts, vocab_size: int = 512, min_frequency: int = 2) -> Tokenizer:
    """Learn a byte-level BPE of at most `vocab_size` ids (specials included) from an iterable of str."""
    specials = [BOS, EOS, PAD, USER, ASSISTANT]
    if vocab_size < 256 + len(specials) + len(THINK):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 263 ids")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK), min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=R1_TEMPLATE)


def padded_vocab(tokenizer: Tokenizer, multiple: int = 64) -> int:
    """The embedding rows for a tokenizer: its size rounded up to a multiple (matmul-friendly)."""
    return -(-tokenizer.vocab_size // multiple) * multiple
