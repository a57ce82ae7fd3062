"""Incremental detokenizer: token ids in, final text out, with stop strings that may span tokens.

Built on `StreamDecoder` (tokenizer.py), which never cuts a UTF-8 character in half. On top of it
this adds stop strings, as vLLM's detokenizer checks them:

- the stop that ends first wins (ties: the longer one), and only occurrences that end in text
  produced after the first `min_tokens` tokens count (vLLM checks once len(output) > min_tokens);
- the text is cut before the stop string, or after it with `include_stop_str_in_output`;
- while streaming, the tail of the text that could still grow into a stop string is held back,
  so no returned text is ever taken back. `flush()` releases it when generation ends otherwise.

Invariant: "".join(pushes) + flush() == text.

Text of the token that ended generation (EOS, a stop_token_ids token) is the caller's choice: vLLM
leaves it out, so do not push that token. Left out: `spaces_between_special_tokens`, and logprob
token texts.

    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["\\n\\n"]), prompt_ids)
    for token in tokens:
        print(detok.push(token), end="")
        if detok.stopped:
            break
    print(detok.flush())
"""

from __future__ import annotations

from ..tokenizer import StreamDecoder, Tokenizer
from .sampling import SamplingParams

PRIME_MIN, PRIME_MAX = 4, 24  # prompt-tail lengths tried as decode context (vLLM's choice)


class IncrementalDetokenizer:
    """One sequence's detokenizer. `text` is everything so far (cut at a stop string), `stopped`
    says a stop string was found, `stop_reason` which one."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams | None = None, prompt_ids=None):
        params = params or SamplingParams()
        self.stop = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.decoder = StreamDecoder(tokenizer, params.skip_special_tokens)
        self.text = ""
        self.num_emitted = 0          # characters of text already returned
        self.num_tokens = 0
        self.stopped = False
        self.stop_reason: str | None = None
        self._prime(tokenizer, list(prompt_ids or []), params.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (often "", never taken back)."""
        if self.stopped:
            return ""
        self.num_tokens += 1
        return self._advance(self.decoder.push(token_id), final=False)

    def flush(self) -> str:
        """Generation ended without a stop string: release what was held back (and any cut character)."""
        if self.stopped:
            return ""
        return self._advance(self.decoder.flush(), final=True)

    def _prime(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        """Decode the first tokens in the context of the prompt's tail, whose text is discarded, so a
        SentencePiece decoder keeps the leading space of the first output token. The tail is the
        shortest one of PRIME_MIN.. tokens that decodes without a cut character (vLLM does the same)."""
        for length in range(max(1, min(PRIME_MIN, len(prompt_ids))), min(PRIME_MAX, len(prompt_ids)) + 1):
            tail = prompt_ids[-length:]
            if "\ufffd" not in tokenizer.decode(tail, skip_special_tokens):
                for token in tail:
                    self.decoder.push(token)
                return

    def _advance(self, new_text: str, final: bool) -> str:
        checked = len(self.text)      # occurrences ending within the old text were looked for already
        self.text += new_text
        if self.stop and new_text and self.num_tokens > self.min_tokens:
            self._find_stop(checked)
        held = 0 if (final or self.stopped or self.include_stop) else self._stop_prefix_length()
        end = max(self.num_emitted, len(self.text) - held)
        delta = self.text[self.num_emitted:end]
        self.num_emitted = end
        return delta

    def _find_stop(self, checked: int) -> None:
        """Look for a stop string ending after text[:checked]; on a hit, cut the text and stop."""
        best = None                   # (end, -length, start, stop)
        for stop in self.stop:
            start = self.text.find(stop, max(0, checked - len(stop) + 1))
            if start != -1:
                hit = (start + len(stop), -len(stop), start, stop)
                best = hit if best is None or hit < best else best
        if best is None:
            return
        end, _, start, stop = best
        # Without include_stop, text[start:] was a stop prefix until now, so none of it was emitted.
        self.text = self.text[:end if self.include_stop else start]
        self.stopped, self.stop_reason = True, stop

    def _stop_prefix_length(self) -> int:
        """Length of the longest unemitted tail of text that is a proper prefix of a stop string."""
        room = len(self.text) - self.num_emitted
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, room), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
