"""Training batches: packed pretraining rows, chat SFT rows labelled on the assistant only, resumable loaders.

A batch is {"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)} on the CPU, where
labels[:, t] is the token after input_ids[:, t], or -100 where no loss is taken.

Pretraining (`PretrainLoader`), the document-boundary rule:
    each document is tokenized without special tokens and followed by one EOS; the epoch's
    documents (in seeded random order) make one stream  d1 EOS d2 EOS d3 EOS ...  which is cut into
    rows of T + 1 tokens at a stride of T, so neighbouring rows share one token: row k is
    stream[kT : kT + T + 1], its inputs the first T tokens and its labels the last T. Every token
    of the stream is an input exactly once (but the last) and a label exactly once (but the
    first): nothing is dropped. A document may run on into the next row, and rows are plain
    causal sequences (no attention mask, no position reset): a token attends to every earlier
    token of its row, earlier documents included, as in GPT-2 / nanoGPT packing. The label at an
    EOS is the next document's first token, and it is trained: it teaches how documents start,
    which is what the model sees when generation begins after a separator. Only the epoch's last
    row can be short; it is padded, with labels -100 on the padding. Rows are shuffled per epoch.

SFT (`SFTLoader`): each conversation is rendered with the tokenizer's own chat template; the
loss mask is 1 exactly on what the assistant writes (its content, <think> reasoning included, and
the end-of-turn token that closes its turn), found by rendering prefixes (`chat_tokens`). Whole
examples are packed greedily into rows of at most T + 1 tokens (the same causal rule: an example
sees the earlier examples of its row) or, with pack=False, one example a row; an example longer
than T + 1 tokens is truncated (counted in `.truncated`; dropped, and counted in `.dropped`, when
no assistant token is left).

Loaders iterate forever over epochs. The cursor is global: each batch consumes the next
B x world_size rows of the seeded row order and rank r takes the r-th block of B, so ranks see
disjoint rows, together every row once per epoch, and world_size ranks equal one process with a
batch world_size times larger. `state_dict()` is {epoch, position, seed, ...} (JSON-able ints);
after `load_state_dict` the batches equal those of the uninterrupted run, whatever the rank.

Left out on purpose: per-document attention masks (varlen attention), curriculum or weighted
mixing of sources, tokenizing on the fly (everything is tokenized once, at construction).

    loader = PretrainLoader("builtin", tokenizer, batch_size=8, seq_len=256, seed=0)
    batch = next(loader); cursor = loader.state_dict()
"""

from __future__ import annotations

import warnings
import zlib

import jinja2
import numpy as np
import torch

from .sources import DataError, _BadRow, read_conversations, read_documents

IGNORE_INDEX = -100  # labels to skip, as torch.nn.functional.cross_entropy's ignore_index

__all__ = ["IGNORE_INDEX", "DataError", "PretrainLoader", "SFTLoader", "chat_tokens"]


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask[j] = 1 where ids[j] is a token the assistant writes.

    For each assistant message i, the prompt before it is the conversation up to i rendered with
    the generation prompt, and the turn ends where messages[:i + 1] ends; the tokens in between are
    the assistant's, minus the template's formatting after its end-of-turn (EOS) token, which the
    model never generates (SmolLM2's "\\n" after <|im_end|>). Text the generation prompt pre-fills
    (R1's "<think>\\n") belongs to the prompt. Both renderings must be token prefixes of the whole
    conversation, else DataError: such a template rewrites earlier turns (DeepSeek-R1's drops the
    reasoning of every assistant message), or pre-fills what the answer does not start with.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(full)
    ends = set(tokenizer.eos_token_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        stop = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], generation_prompt=False)
        for name, part in ((f"messages[:{i}] with the generation prompt", start), (f"messages[:{i + 1}]", stop)):
            if full[:len(part)] != part:
                j = next((j for j, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
                raise DataError(
                    f"the chat template is not prefix-stable, so the assistant tokens cannot be found: {name} "
                    f"renders {tokenizer.decode(part[j:j + 12])!r} at token {j} where the whole conversation has "
                    f"{tokenizer.decode(full[j:j + 12])!r} (does the template rewrite earlier turns, or pre-fill "
                    "text such as '<think>\\n' that this answer does not start with?)")
        closing = [j for j in range(len(start), len(stop)) if full[j] in ends]
        end = closing[-1] + 1 if closing else len(stop)
        mask[len(start):end] = [1] * max(0, end - len(start))
    return full, mask


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    except jinja2.TemplateError as e:  # e.g. raise_exception("roles must alternate"): this row's fault
        raise _BadRow(f"the chat template rejects this conversation ({e})") from None


class _Loader:
    """What both loaders share: epochs of rows in seeded order, the global cursor, sharding, batching.

    A subclass sets self._pad_id and self._fingerprint and defines _epoch_rows(epoch) (a list of
    row keys) and _row(key) -> (ids (L,) int, mask (L,) bool or None), 2 <= L <= T + 1.
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int, shuffle: bool):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not (isinstance(value, int) and value >= 1):
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise DataError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = self.position = 0  # the next row to hand out (of all ranks) is rows(epoch)[position]
        self._epochs: dict[int, list] = {}

    def _permutation(self, epoch: int, n: int, purpose: int = 0) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        # a fresh generator per (seed, epoch, purpose): any epoch's order is computed without replaying others
        return np.random.default_rng([self.seed & (2**64 - 1), epoch, purpose]).permutation(n)

    def rows(self, epoch: int) -> list:
        if epoch not in self._epochs:
            self._epochs = {e: r for e, r in self._epochs.items() if e >= epoch - 1}  # keep one back
            self._epochs[epoch] = self._epoch_rows(epoch)
        return self._epochs[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.rank * self.batch_size  # this rank's block within the step's B x world_size rows
        keys = []
        for i in range(self.batch_size * self.world_size):
            if first <= i < first + self.batch_size:
                keys.append(self.rows(self.epoch)[self.position])
            self.position += 1
            if self.position == len(self.rows(self.epoch)):  # the epoch is done: the next one starts
                self.epoch, self.position = self.epoch + 1, 0
        return self._collate([self._row(key) for key in keys])

    def _collate(self, rows) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(rows), self.seq_len), self._pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), self.seq_len), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            input_ids[b, :n] = ids[:-1]
            labels[b, :n] = ids[1:] if mask is None else ids[1:].masked_fill(~mask[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def state_dict(self) -> dict:
        """The data cursor, plain ints: equal on every rank, so rank 0's copy resumes all of them."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a cursor; the data, seed and seq_len must be those it was taken with
        (batch_size and world_size may change: the cursor counts rows, not batches)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            theirs = {key: int(state[key]) for key in ("seed", "seq_len", "fingerprint")}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a data-loader state ({e!r}): {state!r}") from None
        ours = {"seed": self.seed, "seq_len": self.seq_len, "fingerprint": self._fingerprint}
        changed = [f"{key} {theirs[key]} -> {ours[key]}" for key in ours if theirs[key] != ours[key]]
        if changed:
            raise DataError(f"cannot resume the data cursor: {', '.join(changed)} since it was saved "
                            "(fingerprint: a checksum of the tokenized data)")
        if epoch < 0 or not 0 <= position < len(self.rows(epoch)):
            raise DataError(f"data cursor out of range: epoch {epoch}, position {position}")
        self.epoch, self.position = epoch, position


class PretrainLoader(_Loader):
    """Packed pretraining rows from documents (the boundary rule is in the module docstring).

    data: a .txt/.jsonl path, folder, glob or list of them, or "builtin" (synthetic_documents of
    `builtin_size` documents). `skipped` counts malformed rows dropped with skip_bad=True.
    """

    def __init__(self, data, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, skip_bad: bool = False, builtin_size: int = 20_000):
        super().__init__(batch_size, seq_len, seed, rank, world_size, shuffle)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token to separate documents with")
        documents, self.skipped = read_documents(data, skip_bad=skip_bad, builtin_size=builtin_size, seed=seed)
        self.documents = [torch.tensor(tokenizer.encode(text, add_special_tokens=False) + [eos], dtype=torch.int32)
                          for _, text in documents]
        self.tokens_per_epoch = sum(len(d) for d in self.documents)
        if self.tokens_per_epoch < 2:
            raise DataError(f"{data}: the documents hold {self.tokens_per_epoch} token(s); a row needs 2")
        self.rows_per_epoch = -(-(self.tokens_per_epoch - 1) // seq_len)  # ceil((N - 1) / T)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self._fingerprint = _checksum(self.documents)

    def stream(self, epoch: int) -> torch.Tensor:
        """The epoch's token stream (N,): its documents, each followed by EOS, in the epoch's order."""
        return torch.cat([self.documents[i] for i in self._permutation(epoch, len(self.documents), purpose=1)])

    def _epoch_rows(self, epoch: int) -> list:
        stream, T = self.stream(epoch), self.seq_len
        return [stream[k * T:k * T + T + 1] for k in self._permutation(epoch, self.rows_per_epoch)]

    def _row(self, key):
        return key.long(), None


class SFTLoader(_Loader):
    """Chat examples in rows, labels on the assistant tokens only (see `chat_tokens`).

    data: .jsonl with "messages" (or prompt/completion-style pairs), or "builtin"
    (synthetic_sft_examples). `skipped`, `truncated`, `dropped` count examples as the module says.
    """

    def __init__(self, data, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, skip_bad: bool = False, pack: bool = True,
                 builtin_size: int = 2_000):
        super().__init__(batch_size, seq_len, seed, rank, world_size, shuffle)
        self.pack = pack
        conversations, self.skipped = read_conversations(data, skip_bad=skip_bad, builtin_size=builtin_size,
                                                         seed=seed)
        self.examples, self.truncated, self.dropped = [], 0, 0
        for where, messages in conversations:
            try:
                ids, mask = chat_tokens(tokenizer, messages)
            except _BadRow as e:
                if not skip_bad:
                    raise DataError(f"{where}: {e}") from None
                self.skipped += 1
                continue
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            self._add(ids, mask)
        if self.truncated:
            warnings.warn(f"{data}: {self.truncated} example(s) longer than seq_len + 1 = {seq_len + 1} tokens "
                          f"truncated, {self.dropped} of them dropped (no assistant token left)", stacklevel=2)
        if not self.examples:
            raise DataError(f"{data}: no usable chat examples")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = 0 if pad is None else pad
        self._fingerprint = _checksum([ids for ids, _ in self.examples] + [m for _, m in self.examples])

    def _add(self, ids: list[int], mask: list[int]) -> None:
        limit = self.seq_len + 1
        if len(ids) > limit:
            self.truncated += 1
            ids, mask = ids[:limit], mask[:limit]
        if not any(mask[1:]):  # mask[0] is never a label
            self.dropped += 1
            return
        self.examples.append((torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool)))

    def _epoch_rows(self, epoch: int) -> list:
        order = self._permutation(epoch, len(self.examples))
        if not self.pack:
            return [(int(i),) for i in order]
        rows, row, used = [], [], 0
        for i in order:  # greedy, in the shuffled order: a row takes examples while they fit
            n = len(self.examples[i][0])
            if row and used + n > self.seq_len + 1:
                rows.append(tuple(row))
                row, used = [], 0
            row.append(int(i))
            used += n
        return rows + [tuple(row)]

    def _row(self, key):
        ids, masks = zip(*(self.examples[i] for i in key))
        return torch.cat(ids).long(), torch.cat(masks)


def _checksum(tensors) -> int:
    """CRC-32 of the tokenized data: a resumed cursor must point into the same rows."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.to(torch.int32).numpy().tobytes(), crc)
        crc = zlib.crc32(len(t).to_bytes(8, "little"), crc)
    return crc
