"""nanoseek/eval: metrics against brute force, the endpoint client against a failing test server,
records and resume, and whole runs on a tiny random model (local and through `nanoseek serve`)."""

import http.server
import itertools
import json
import math
import socket
import threading
import time

import pytest

from nanoseek.eval import metrics
from nanoseek.eval.client import Endpoint, EndpointError, base_url
from nanoseek.eval.generation import contiguous_runs
from nanoseek.eval.records import RecordWriter, load_records, problem_seed

# ---------------------------------------------------------------------------------------- metrics


def brute_pass_at_k(n, c, k):
    """The definition: the share of k-subsets of the n samples that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_counts():
    # C(1000, 500) overflows a float; the product form does not
    assert metrics.pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert metrics.pass_at_k(1000, 0, 500) == 0.0 and metrics.pass_at_k(1000, 501, 500) == 1.0
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)        # pass@1 = c/n
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)]:
        with pytest.raises(ValueError):
            metrics.pass_at_k(*bad)


def test_ks_reported():
    assert metrics.ks_for(1) == [1] and metrics.ks_for(4) == [1, 2, 4] and metrics.ks_for(6) == [1, 2, 4, 6]


def test_majority_vote_groups_spellings_and_breaks_ties_by_first_sample():
    # "5" and "5.0" vote together, as do the two "3"s: a 2-2 tie, and "3" was sampled first
    assert metrics.majority_vote(["3", "5", "5.0", "3", None], [True, False, False, True, False]) == ("3", True)
    assert metrics.majority_vote(["5", "3", "3", "5.0"], [False, True, True, False]) == ("5", False)
    # a later answer with more votes beats an earlier one
    assert metrics.majority_vote(["7", "$8$", "8", "8.0"], [False, True, True, True]) == ("$8$", True)
    # 1/2 and \frac{1}{2} and 0.5 are one answer (the verifier's canonical form)
    assert metrics.majority_vote(["0.5", "2", "\\frac{1}{2}"], [True, False, True]) == ("0.5", True)
    # no extracted answer: no vote
    assert metrics.majority_vote([None, None], [False, False]) == (None, False)
    assert metrics.majority_vote([None, "", "4"], [False, False, True]) == ("4", True)
    with pytest.raises(ValueError):
        metrics.majority_vote(["1"], [True, False])


def test_interval_from_per_problem_means():
    mean, ci = metrics.mean_interval([0.0, 0.5, 1.0, 0.5])
    sd = math.sqrt(((0.5 ** 2) * 2) / 3)
    half = metrics.Z95 * sd / 2
    assert mean == 0.5 and ci == pytest.approx([0.5 - half, 0.5 + half])
    assert metrics.mean_interval([1.0, 1.0, 0.75])[1][1] == 1.0        # clipped to [0, 1]
    assert metrics.mean_interval([0.3]) == (0.3, None)


def test_paired_difference_is_tighter_than_either_interval():
    a = [0.1, 0.9, 0.2, 0.8, 0.5, 0.0, 1.0, 0.4]
    b = [x + 0.1 if x < 0.9 else x for x in a]     # b a little better on the same problems
    paired = metrics.paired_difference(b, a)
    assert paired["difference"] == pytest.approx(sum(y - x for x, y in zip(a, b)) / len(a))
    low, high = paired["ci95"]
    assert 0 < low < paired["difference"] < high
    unpaired = metrics.mean_interval(b)[1]
    assert high - low < unpaired[1] - unpaired[0]
    with pytest.raises(ValueError):
        metrics.paired_difference([1.0], [1.0, 0.0])


def test_summarize_and_cost():
    scores = [metrics.problem_scores([True, False, False, False], ["1", "2", "2", None]),
              metrics.problem_scores([True, True, True, False], ["4", "4", "4", "5"])]
    s = metrics.summarize(scores)
    assert s["pass@1"] == pytest.approx(0.5) and s["cons@4"] == 0.5
    assert s["pass@k"]["4"] == 1.0 and s["pass@k"]["2"] == pytest.approx((0.5 + 1.0) / 2)
    # R1 prices: 1M cached + 1M missed input + 1M output = 0.14 + 0.55 + 2.19
    assert metrics.cost_usd(10**6, 10**6, 10**6, (0.14, 0.55, 2.19)) == pytest.approx(2.88)


def test_contiguous_runs_and_seeds():
    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
    assert problem_seed(0, "gsm8k:1") == problem_seed(0, "gsm8k:1") != problem_seed(1, "gsm8k:1")


# ---------------------------------------------------------------------------------------- extraction

# (completion text, reasoning_content from an endpoint, prompt opened <think>) -> extracted, correct vs "1/2"
EXTRACTION = [
    ("<think>1/3? no</think> so \\boxed{\\frac{1}{2}}.", None, False, "\\frac{1}{2}", True),    # LaTeX
    ("maybe 1/3</think> The answer is <answer>0.5</answer>", None, True, "0.5", True),  # template opened it
    ("I keep thinking 1/2 and never stop", None, True, None, False),                # reasoning only: no answer
    ("I keep thinking 1/2 and never stop", None, False, "1/2", True),               # no think block at all
    ("", None, False, None, False),                                                 # empty
    ("\\boxed{1/3} no wait, \\boxed{1/2}", None, False, "1/2", True),             # several: the last
    ("\\boxed{1/2 and then 7", None, False, "7", False),                            # malformed box: last number
    ("The answer is 0.5", "it is 1/3", False, "0.5", True),                         # endpoint's reasoning_content
    ("", "the answer is 1/2", False, None, False),                                  # endpoint: reasoning only
]


@pytest.mark.parametrize("text, reasoning, opened, extracted, correct", EXTRACTION)
def test_extraction_reads_the_answer_not_the_reasoning(text, reasoning, opened, extracted, correct):
    from nanoseek.eval.generation import split_completion
    from nanoseek.rewards import extract_answer, is_correct
    from nanoseek.tasks import Problem
    _, content = split_completion(text, reasoning, opened)
    assert extract_answer(content) == extracted
    assert is_correct(extract_answer(content), Problem("p", "q", "1/2", "math")) == correct


# ---------------------------------------------------------------------------------------- records


def test_records_resume_and_errors(tmp_path):
    path = tmp_path / "out.jsonl"
    with RecordWriter(path) as w:
        for i in range(3):
            w.write({"model": "m", "problem_id": "p", "sample_index": i, "completion": "x", "extracted": None,
                     "correct": False, "setup": "s1"})
    assert set(load_records(path, "s1")) == {("m", "p", 0), ("m", "p", 1), ("m", "p", 2)}
    with pytest.raises(ValueError, match="other sampling settings"):
        load_records(path, "s2")
    # a run killed mid-write leaves a cut-off last line: skipped, and the next writer removes it
    with open(path, "a") as f:
        f.write('{"model": "m", "problem_id": "p", "sample_ind')
    assert len(load_records(path, "s1")) == 3
    record = {"model": "m", "problem_id": "p", "sample_index": 3, "completion": "y", "extracted": "1",
              "correct": True, "setup": "s1"}
    with RecordWriter(path) as w:
        w.write(record)
    assert len(path.read_text().splitlines()) == 4 and len(load_records(path, "s1")) == 4
    # a whole last record without its newline (written by hand) is kept, and the next one goes after it
    path.write_text(path.read_text().rstrip("\n"))
    with RecordWriter(path) as w:
        w.write({**record, "sample_index": 4})
    assert len(load_records(path, "s1")) == 5
    # anything else that is not a record is an error naming the line
    path.write_text(path.read_text() + "garbage\n" + json.dumps({**record, "sample_index": 5}) + "\n")
    with pytest.raises(ValueError, match=r"out\.jsonl:6: not a sample record"):
        load_records(path, "s1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "m"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*needs the fields"):
        load_records(bad, "s1")


# ---------------------------------------------------------------------------------------- endpoint client


class ScriptedServer:
    """A loopback HTTP server that fails on purpose: each POST takes the next action of `script`
    ("drop" closes the connection without a reply, an int is that HTTP status, "ok" a chat reply)."""

    def __init__(self, script, retry_after=None):
        self.script, self.retry_after, self.posts = list(script), retry_after, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "scripted"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((time.monotonic(), body))
                action = outer.script.pop(0) if outer.script else "ok"
                if action == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif action == "ok":
                    self._send(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": "The answer is 4.", "reasoning_content": "2+2=4"}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 6,
                                  "prompt_tokens_details": {"cached_tokens": 8}}})
                else:
                    self._send(action, {"error": {"message": f"scripted {action}"}},
                               {"Retry-After": outer.retry_after} if outer.retry_after else {})

            def _send(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in dict(headers).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_base_url_forms():
    assert base_url("http://h:8000") == base_url("http://h:8000/v1/") == \
        base_url("http://h:8000/v1/chat/completions") == "http://h:8000/v1"
    with pytest.raises(ValueError):
        base_url("localhost:8000")


def test_retries_through_drops_429_and_503_with_growing_backoff():
    with ScriptedServer(["drop", 429, 503, "drop", "ok"]) as server:
        endpoint = Endpoint(server.url, backoff_s=0.02, max_retries=5)
        reply = endpoint.chat([{"role": "user", "content": "2+2?"}], temperature=0.0, seed=3)
    assert (reply["reasoning"], reply["content"]) == ("2+2=4", "The answer is 4.")
    assert reply["usage"] == {"prompt_tokens": 10, "cached_tokens": 8, "completion_tokens": 6}
    assert len(server.posts) == 5 and endpoint.retries == 4
    assert server.posts[0][1]["model"] == "scripted" and server.posts[0][1]["seed"] == 3
    gaps = [b[0] - a[0] for a, b in zip(server.posts, server.posts[1:])]
    # waits of 0.02 * 2**r * [0.5, 1]: the last (r = 3, >= 0.08 s) exceeds the first (<= 0.02 s + overhead)
    assert gaps[-1] >= 0.08 and gaps[-1] > gaps[0]


def test_retry_after_is_honoured():
    with ScriptedServer([429, "ok"], retry_after=0.3) as server:
        Endpoint(server.url, backoff_s=0.001).chat([{"role": "user", "content": "x"}])
    assert server.posts[1][0] - server.posts[0][0] >= 0.3


def test_gives_up_after_max_retries_and_never_retries_a_bad_request():
    with ScriptedServer([503] * 10) as server:
        with pytest.raises(EndpointError, match="gave up after 3 attempts.*HTTP 503"):
            Endpoint(server.url, backoff_s=0.001, max_retries=2).chat([{"role": "user", "content": "x"}])
        assert len(server.posts) == 3
    with ScriptedServer([400, "ok"]) as server:
        with pytest.raises(EndpointError, match="HTTP 400"):
            Endpoint(server.url, backoff_s=0.001).chat([{"role": "user", "content": "x"}])
        assert len(server.posts) == 1


def test_nothing_listening_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again at once: nothing listens there
    with pytest.raises(EndpointError, match="gave up"):
        Endpoint(f"http://127.0.0.1:{port}", backoff_s=0.001, max_retries=1).chat([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------- whole runs

# the tiny checkpoint of tests/serving.py answers each of its training questions, greedily, with
# "Two and two make four.</think>The answer is 4." (the template pre-fills "<think>\n"); no
# instruction is appended so the prompts are exactly those questions. Gold answers: 4, 4, 5, 10.
GOLD = [4, 4, 5, 10]
LOCAL = ["--dtype", "float32", "--device", "cpu", "--instruction", ""]


@pytest.fixture(scope="module")
def thinker():
    from serving import thinking_checkpoint
    return str(thinking_checkpoint())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A MultiArith-format JSONL (input, target)."""
    from serving import QUESTIONS
    path = tmp_path_factory.mktemp("data") / "tiny_multiarith.jsonl"
    path.write_text("".join(json.dumps({"input": q, "target": a}) + "\n" for q, a in zip(QUESTIONS, GOLD)))
    return str(path)


def run_eval(argv, capsys):
    from nanoseek.cli import main
    rc = main(["eval", *argv])
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1]) if rc == 0 else None
    return rc, summary, out


def read_records(path):
    return [json.loads(line) for line in open(path)]


def test_local_greedy_run_is_graded_by_the_rewards_verifier(thinker, data, tmp_path, capsys):
    output = tmp_path / "greedy.jsonl"
    rc, summary, out = run_eval(["--model", thinker, "--data", data, "--samples", "2", "--temperature", "0",
                                 "--max-tokens", "64", "--output", str(output), *LOCAL], capsys)
    assert rc == 0, out.err
    result = summary["results"][thinker]
    assert summary["problems"] == 4 and summary["samples"] == 2
    assert result["pass@1"] == 0.5 and result["cons@2"] == 0.5 and result["pass@k"] == {"1": 0.5, "2": 0.5}
    assert result["truncated"] == 0.0 and result["no_answer"] == 0.0
    records = read_records(output)
    assert len(records) == 8
    for r in records:
        assert set(r) >= {"model", "problem_id", "sample_index", "completion", "extracted", "correct"}
        assert (r["reasoning"], r["completion"], r["extracted"]) == ("Two and two make four.", "The answer is 4.", "4")
    by_problem = {r["problem_id"]: r["correct"] for r in records}
    assert sorted(by_problem.values()) == [False, False, True, True]
    assert result["completion_tokens"] == sum(r["completion_tokens"] for r in records)
    assert result["mean_response_tokens"] == result["completion_tokens"] / 8
    # the second sample of each prompt reuses its blocks: counted as cached
    assert result["cached_tokens"] >= result["prompt_tokens"] / 2
    assert "pass@1" in out.out and "problems x 2 samples" in out.err     # the table; the progress note


def test_resume_redoes_nothing_and_draws_the_same_samples(thinker, data, tmp_path, capsys):
    output = tmp_path / "sampled.jsonl"
    argv = ["--model", thinker, "--data", data, "--samples", "4", "--max-tokens", "48", "--output", str(output),
            *LOCAL]                     # R1's temperature 0.6 / top-p 0.95
    rc, full, _ = run_eval(argv, capsys)
    assert rc == 0 and full["run"]["generated"] == 16
    records = {(r["problem_id"], r["sample_index"]): r for r in read_records(output)}
    assert len({r["completion"] for r in records.values()}) > 1         # sampling does vary

    rc, again, _ = run_eval(argv, capsys)                                # finished: nothing to redo
    assert rc == 0 and again["run"] == {**again["run"], "generated": 0, "resumed": 16}
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in full.items() if k != "run"}
    assert len(read_records(output)) == 16

    # an interrupted run: 6 samples written, the 7th cut off mid-line
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:6]) + lines[6][:40])
    rc, resumed, out = run_eval(argv, capsys)
    assert rc == 0 and resumed["run"]["generated"] == 10 and resumed["run"]["resumed"] == 6
    assert "incomplete last line" in out.err
    assert {k: v for k, v in resumed.items() if k != "run"} == {k: v for k, v in full.items() if k != "run"}
    redone = {(r["problem_id"], r["sample_index"]): r for r in read_records(output)}
    assert redone == records                            # the same seeded draws, samples split across requests

    # other sampling settings on the same file: refused, not mixed
    rc, _, out = run_eval([*argv, "--temperature", "0.3"], capsys)
    assert rc == 2 and "other sampling settings" in out.err


def test_side_by_side_gives_the_paired_difference(thinker, data, tmp_path, capsys):
    from serving import tiny_tokenizer

    from nanoseek.model import Transformer
    from nanoseek.model.presets import tiny_llama
    tok = tiny_tokenizer()
    untrained = tmp_path / "untrained"
    Transformer(tiny_llama(vocab_size=tok.vocab_size)).save_pretrained(untrained, tokenizer=tok)
    rc, summary, out = run_eval(["--model", thinker, "--model", str(untrained), "--data", data, "--samples", "2",
                                 "--temperature", "0", "--max-tokens", "12", "--output", str(tmp_path / "o.jsonl"),
                                 *LOCAL], capsys)
    assert rc == 0, out.err
    a, b = summary["results"][thinker], summary["results"][str(untrained)]
    (comparison,) = summary["comparisons"]
    assert comparison["a"] == thinker and comparison["b"] == str(untrained)
    assert comparison["pass@1 b-a"] == pytest.approx(b["pass@1"] - a["pass@1"])
    low, high = comparison["ci95"]
    assert low <= comparison["pass@1 b-a"] <= high
    assert f"{untrained} - {thinker}: pass@1" in out.out


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1+1?", "target": 2}\n{"input": "2+2?", "target": 4}\n{"input": "3+3?"\n')
    rc, _, out = run_eval(["--model", "nowhere", "--data", str(bad)], capsys)
    assert rc == 2 and f"{bad}:3:" in out.err and "Traceback" not in out.err
    rc, _, out = run_eval(["--data", "arithmetic"], capsys)
    assert rc == 2 and "--model" in out.err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, out = run_eval(["--endpoint", f"http://127.0.0.1:{port}", "--data", "arithmetic", "--limit", "2",
                           "--max-retries", "0", "--output", str(tmp_path / "e.jsonl")], capsys)
    assert rc == 2 and "gave up" in out.err


def test_endpoint_run_survives_failures(data, tmp_path, capsys):
    # every reply says 4 (with reasoning_content); drops, 429s and 503s along the way are retried
    with ScriptedServer(["drop", 429, "ok", 503, "ok", "drop", 429, 429] + ["ok"] * 20) as server:
        rc, summary, out = run_eval(["--endpoint", server.url, "--data", data, "--samples", "3", "--concurrency", "4",
                                     "--output", str(tmp_path / "ep.jsonl")], capsys)
    assert rc == 0, out.err
    result = summary["results"][server.url]
    assert result["pass@1"] == 0.5 and result["cons@3"] == 0.5
    assert result["prompt_tokens"] == 12 * 10 and result["cached_tokens"] == 12 * 8
    assert len(read_records(tmp_path / "ep.jsonl")) == 12
    assert {body["temperature"] for _, body in server.posts} == {0.6}
    assert {body["top_p"] for _, body in server.posts} == {0.95}


def test_local_and_endpoint_runs_agree_sample_for_sample(thinker, data, tmp_path, capsys):
    """The same checkpoint through the engine and through a real `nanoseek serve` process."""
    from serving import Server
    fields = ("reasoning", "completion", "extracted", "correct", "finish_reason", "completion_tokens")

    def per_sample(path):
        return {(r["problem_id"], r["sample_index"]): [r[f] for f in fields] for r in read_records(path)}

    server = Server(thinker)
    try:
        for temperature in ("0", "0.6"):      # greedy; and seeded sampling (sample i: seed + i on both sides)
            common = ["--data", data, "--samples", "2", "--temperature", temperature, "--max-tokens", "64",
                      "--instruction", ""]
            local_out, remote_out = tmp_path / f"local{temperature}.jsonl", tmp_path / f"remote{temperature}.jsonl"
            rc, local, out = run_eval(["--model", thinker, "--dtype", "float32", "--device", "cpu", *common,
                                       "--output", str(local_out)], capsys)
            assert rc == 0, out.err
            rc, remote, out = run_eval(["--endpoint", server.url, *common, "--concurrency", "3",
                                        "--output", str(remote_out)], capsys)
            assert rc == 0, out.err + server.log()
            assert per_sample(local_out) == per_sample(remote_out), temperature
            a, b = local["results"][thinker], remote["results"][server.url]
            assert [a[m] for m in ("pass@1", "cons@2", "pass@k")] == [b[m] for m in ("pass@1", "cons@2", "pass@k")]
    finally:
        server.stop()


@pytest.mark.slow
def test_embedded_model_on_multiarith(tmp_path, capsys):
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "multiarith.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    output = tmp_path / "smollm2.jsonl"
    rc, summary, out = run_eval(["--model", "smollm2-135m", "--data", str(path), "--limit", "2", "--samples", "2",
                                 "--max-tokens", "48", "--output", str(output)], capsys)
    assert rc == 0, out.err
    records = read_records(output)
    assert len(records) == 4 and summary["problems"] == 2
    assert any(r["extracted"] is not None for r in records)      # an instruct model answers with numbers
    assert all(r["prompt_tokens"] > 20 for r in records)           # the chat template and the R1 directive
    assert 0.0 <= summary["results"]["smollm2-135m"]["pass@1"] <= 1.0
