"""Tokenizer: text <-> token ids, chat templates, streamed detokenisation and <think> splitting.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library) and renders chat templates with jinja2
the way transformers does, so the ids and prompt text match `transformers.AutoTokenizer` exactly
(the tests check both). It loads from a Hugging Face tokenizer folder or from a GGUF file's metadata,
and saves a folder that transformers and `Tokenizer.from_folder` both open.

From GGUF metadata it rebuilds byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen2) and llama
SentencePiece ("llama": Llama 2, Mistral) vocabularies as transformers' GGUF converter does.

Left out on purpose: slow (Python) tokenizers, padding/truncation/batching (the engine works on
lists of ids), other GGUF vocabularies (Gemma's and Phi-3's SentencePiece variants, T5's unigram),
and transformers' assistant-token masks (`{% generation %}` renders its body unchanged).

    tok = Tokenizer.from_folder("path/to/checkpoint")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    reasoning, answer = split_reasoning("<think>2+2=4</think> 4")
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from nanoseek.errors import CheckpointError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names a message's reasoning goes by


class Tokenizer:
    """Text <-> ids with a `tokenizers` backend; special tokens by name; the chat template as source.

    Build it with `from_folder` or `from_gguf`. `backend` is the Rust tokenizer itself, whose
    post-processor decides whether `encode(..., add_special_tokens=True)` adds BOS/EOS.
    """

    def __init__(self, backend: Backend, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, extra_eos_token_ids=()):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None:
            # GGUF metadata states the flags; build the post-processor transformers builds from them.
            backend.post_processor = _bos_eos_processor(self, bool(add_bos_token), bool(add_eos_token))
        # Whatever set it (flag or tokenizer.json), the post-processor is what adds BOS/EOS; ask it.
        plain = backend.encode("x", add_special_tokens=False).ids
        full = backend.encode("x", add_special_tokens=True).ids
        start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
        self.add_bos_token = start > 0 and full[0] == self.bos_token_id
        self.add_eos_token = start + len(plain) < len(full) and full[-1] == self.eos_token_id
        ids = [self.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in ids if i is not None))

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path) -> Tokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json plus the optional config files beside it."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: no tokenizer.json in the folder")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises bare Exceptions for malformed JSON
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")
        special = {**_read_json(folder / "special_tokens_map.json"), **config}  # the config wins
        tokens = {name: _token_content(special.get(name)) for name in SPECIAL_TOKEN_NAMES}
        chat_template = _pick_chat_template(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():  # transformers prefers the separate file
            chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_eos = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
        # add_bos_token / add_eos_token in the config are ignored: tokenizer.json's post-processor
        # decides, as in transformers 5 (and it agrees with the flags in well-formed folders).
        return cls(backend, **tokens, chat_template=chat_template, extra_eos_token_ids=extra_eos)

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """Rebuild the tokenizer a `gguf.GGUFReader`'s metadata describes (llama.cpp key names)."""
        name = getattr(reader.data, "filename", None) or "GGUF file"
        field = partial(_gguf_field, reader, name)
        tokens, model = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.model")
        if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
            raise CheckpointError(f"{name}: tokenizer.ggml.tokens is missing or not a list of strings")
        try:
            backend = _gguf_backend(field, name, model, tokens)
        except CheckpointError:
            raise
        except Exception as e:  # the Rust library raises bare Exceptions, e.g. a merge of unknown tokens
            raise CheckpointError(f"{name}: cannot build the tokenizer from its metadata ({e})") from e

        def token(key):
            index = field(f"tokenizer.ggml.{key}")
            if index is not None and not (isinstance(index, int) and 0 <= index < len(tokens)):
                raise CheckpointError(f"{name}: tokenizer.ggml.{key} = {index} is outside the vocabulary")
            return None if index is None else tokens[index]

        specials = dict(bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"))
        token_types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        _add_gguf_special_tokens(backend, tokens, token_types, specials.values(), byte_level=model == "gpt2")
        # llama.cpp stops on every end-of-generation token, not only EOS.
        extra_eos = [field(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
        return cls(backend, **specials, chat_template=field("tokenizer.chat_template"),
                   # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
                   add_bos_token=bool(field("tokenizer.ggml.add_bos_token", model == "llama")),
                   add_eos_token=bool(field("tokenizer.ggml.add_eos_token", False)),
                   extra_eos_token_ids=[i for i in extra_eos if isinstance(i, int) and 0 <= i < len(tokens)])

    def save_pretrained(self, folder) -> None:
        """Write tokenizer.json + tokenizer_config.json, the files transformers' AutoTokenizer reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        # tokenizer.json's post-processor adds BOS/EOS; the flags repeat it for readers that look there.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos_token,
                  "add_eos_token": self.add_eos_token, "clean_up_tokenization_spaces": False}
        config.update({name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template  # in the config, where every reader looks
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")

    # ---- ids ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (the embedding needs this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra) -> str | list[int]:
        """Render a conversation as transformers does: same variables, same jinja environment."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        variables = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)}
        variables.update(tools=None, documents=None)
        variables.update(extra)  # caller's variables override the special tokens, as in transformers
        text = _compile_chat_template(self.chat_template).render(
            messages=[_template_message(m) for m in messages], add_generation_prompt=add_generation_prompt,
            **variables)
        # The template writes the special tokens itself, so none are added when encoding.
        return self.encode(text, add_special_tokens=False) if tokenize else text


class StreamDecoder:
    """Turns a stream of ids into text deltas that never cut a UTF-8 character in half.

    Byte-level BPE splits an emoji or a CJK character over several tokens; decoding a prefix that
    ends mid-character gives U+FFFD. Each push decodes a short window of recent ids and holds its
    text back while it ends in U+FFFD. The window starts at the last id whose text was already
    emitted, so decoders that drop a leading space at the start of a sequence (SentencePiece) see
    the same context twice and the difference is exact. Pushes + flush concatenate to decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are fully emitted
        self.read_offset = 0  # ids before it are emitted; those in [prefix_offset, read_offset) give context

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(seen):]


def split_reasoning(text: str, think_start: str = "<think>", think_end: str = "</think>") -> tuple[str | None, str]:
    """R1 output -> (reasoning_content, content), as DeepSeek's API returns them.

    "<think>a</think> b" -> ("a", "b"); "a</think> b" -> ("a", "b") when the chat template already
    wrote "<think>" into the prompt, as DeepSeek-R1's does; "<think>a" (cut off while thinking) ->
    ("a", ""); "b" -> (None, "b"), returned untouched. Text before "<think>" is kept in the content.
    """
    before, started, rest = text.partition(think_start)
    if not started:
        before, rest = "", text
    reasoning, ended, after = rest.partition(think_end)
    if not ended:
        return (reasoning.strip(), before.strip()) if started else (None, text)
    return reasoning.strip(), (before + after).strip()


# ---- GGUF vocabularies --------------------------------------------------------------------------

# The split regexes transformers' GGUF converter uses (integrations/gguf/gguf_tokenizer_mapping.py),
# keyed by `tokenizer.ggml.pre`. Any other value (gpt2, smollm, starcoder, ...) gets GPT-2's regex
# built into the ByteLevel pre-tokenizer, as there.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the spelling of every byte-level BPE token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def _gguf_field(reader, name: str, key: str, default=None):
    value = reader.fields.get(key)
    try:
        return default if value is None else value.contents()
    except (ValueError, IndexError) as e:  # e.g. a string that is not UTF-8
        raise CheckpointError(f"{name}: GGUF metadata {key!r} is malformed ({e})") from e


def _gguf_backend(field, name: str, model: str | None, tokens: list[str]) -> Backend:
    """The BPE model, pre-tokenizer and decoder transformers' GGUF converter builds for `model`."""
    merges = field("tokenizer.ggml.merges")
    if merges is not None:
        if not (isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
            raise CheckpointError(f"{name}: tokenizer.ggml.merges is malformed")
        merges = [tuple(m.split(" ", 1)) for m in merges]
    if model == "gpt2" and merges is not None:
        return _byte_level_backend(tokens, merges, field("tokenizer.ggml.pre"))
    # Gemma and Phi-3 files say "llama" too, but transformers builds theirs differently.
    if model == "llama" and field("general.architecture") not in ("gemma", "gemma2", "gemma3", "phi3"):
        scores = field("tokenizer.ggml.scores")
        if merges is None and not (isinstance(scores, list) and len(scores) == len(tokens)):
            raise CheckpointError(f"{name}: a SentencePiece vocabulary needs tokenizer.ggml.merges or .scores")
        return _sentencepiece_backend(tokens, merges or _merges_from_scores(tokens, scores))
    raise CheckpointError(f"{name}: tokenizer model {model!r} is not supported; nanoseek rebuilds byte-level "
                          "BPE ('gpt2', with merges) and llama SentencePiece ('llama') vocabularies")


def _sentencepiece_backend(tokens: list[str], merges: list[tuple[str, str]]) -> Backend:
    """Llama/Mistral SentencePiece as BPE with byte fallback (transformers' LlamaTokenizer): "▁" marks a
    space, one is prepended to the text, and the decoder removes it again."""
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies when the file lists none: every split of a token
    into two tokens, best score first (transformers' generate_merges, same order and ties)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_backend(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> Backend:
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A token llama.cpp stored in plain text (e.g. with a real space) is respelled in the byte alphabet.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Backend(bpe)
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_special_tokens(backend: Backend, tokens, token_types, named_specials, byte_level: bool) -> None:
    """Control tokens (type 3) become special added tokens, user-defined ones (type 4, like <think>)
    plain added tokens, so neither is cut into pieces. In a byte-level vocabulary a control token
    spelled outside the byte alphabet is a llama.cpp mislabel and is skipped, as in transformers."""
    spelled = set(_byte_alphabet().values())
    control = [t for t, kind in zip(tokens, token_types) if kind == 3 and (not byte_level or set(t) <= spelled)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types) if kind == 4 and t in vocab])
    # transformers also registers the named special tokens (bos/eos/unk/pad) if nothing marked them.
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(named_specials) if t is not None and t not in added]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])


def _bos_eos_processor(tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
    """transformers' `update_post_processor`: BOS/EOS around each sequence when the flags say so."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = ([(bos, tokenizer.token_to_id(bos))] if add_bos else []) + \
        ([(eos, tokenizer.token_to_id(eos))] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# ---- folders ------------------------------------------------------------------------------------

def _read_json(file: Path) -> dict:
    """An optional JSON object file: {} when absent, CheckpointError naming it when malformed."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_content(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as a serialised AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_chat_template(value) -> str | None:
    """A template string, or a list of {"name", "template"}: then the one named "default"."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


# ---- chat templates (transformers' utils/chat_template_utils.py, minus the assistant masks) -----

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks;
    here it renders its body unchanged, so templates using it still compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    # Sandboxed: a chat template comes with a downloaded checkpoint and is untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _template_message(message: dict) -> dict:
    """What transformers hands the template: keys whose value is None dropped (templates print
    "None" otherwise), and the reasoning copied under every name templates read it by."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
