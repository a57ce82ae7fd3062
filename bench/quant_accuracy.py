"""Accuracy cost of nanoseek's quantisation on the embedded SmolLM2-135M (docs/benchmarks.md).

    python -m bench.quant_accuracy [--tokens 1024]

Perplexity over real text (GSM8K worked answers when ../shared/data exists, else the built-in
questions) and the share of positions whose top-1 next token equals the unquantised model's. The
text runs in chunks of 8 tokens through a cache, so int4 layers use their int4 kernel (above 8
rows they switch to the int8 copy) and every scheme sees decode-sized inputs.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.engine import read_questions


@torch.inference_mode()
def chunked_logits(model, ids: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    from nanoseek.model import DenseCache
    cache = DenseCache(model.cfg, 1, ids.shape[1], dtype=model.embed.weight.dtype)
    out = []
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk]
        positions = torch.arange(start, start + part.shape[1]).unsqueeze(0)
        out.append(model(part, positions, cache).float())
    return torch.cat(out, dim=1)[0]          # (T, vocab)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    from nanoseek import load_model, load_tokenizer
    from nanoseek.model.quant import quantize_
    tokenizer = load_tokenizer("smollm2-135m")
    ids = torch.tensor([tokenizer.encode(read_questions()[1])[: args.tokens]])
    base = load_model("smollm2-135m", dtype=getattr(torch, args.dtype)).eval()
    rows, ref = [], None
    for name, bits in (("bfloat16", None), ("int8 W8A8 (+ head)", 8), ("int4 weights (+ head)", 4)):
        model = base if bits is None else copy.deepcopy(base)
        if bits:
            quantize_(model, bits=bits, head=True)
        logits = chunked_logits(model, ids)
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
        top1 = logits.argmax(-1)
        ref = top1 if ref is None else ref
        rows.append(f"| {name} | {torch.exp(torch.tensor(nll)).item():.3f} | {(top1 == ref).float().mean().item():.1%} |")
    print(f"Perplexity over {ids.shape[1]} tokens of GSM8K text, chunks of 8 tokens through a cache:\n")
    print("| weights | perplexity | top-1 equal to bfloat16 |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
