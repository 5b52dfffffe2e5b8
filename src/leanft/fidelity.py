"""How close DropBP's gradient is to the full gradient on one batch, under the controller's current rates.

DropBP's gradient misses every path through a dropped branch. When those paths carry large contributions
that cancel in the full gradient (on SmolLM2-135M one branch alone can change the gradient by 90% of its
norm), a sampled step's gradient points elsewhere, and no learning rate or step count fixes the mean of it.
``gradient_fidelity`` measures that before a long run: the cosine of sampled DropBP gradients with the
full one, and of their mean (the direction training follows on average).
"""

from __future__ import annotations

import torch

from leanft.allocate import gradients_under_pattern, measuring
from leanft.dropbp import DropBP
from leanft.errors import LeanftError


def _flat(grads: list, params: list) -> torch.Tensor:
    pieces = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([piece.detach().flatten().float() for piece in pieces])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def gradient_fidelity(ctrl: DropBP, batch: dict, samples: int = 10) -> dict[str, float]:
    """Compare the DropBP gradients of the next ``samples`` training steps' patterns on ``batch`` with the full one.

    Returns ``mean_cosine`` (average cosine of one step's gradient with the full gradient),
    ``cosine_of_mean`` and ``norm_ratio_of_mean`` (the mean of the sampled gradients against the full one).
    RNG state, train/eval flags and existing ``.grad`` are left as they were; the step counter does not move.
    """
    if samples < 1:
        raise LeanftError(f"samples must be at least 1, got {samples}")
    with measuring(ctrl) as params:
        full = _flat(gradients_under_pattern(ctrl, batch, params, [False] * len(ctrl.branches)), params)
        cosines, total = [], torch.zeros_like(full)
        for step in range(ctrl.step, ctrl.step + samples):
            sampled = _flat(gradients_under_pattern(ctrl, batch, params, ctrl.sample(step)), params)
            cosines.append(_cosine(sampled, full))
            total += sampled
    mean = total / samples
    return {
        "mean_cosine": sum(cosines) / samples,
        "cosine_of_mean": _cosine(mean, full),
        "norm_ratio_of_mean": float(mean.norm() / full.norm()) if float(full.norm()) > 0 else 0.0,
    }
