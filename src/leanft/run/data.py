"""Training data: instruction or chat records -> token ids with prompt-masked labels.

A record (see ``leanft.run.sources``) is ``{"instruction", "input" (optional), "output"}`` or ``{"messages"}``.
It is rendered with the tokenizer's chat template (a plain ``### Instruction`` / ``### Response`` format when
the tokenizer has none) and labels are ``-100`` everywhere except on the assistant's tokens, which end with
the EOS token. The module also holds greedy generation and an accuracy helper (built-in tasks: ``leanft.run.tasks``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from leanft.core.chunked_loss import IGNORE_INDEX
from leanft.core.errors import LeanftError
from leanft.core.packed import BLOCK_MASK, flatten_examples

Record = dict
Feature = dict[str, list[int]]


def user_text(record: Record) -> str:
    """The user message of an instruction record: its instruction, then its input if any."""
    extra = record.get("input") or ""
    return f"{record['instruction']}\n\n{extra}" if extra.strip() else record["instruction"]


def to_messages(record: Record) -> list[dict[str, str]]:
    """A record as chat messages (instruction records become one user and one assistant turn)."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": user_text(record)}, {"role": "assistant", "content": record["output"]}]


# --------------------------------------------------------------------------- rendering and tokenizing


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The exact text a model sees before answering the user message ``text`` (as in training)."""
    return "".join(part for part, _ in render_segments(tokenizer, [{"role": "user", "content": text}], True))


def render_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Split a conversation into ``(text, trainable)`` pieces; only assistant replies are trainable.

    With a chat template, assistant turn ``i`` is the text that ``messages[: i + 1]`` adds to the render
    of ``messages[:i]`` with its generation prompt. Messages after the last assistant turn are dropped,
    unless ``generation_prompt`` asks to end with an open assistant turn.
    """
    if not tokenizer.chat_template:
        return _plain_segments(messages, generation_prompt)

    def render(part: list[dict[str, str]], open_turn: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=open_turn)

    if generation_prompt:
        return [(render(messages, True), False)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LeanftError("this chat template rewrites earlier turns: use instruction records instead")
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(text, trainable) for text, trainable in segments if text]


def _plain_segments(messages: list[dict[str, str]], generation_prompt: bool) -> list[tuple[str, bool]]:
    """Fallback rendering for tokenizers without a chat template."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    segments = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            segments += [("### Response:\n", False), (message["content"], True), ("\n\n", False)]
        elif i < last or generation_prompt:
            head = "" if message["role"] == "system" else "### Instruction:\n"
            segments.append((f"{head}{message['content']}\n\n", False))
    if generation_prompt:
        segments.append(("### Response:\n", False))
    return segments[:-1] if segments and segments[-1] == ("\n\n", False) else segments


def answer_and_rest(ids: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(an assistant reply's tokens up to and including the EOS, appended where the template emits none; the
    tokens the template puts after the EOS)."""
    if eos in ids:
        return ids[: ids.index(eos) + 1], ids[ids.index(eos) + 1 :]
    return ids + [eos], []


def tokenize_example(record: Record, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None) -> Feature:
    """Tokenize one record into ``input_ids`` and ``labels`` (``-100`` on every non-assistant token).

    Each assistant reply is learned up to and including the EOS token (appended when the template does
    not emit it); anything the template puts after the EOS is masked. Truncates to ``max_seq_len``.
    """
    eos = tokenizer.eos_token_id
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in render_segments(tokenizer, to_messages(record)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not trainable:
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            continue
        learned, rest = answer_and_rest(ids, eos)
        input_ids += learned + rest
        labels += learned + [IGNORE_INDEX] * len(rest)
    if max_seq_len is not None:
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_dataset(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 512,
    pack: bool = False,
) -> list[Feature]:
    """Tokenize records; examples left with no answer token after truncation are dropped.

    With ``pack=True`` examples are concatenated into blocks of ``max_seq_len`` tokens (see ``pack_features``).
    """
    return tokenize_and_count(records, tokenizer, max_seq_len, pack)[0]


def tokenize_and_count(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_seq_len: int = 512, pack: bool = False
) -> tuple[list[Feature], dict]:
    """``tokenize_dataset`` and what it changed: examples dropped (no answer token within ``max_seq_len``),
    examples whose answer was cut short, and with packing the examples longer than a block."""
    full = [tokenize_example(record, tokenizer) for record in records]
    cut = full if pack else [{key: value[:max_seq_len] for key, value in f.items()} for f in full]
    answered = [any(label != IGNORE_INDEX for label in f["labels"]) for f in cut]
    kept = [f for f, keep in zip(cut, answered, strict=True) if keep]
    longer = [len(f["input_ids"]) > max_seq_len for f in full]
    report = {
        "examples": len(records),
        "dropped": answered.count(False),
        "truncated": 0 if pack else sum(long and keep for long, keep in zip(longer, answered, strict=True)),
        "longer_than_a_block": sum(longer) if pack else 0,
        "tokens": sum(len(f["input_ids"]) for f in kept),  # what training reads, padding aside
    }
    if not kept:
        raise LeanftError(f"no example keeps an answer token within max_seq_len={max_seq_len}: raise it")
    return (pack_features(kept, max_seq_len) if pack else kept), report


class TokenizedStream(torch.utils.data.IterableDataset):
    """Records tokenized as training reads them (``streaming=true``), pass after pass without end.

    Examples left with no answer are skipped. Each pass over ``records`` is a new epoch (``set_epoch``
    reshuffles a stream), inside one endless iterator: the Trainer's resume then skips the batches a run has
    consumed across passes, not only within the current one.
    """

    def __init__(self, records: Iterable[Record], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> None:
        self.records, self.tokenizer, self.max_seq_len = records, tokenizer, max_seq_len

    def __iter__(self) -> Iterator[Feature]:
        for epoch in itertools.count():
            if hasattr(self.records, "set_epoch"):
                self.records.set_epoch(epoch)
            answered = 0
            for record in self.records:
                feature = tokenize_example(record, self.tokenizer, self.max_seq_len)
                if any(label != IGNORE_INDEX for label in feature["labels"]):
                    answered += 1
                    yield feature
            if not answered:
                raise LeanftError(f"no streamed example keeps an answer token within max_seq_len={self.max_seq_len}")


def pack_features(features: Sequence[Feature], block_size: int) -> list[Feature]:
    """Concatenate examples and cut the stream into blocks of ``block_size`` tokens (the last may be short).

    Labels stay masked per example, so the loss still covers only answers. Each block carries ``position_ids`` that
    restart at every example and at the block's start (the rest of an example cut by a block boundary counts as an
    example of its own), so a padding-free batch (``Collator``) keeps the examples in a block apart.
    """
    input_ids = [token for f in features for token in f["input_ids"]]
    labels = [label for f in features for label in f["labels"]]
    positions = [position for f in features for position in range(len(f["input_ids"]))]
    blocks = []
    for start in range(0, len(input_ids), block_size):
        block_positions = positions[start : start + block_size]
        head = next((i for i, position in enumerate(block_positions) if position == 0), len(block_positions))
        block_positions[:head] = range(head)  # a cut example's continuation starts at position 0
        blocks.append({"input_ids": input_ids[start : start + block_size], "labels": labels[start : start + block_size],
                       "position_ids": block_positions})
    return [b for b in blocks if any(label != IGNORE_INDEX for label in b["labels"])]


def collate(
    features: Sequence[Feature], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Padding gets ``pad_token_id``, attention 0 and label ``-100``. For ``transformers.Trainer`` pass
    ``functools.partial(collate, pad_token_id=tokenizer.pad_token_id)`` as ``data_collator``.
    """
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = length - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


@dataclass
class Collator:
    """The training batches of a run: padded rows, or padding-free rows (``packing``: one of the modes of
    ``leanft.core.packed``); counts the tokens it computes and how many of them are examples' own."""

    pad_token_id: int
    packing: str | None = None  # None: padded; POSITIONS or BLOCK_MASK: one row per batch, examples kept apart
    mask_dtype: torch.dtype = torch.float32
    example_tokens: int = 0
    computed_tokens: int = 0

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        """The batch of ``features``, counted."""
        if self.packing is None:
            batch = collate(features, self.pad_token_id)
        else:
            batch = flatten_examples(features, block_mask=self.packing == BLOCK_MASK, mask_dtype=self.mask_dtype)
        self.example_tokens += sum(len(f["input_ids"]) for f in features)
        self.computed_tokens += batch["input_ids"].numel()
        return batch

    def padding_share(self) -> float:
        """The share of the tokens computed so far that are padding (0.0 before the first batch)."""
        return 1.0 - self.example_tokens / self.computed_tokens if self.computed_tokens else 0.0
