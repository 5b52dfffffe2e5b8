"""Held-out loss, perplexity and accuracy (exact match, or a task's scorer) of a model on instruction / chat records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from leanft.run.data import IGNORE_INDEX, Feature, Record, collate, render_prompt, user_text
from leanft.run.tasks import Scorer, builtin_task, same_text

if TYPE_CHECKING:
    from leanft.run.config import TrainConfig

DEFAULT_MAX_NEW_TOKENS = 24  # generation length for accuracy on data that is not a built-in task


def heldout_loss(model: nn.Module, features: Sequence[Feature], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over ``features`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def reference_pairs(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    """(prompts, references) for accuracy: instruction records and single-turn chats."""
    prompts, references = [], []
    for record in records:
        if "messages" not in record:
            prompts.append(user_text(record))
            references.append(record["output"])
            continue
        roles = [message["role"] for message in record["messages"]]
        if roles[-2:] == ["user", "assistant"] and roles.count("user") == 1:
            prompts.append(record["messages"][-2]["content"])
            references.append(record["messages"][-1]["content"])
    return prompts, references


def accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    max_new_tokens: int,
    correct: Scorer = same_text,
    desc: str | None = None,
) -> float | None:
    """Share of greedy answers that ``correct(prediction, reference)`` accepts, by default exact match.

    None when no record has a single reference answer.
    """
    prompts, references = reference_pairs(records)
    if not prompts:
        return None
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, desc=desc)
    return match_rate(predictions, references, correct)


@dataclass(frozen=True)
class EvalSettings:
    """How a run scores its held-out answers: generation length, the scorer, the progress bar's title."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    correct: Scorer = same_text
    desc: str | None = None


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    features: Sequence[Feature],
    settings: EvalSettings,
    loss: float | None = None,
) -> dict[str, float | None]:
    """``{"loss", "perplexity", "accuracy"}`` on held-out records and their tokenized features.

    ``settings``: generation length and scorer (see ``accuracy``; ``eval_settings`` gives a run's); ``loss``: the
    held-out loss of this model on ``features`` where it was already measured.
    """
    if loss is None:
        loss = heldout_loss(model, features, tokenizer.pad_token_id)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": accuracy(model, tokenizer, records, settings.max_new_tokens, settings.correct, settings.desc),
    }


def eval_settings(config: TrainConfig, desc: str | None = None) -> EvalSettings:
    """A run's ``EvalSettings``: its data's scorer and generation length (``max_new_tokens`` when set)."""
    task = builtin_task(config.data)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = task.max_new_tokens if task else DEFAULT_MAX_NEW_TOKENS
    return EvalSettings(max_new_tokens, task.correct if task else same_text, desc)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """Greedy answers to user messages, rendered as in training and batched with left padding.

    ``desc`` shows a progress bar with that title.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
        encoded = [
            tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
    model.train(was_training)
    return answers


def match_rate(predictions: Sequence[str], references: Sequence[str], correct: Scorer = same_text) -> float:
    """Fraction of predictions that ``correct(prediction, reference)`` accepts (0.0 when empty).

    The default is exact match after stripping whitespace.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(map(correct, predictions, references)) / len(references)
