"""Serving benchmark: N streamed requests at concurrency C against any OpenAI-compatible server
(`nanoseek serve`, llama.cpp's server, vLLM), measured from the client side as vLLM's
`bench serve` does: TTFT, TPOT, ITL and end-to-end latency (p50 / p99 / mean), output tokens/s,
requests/s and the success rate, as a table and as JSON.

- TTFT: request sent -> first chunk with text (reasoning_content counts: it is output);
- ITL: every gap between chunks with text after that (a server that buffers shows spikes here);
- TPOT: (end-to-end - TTFT) / (output tokens - 1) per request;
- output tokens from the usage chunk (stream_options.include_usage) when the server sends one,
  else the number of chunks with text.

Requests go out all at once, C at a time (a closed loop: a new one starts when one ends), with
fixed `max_tokens`, temperature 0 and `ignore_eos` (vLLM's and llama.cpp's servers take it too;
--no-ignore-eos for servers that refuse unknown fields), so the output length is the same
everywhere. Prompts: GSM8K questions when ../shared/data has them, else a built-in list. Only the
standard library: the client costs the same against every server.

Left out on purpose: Poisson arrivals and request rates, goodput/SLOs, multi-turn workloads.

    python -m bench.serve --url http://127.0.0.1:8000 --concurrency 1,4,16 --num-requests 32
    nanoseek bench serve --url http://127.0.0.1:8080 --model smollm2 --json out.json   # llama.cpp
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench.engine import read_questions


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None                          # seconds
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class Client:
    """One server: base URL, headers, and a streamed POST that times each SSE event."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url if "://" in url else "http://" + url)
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.timeout = timeout

    def _connection(self):
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def get_json(self, path: str) -> dict:
        conn = self._connection()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Result:
        result, conn = Result(), self._connection()
        start = time.perf_counter()
        try:
            conn.request("POST", self.prefix + path, body=json.dumps(body), headers=self.headers)
            response = conn.getresponse()
            if response.status != 200:
                result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
                return result
            last, chunks, usage = None, 0, None
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message"))[:200]
                    return result
                usage = event.get("usage") or usage
                if _has_text(event):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
            result.e2e = time.perf_counter() - start
            result.output_tokens = usage["completion_tokens"] if usage else chunks
            result.prompt_tokens = usage.get("prompt_tokens") if usage else None
            result.ok = result.ttft is not None
            if not result.ok:
                result.error = "no text in the stream"
        except (OSError, ValueError, http.client.HTTPException) as error:
            result.error = f"{type(error).__name__}: {error}"
        finally:
            conn.close()
        return result


def _has_text(event: dict) -> bool:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
            return True
    return False


def request_body(args, model: str, question: str) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "completions":
        return "/v1/completions", {**body, "prompt": question}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": question}]}


def run_level(client: Client, args, model: str, questions: list[str], concurrency: int) -> dict:
    bodies = [request_body(args, model, questions[i % len(questions)]) for i in range(args.num_requests)]
    results: list[Result] = []
    lock = threading.Lock()

    def one(item):
        result = client.stream(*item)
        with lock:
            results.append(result)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, bodies))
    return summarize(results, concurrency, time.perf_counter() - start)


def percentiles(values: list[float]) -> dict | None:
    """p50 / p99 (linear interpolation between ranks) and mean, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        x = q * (len(ordered) - 1)
        low = int(x)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (x - low)
    return {"p50": at(0.5) * 1e3, "p99": at(0.99) * 1e3, "mean": sum(ordered) / len(ordered) * 1e3}


def summarize(results: list[Result], concurrency: int, duration: float) -> dict:
    good = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in good)
    errors = sorted({r.error for r in results if not r.ok and r.error})
    return {"concurrency": concurrency, "num_requests": len(results), "successes": len(good),
            "success_rate": len(good) / len(results) if results else 0.0, "duration_s": duration,
            "output_tokens": output, "output_tokens_per_s": output / duration if duration else 0.0,
            "requests_per_s": len(good) / duration if duration else 0.0,
            "ttft_ms": percentiles([r.ttft for r in good]), "tpot_ms": percentiles([r.tpot for r in good if r.tpot]),
            "itl_ms": percentiles([gap for r in good for gap in r.itl]), "e2e_ms": percentiles([r.e2e for r in good]),
            "errors": errors[:5]}


def table(report: dict) -> str:
    head = (f"{'conc':>4} {'ok':>7} {'out tok/s':>10} {'req/s':>6} | {'TTFT p50':>8} {'p99':>7} | "
            f"{'TPOT p50':>8} {'p99':>7} | {'ITL p50':>7} {'p99':>7} | {'E2E p50':>8} {'p99':>8}   (ms)")
    lines = [f"{report['url']}  model={report['model']}  {report['endpoint']}  max_tokens={report['max_tokens']}",
             head, "-" * len(head)]
    def cell(stats, key, width):
        return f"{stats[key]:>{width}.1f}" if stats else f"{'-':>{width}}"
    for level in report["levels"]:
        ttft, tpot, itl, e2e = (level[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"))
        lines.append(f"{level['concurrency']:>4} {level['successes']:>3}/{level['num_requests']:<3} "
                     f"{level['output_tokens_per_s']:>10.1f} {level['requests_per_s']:>6.2f} | "
                     f"{cell(ttft, 'p50', 8)} {cell(ttft, 'p99', 7)} | {cell(tpot, 'p50', 8)} {cell(tpot, 'p99', 7)} | "
                     f"{cell(itl, 'p50', 7)} {cell(itl, 'p99', 7)} | {cell(e2e, 'p50', 8)} {cell(e2e, 'p99', 8)}")
        lines += [f"     error: {e}" for e in level["errors"]]
    return "\n".join(lines)


def parse_args(argv, prog: str):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000 (or .../v1)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="Bearer token (default: $NANOSEEK_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model id to send (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrency levels, run in order")
    p.add_argument("--num-requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request produces max_tokens")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before the first level")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m bench.serve") -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv), prog)
    client = Client(args.url, args.api_key, args.timeout)
    model = args.model or client.get_json("/v1/models")["data"][0]["id"]
    questions, _ = read_questions()
    for i in range(args.warmup):
        client.stream(*request_body(args, model, questions[i % len(questions)]))
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    report = {"url": args.url, "model": model, "endpoint": args.endpoint, "max_tokens": args.max_tokens,
              "ignore_eos": args.ignore_eos, "num_requests": args.num_requests, "load_before": os.getloadavg(),
              "levels": []}
    for concurrency in levels:
        print(f"concurrency {concurrency}: {args.num_requests} requests ...", file=sys.stderr)
        report["levels"].append(run_level(client, args, model, questions, concurrency))
    report["load_after"] = os.getloadavg()
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
