"""How close DropBP's gradient is to the full gradient on one batch, under the controller's current rates.

DropBP's gradient misses every path through a dropped branch. When those paths carry large contributions
that cancel in the full gradient (on SmolLM2-135M one branch alone can change the gradient by 90% of its
norm), a sampled step's gradient points elsewhere, and no learning rate or step count fixes the mean of it.
``gradient_fidelity`` measures that before a long run: the cosine of sampled DropBP gradients with the
full one, over all parameters and per parameter tensor, and of their mean (the direction training follows on
average). With ``patterns_per_step=k`` a step's batch is split into k micro-batches that each draw their own
pattern, as under gradient accumulation, which averages the dropping noise over k patterns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanft.core.allocate import gradients_under_pattern, measuring
from leanft.core.chunked_loss import IGNORE_INDEX
from leanft.core.dropbp import DropBP
from leanft.core.errors import LeanftError


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return sum(float(torch.dot(x.flatten(), y.flatten())) for x, y in zip(a, b, strict=True))


def _cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine of two gradients given as lists of tensors (all of them joined into one vector)."""
    denominator = (_dot(a, a) * _dot(b, b)) ** 0.5
    return _dot(a, b) / denominator if denominator > 0 else 0.0


def _rows(batch: dict) -> int:
    if not isinstance(batch.get("labels"), torch.Tensor) or batch["labels"].dim() < 2:
        raise LeanftError("gradient_fidelity needs a batch dict with a 2-d 'labels' tensor (and 'input_ids')")
    return int(batch["labels"].shape[0])


def answer_tokens(batch: dict) -> int:
    """Tokens the causal LM loss counts: labels other than -100 after the shift by one."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``batch`` cut into ``parts`` contiguous micro-batches of rows (sizes differ by at most one)."""
    rows = _rows(batch)
    if not 1 <= parts <= rows:
        raise LeanftError(f"patterns_per_step must be between 1 and the batch's {rows} rows, got {parts}")
    if parts == 1:
        return [batch]
    pieces: list[dict] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = (
            torch.tensor_split(value, parts)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows
            else [value] * parts
        )
        for piece, chunk in zip(pieces, chunks, strict=True):
            piece[key] = chunk
    return pieces


def accumulated_gradients(
    ctrl: DropBP, batch: dict, params: Sequence[nn.Parameter], patterns: Sequence[Sequence[bool]]
) -> list[torch.Tensor]:
    """One step's float32 gradients of ``params``: micro-batch i of ``batch`` under ``patterns[i]``.

    Micro-batches are weighted as ``transformers.Trainer`` weights them under gradient accumulation: each one's
    summed token loss over the whole step's answer-token count, so with nothing dropped the result equals the
    full batch's gradient. Call it inside ``allocate.measuring(ctrl)``, which yields ``params``.
    """
    parts = split_batch(batch, len(patterns))
    total = answer_tokens(batch)
    if total == 0:
        raise LeanftError("the batch has no answer tokens (every label is -100): nothing to measure")
    summed = [torch.zeros_like(param, dtype=torch.float32) for param in params]
    for part, pattern in zip(parts, patterns, strict=True):
        count = answer_tokens(part)
        if count == 0:  # its loss would be 0/0; under Trainer it adds nothing
            continue
        for acc, grad in zip(summed, gradients_under_pattern(ctrl, part, params, list(pattern)), strict=True):
            if grad is not None:
                acc += grad.float() * (count / total)
    return summed


def _mean_tensor_cosine(sampled: list[torch.Tensor], full: list[torch.Tensor]) -> float:
    """Cosine per parameter tensor, every tensor with a nonzero full gradient weighted equally."""
    cosines = [_cosine([s], [f]) for s, f in zip(sampled, full, strict=True) if f.any()]
    return sum(cosines) / len(cosines) if cosines else 0.0


def full_gradient(ctrl: DropBP, batch: dict) -> list[torch.Tensor]:
    """The float32 gradients of the trainable parameters on ``batch`` with nothing dropped (state left as it was)."""
    with measuring(ctrl) as params:
        return accumulated_gradients(ctrl, batch, params, [[False] * len(ctrl.branches)])


def gradient_fidelity(
    ctrl: DropBP,
    batch: dict,
    samples: int = 10,
    patterns_per_step: int = 1,
    full: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Compare the DropBP gradients of the next ``samples`` training steps' patterns on ``batch`` with the full one.

    Each sampled step splits ``batch`` into ``patterns_per_step`` micro-batches with the controller's next
    patterns (``ctrl.sample`` of consecutive steps from ``ctrl.step``), weighted as under gradient accumulation
    (see ``accumulated_gradients``); the reference is the whole batch with nothing dropped.
    Returns ``mean_cosine`` (average cosine of one step's gradient with the full gradient),
    ``mean_tensor_cosine`` (the same per parameter tensor, tensors weighted equally: closer to what Adam sees),
    ``cosine_of_mean`` and ``norm_ratio_of_mean`` (the mean of the sampled gradients against the full one).
    RNG state, train/eval flags and existing ``.grad`` are left as they were; the step counter does not move.
    ``full``: ``full_gradient(ctrl, batch)`` where already computed (several rates measured on one batch).
    """
    if samples < 1:
        raise LeanftError(f"samples must be at least 1, got {samples}")
    split_batch(batch, patterns_per_step)  # a bad patterns_per_step fails before any gradient
    if full is None:
        full = full_gradient(ctrl, batch)
    with measuring(ctrl) as params:
        cosines, tensor_cosines, total = [], [], [torch.zeros_like(grad) for grad in full]
        for sample in range(samples):
            first = ctrl.step + sample * patterns_per_step
            patterns = [ctrl.sample(step) for step in range(first, first + patterns_per_step)]
            sampled = accumulated_gradients(ctrl, batch, params, patterns)
            cosines.append(_cosine(sampled, full))
            tensor_cosines.append(_mean_tensor_cosine(sampled, full))
            for acc, grad in zip(total, sampled, strict=True):
                acc += grad
            del sampled  # freed before the next step's gradients
    full_norm = _dot(full, full) ** 0.5
    return {
        "mean_cosine": sum(cosines) / samples,
        "mean_tensor_cosine": sum(tensor_cosines) / samples,
        "cosine_of_mean": _cosine(total, full),  # the mean's direction is the sum's
        "norm_ratio_of_mean": _dot(total, total) ** 0.5 / samples / full_norm if full_norm > 0 else 0.0,
    }
