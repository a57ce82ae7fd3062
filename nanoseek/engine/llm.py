"""The offline API users know from vLLM, on top of the Engine:

    from nanoseek import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    out = llm.chat([{"role": "user", "content": "What is 17 * 23?"}], SamplingParams(max_tokens=256))
    out[0].text, out[0].reasoning_content, out[0].content, out[0].num_cached_tokens

Text lives here, not in the engine: prompts are encoded, outputs are detokenised incrementally
(correct across multi-byte characters), stop strings end a request (the engine aborts it), and
R1-style `<think>` reasoning is split from the answer.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load
from ..model.kernels import loaded as kernels_loaded
from ..model.quant import quantize_
from ..tokenizer import split_reasoning
from .detokenizer import IncrementalDetokenizer
from .engine import Engine, EngineConfig, StepOutput
from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def reasoning_content(self) -> str | None:
        return split_reasoning(self.text)[0]

    @property
    def content(self) -> str:
        return split_reasoning(self.text)[1]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_draft_tokens: int = 0           # MTP speculative decoding: drafts proposed ...
    num_accepted_tokens: int = 0        # ... and accepted, over all samples

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    # the first sample's fields, for the common n = 1 case: out[0].text
    text = property(lambda self: self.outputs[0].text)
    token_ids = property(lambda self: self.outputs[0].token_ids)
    reasoning_content = property(lambda self: self.outputs[0].reasoning_content)
    content = property(lambda self: self.outputs[0].content)
    finish_reason = property(lambda self: self.outputs[0].finish_reason)
    logprobs = property(lambda self: self.outputs[0].logprobs)

    @property
    def num_prompt_cache_misses(self) -> int:
        return len(self.prompt_token_ids) - self.num_cached_tokens


def _default_device_dtype(device, dtype) -> tuple[str, str]:
    """CUDA -> bfloat16; a CPU with native bf16 matmuls (AVX512-BF16 / AMX) -> bfloat16, else float32.

    bf16 weights halve the bytes each decode step reads and run ~2-3x faster matmuls on such CPUs;
    greedy text may drift from float32 after some tokens. Parity tests pin dtype="float32".
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device
    if dtype in (None, "auto"):
        fast_bf16 = str(device).startswith("cuda") or torch.cpu._is_avx512_bf16_supported() \
            or torch.cpu._is_amx_tile_supported()
        dtype = "bfloat16" if fast_bf16 else "float32"
    return device, dtype


# GGUF storage types whose 4-bit blocks of 32 the int4 kernels run (model/quant.py). Q4_1's blocks
# span min..max exactly as quantize_int4's do, so its integers come back unchanged (only the scales
# round to bfloat16); Q4_0's and Q4_K's land on a grid of the same size.
_GGUF_INT4 = {"Q4_0", "Q4_1", "Q4_K"}
QUANTIZATIONS = ("auto", "none", "int4", "int8")          # the `quantization` flag's choices, everywhere
QUANTIZATION_HELP = ("auto (int4 for a 4-bit GGUF on the CPU, else none) | none | int4 (weights) | "
                     "int8 (weights and activations): CPU kernels")
COMPILES = ("auto", "on", "off")                                  # the `compile` flag's choices
COMPILE_HELP = ("auto (on for int4 / int8 on the CPU: ~1 min the first start, ~20 s after, cached on disk) "
                "| on | off: torch.compile one block for every layer (engine/compiled.py)")


def _default_compile(compile, device, quantization: str | None) -> tuple[bool, str]:
    """(compile, why) for `compile="auto"`: on where it was measured to pay, the CPU kernels'
    int4 / int8 decode (engine/compiled.py; docs/benchmarks.md), given a C++ compiler for inductor."""
    if compile not in (True, False, *COMPILES):
        raise ValueError(f"compile={compile!r}: {' | '.join(COMPILES)} (or a bool)")
    if compile in (True, False, "on", "off"):
        return compile in (True, "on"), "asked for"
    if str(device) != "cpu" or quantization is None:
        return False, "measured only for int4 / int8 on the CPU"
    if not (shutil.which("c++") or shutil.which("g++")):
        return False, "inductor needs a C++ compiler: none found"
    return True, "int4 / int8 on the CPU"


def _default_quantization(source, device: str, dtype: str, quantization: str | None) -> tuple[str | None, str]:
    """(quantization, why) for `quantization="auto"`: what LLM runs when the user asks for nothing.

    A 4-bit GGUF on the CPU keeps 4-bit weights (int4 kernels: 3-4x bfloat16's decode tokens/s,
    docs/benchmarks.md) since its integers are what the file holds. A float checkpoint stays in its
    float dtype: int4 or int8 of float weights changes ~10% of greedy tokens against bfloat16
    (bench/quant_accuracy.py), a cost a user opts into. A model object is the caller's own (a
    training copy): never quantised in place unasked. The int4 kernels compute in bfloat16, so a
    float32 request (parity tests) keeps float32 weights.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: {' | '.join(QUANTIZATIONS)}")
    if quantization in ("int4", "int8"):
        return quantization, "asked for"
    if quantization in (None, "none"):
        return None, "asked for none" if quantization == "none" else "off"
    if not isinstance(source, (str, Path)):
        return None, "a model object is never quantised unasked"
    if str(device) != "cpu" or dtype != "bfloat16":
        return None, f"int4 kernels are for bfloat16 on the CPU (here {dtype} on {device})"
    from ..checkpoint import resolve
    from ..checkpoint.gguf import gguf_weight_type
    path = resolve(source)
    kind = gguf_weight_type(path) if path.suffix == ".gguf" else None
    if kind in _GGUF_INT4:
        return "int4", f"the GGUF's own {kind} weights"
    return None, "a float checkpoint keeps its weights (quantization='int4' trades ~10% of greedy tokens for speed)"


class LLM:
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto", device: str = "auto", tokenizer=None,
                 seed: int = 0, quantization: str | None = "auto", compile: bool | str = "auto", verbose: bool = True,
                 **engine_kwargs):
        """`quantization`: auto (see _default_quantization) | none | int4 | int8; `compile`: auto (see
        _default_compile) | on | off, or a bool. A model loaded from a name or path prints the
        configuration chosen, once, on stderr (verbose=False: silent)."""
        source = model
        device, dtype = _default_device_dtype(device, dtype)
        quantization, why = _default_quantization(source, device, dtype, quantization)
        if isinstance(model, (str, Path)):
            model, found = load(model, dtype=dtype, device=device, tokenizer=tokenizer is None)
            tokenizer = tokenizer or found
        if tokenizer is None:
            raise ValueError("LLM(model_object) needs tokenizer=...: a bare model carries no tokenizer")
        self.model, self.tokenizer, self.quantization = model, tokenizer, quantization
        if quantization is not None:   # CPU kernels (model/quant.py): int8 W8A8, int4 weights
            if model.embed.weight.device.type != "cpu":
                raise ValueError(f"quantization={quantization!r} runs CPU kernels: the model is on "
                                 f"{model.embed.weight.device}")
            quantize_(model, bits=int(quantization[3:]), head=True)
        compiling, compile_why = _default_compile(compile, device, quantization)
        engine_kwargs.setdefault("verbose", verbose and isinstance(source, (str, Path)))    # compile progress
        self.engine = Engine(self.model, EngineConfig(compile=compiling, **engine_kwargs), self.tokenizer.eos_token_ids,
                             seed)
        self._next_id = 0
        self.choice = (f"{self.engine.dtype}".replace("torch.", "") + f" on {self.engine.device}, "
                       + (f"{quantization} linears ({why})" if quantization else f"no quantization ({why})")
                       + f", C++ kernels {'on' if kernels_loaded() else 'off'}, "
                       + (f"compiled ({compile_why})" if self.engine.compiled else
                          f"eager ({'the compile failed' if compiling else compile_why})"))
        if verbose and isinstance(source, (str, Path)):
            print(f"nanoseek: {source}: {self.choice}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise ValueError("a prompt is a string or {'prompt_token_ids': [...]}")

    def add_request(self, prompt, params: SamplingParams) -> RequestOutput:
        """Queue one prompt; returns the RequestOutput that `step_outputs` fills in."""
        text, ids = self._encode(prompt)
        request_id = str(self._next_id)
        self._next_id += 1
        self.engine.add_request(request_id, ids, params)
        out = RequestOutput(request_id, text, ids, [CompletionOutput(i) for i in range(params.n)],
                            metrics=RequestMetrics(time.perf_counter()))
        out._detok = [IncrementalDetokenizer(self.tokenizer, params) for _ in range(params.n)]
        out._params = params
        return out

    def apply(self, request: RequestOutput, step: StepOutput) -> str:
        """Fold one engine step into the request's output; returns the new text of that sample."""
        completion, detok = request.outputs[step.index], request._detok[step.index]
        now = time.perf_counter()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.num_cached_tokens = step.num_cached_tokens
        request.num_draft_tokens += step.num_draft_tokens
        request.num_accepted_tokens += step.num_accepted_tokens
        pieces, kept = [], 0
        for token in step.new_token_ids:        # a speculative step may bring several tokens
            pieces.append(detok.push(token))
            kept += 1
            if detok.stopped:                   # tokens after a stop string are dropped with it
                break
        completion.token_ids.extend(step.new_token_ids[:kept])
        if request._params.logprobs is not None:
            completion.logprobs = (completion.logprobs or []) + step.new_logprobs[:kept]
        delta = "".join(pieces)
        if detok.stopped and not step.finished:          # a stop string: end the sample here
            self.engine.abort_sample(request.request_id, step.index, "stop")
            step.finished, step.finish_reason = True, "stop"
        if step.finished:
            delta += detok.flush()
            completion.finish_reason = step.finish_reason
            completion.stop_reason = detok.stop_reason
        completion.text = detok.text
        if all(c.finish_reason is not None for c in request.outputs):
            request.finished, request.metrics.finished_time = True, now
        return delta

    # ------------------------------------------------------------------ batch API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | str = False) -> list[RequestOutput]:
        """Run every prompt to completion under continuous batching; outputs in prompt order.

        use_tqdm: a progress bar on stderr counting finished prompts (a string names the bar)."""
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = {}
        try:
            for prompt, p in zip(prompts, params):
                out = self.add_request(prompt, p)
                requests[out.request_id] = out
            bar = _progress(len(requests), use_tqdm)
            while self.engine.has_unfinished():
                for step in self.engine.step():
                    if step.request_id in requests:
                        out = requests[step.request_id]
                        self.apply(out, step)
                        if bar is not None and out.finished:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for request_id in requests:                  # leave the engine empty, whatever happened
                self.engine.abort(request_id)
            raise
        return list(requests.values())

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Generate one prompt, yielding (new text, the RequestOutput so far) as tokens arrive."""
        request = self.add_request(prompt, params or SamplingParams())
        try:
            while not request.finished:
                for step in self.engine.step():
                    if step.request_id == request.request_id:
                        delta = self.apply(request, step)
                        if delta or request.finished:
                            yield delta, request
        finally:
            if not request.finished:                     # the caller stopped early: free the blocks now
                self.engine.abort(request.request_id)

    def chat_prompt(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> dict:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **template_kwargs)
        return {"prompt_token_ids": ids}

    def chat(self, messages, sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             **template_kwargs) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conv, add_generation_prompt, **template_kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


def _progress(total: int, use_tqdm: bool | str):
    if not use_tqdm:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=use_tqdm if isinstance(use_tqdm, str) else "generate", dynamic_ncols=True)
