"""Streaming split of R1 output into `reasoning_content` and `content`, as DeepSeek's API returns them.

Where the reasoning starts is read from the rendered prompt, not guessed from the output:

- "thinking": the chat template pre-filled "<think>" (DeepSeek-R1's, Qwen3's): everything up to
  "</think>" is reasoning; output cut off before it is all reasoning and the content is "";
- "detect":   the model may open "<think>" itself as its first text (leading whitespace allowed);
  otherwise the whole output is content, untouched;
- "answer":   the template closed the think block already (thinking switched off): all content.

Reasoning is stripped of surrounding whitespace, and so is content that follows reasoning (the
"\\n\\n" after "</think>"), which is what `tokenizer.split_reasoning` does. Streamed, a piece of
text that may still turn out to be part of a tag, or whitespace that may turn out to be trailing,
is held back until the next piece decides it, so the concatenated deltas equal the split of the
whole text, however the text was cut into pieces.

Left out on purpose: a "<think>" that appears after other text (it stays content), several think
blocks, tool-call parsing.

    splitter = ReasoningSplitter("thinking")
    splitter.feed("2+2=4</thi")   # -> ("2+2=4", "")
    splitter.feed("nk>\\n\\nIt is 4.") + splitter.finish()
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def reasoning_mode(prompt_text: str) -> str:
    """"thinking", "answer" or "detect" from how the rendered prompt ends (see the module docstring)."""
    tail = prompt_text.rstrip()
    if tail.endswith(THINK_START):
        return "thinking"
    if tail.endswith(THINK_END):
        return "answer"
    return "detect"


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


class _Stripped:
    """A text field streamed without its leading and trailing whitespace (when `strip`)."""

    def __init__(self, strip: bool):
        self.strip, self.started, self.held = strip, False, ""

    def push(self, text: str, final: bool = False) -> str:
        if not self.strip:
            return text
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = "" if final else text[len(kept):]
        return kept


class ReasoningSplitter:
    def __init__(self, mode: str):
        if mode not in ("thinking", "detect", "answer"):
            raise ValueError(f"mode must be 'thinking', 'detect' or 'answer', got {mode!r}")
        self.state = mode
        self.had_reasoning = mode == "thinking"
        self.pending = ""
        self.reasoning = _Stripped(True)
        self.content = _Stripped(False)

    @property
    def thinking(self) -> bool:
        return self.state == "thinking"

    def feed(self, text: str) -> tuple[str, str]:
        """New output text -> (reasoning delta, content delta); either may be ""."""
        self.pending += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """The output ended: release whatever was held back."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            if self.state == "detect":
                head = self.pending.lstrip()
                if head.startswith(THINK_START):
                    self.pending, self.state, self.had_reasoning = head[len(THINK_START):], "thinking", True
                    continue
                if not final and THINK_START.startswith(head):   # "", "<", "<th", ...: undecided yet
                    break
                self.state = "answer"
            elif self.state == "thinking":
                at = self.pending.find(THINK_END)
                if at >= 0:
                    reasoning.append(self.reasoning.push(self.pending[:at], final=True))
                    self.pending, self.state = self.pending[at + len(THINK_END):], "answer"
                    self.content = _Stripped(True)              # the answer after reasoning is stripped too
                    continue
                keep = 0 if final else _partial_tag(self.pending, THINK_END)
                reasoning.append(self.reasoning.push(self.pending[:len(self.pending) - keep], final))
                self.pending = self.pending[len(self.pending) - keep:]
                break
            else:
                content.append(self.content.push(self.pending, final))
                self.pending = ""
                break
        return "".join(reasoning), "".join(content)
