"""``dropbp.rate=auto``: the largest drop rate whose gradient fidelity stays above a threshold.

DropBP's gradient misses every path through a dropped branch; on some models (SmolLM2-135M among them) that
turns a step's gradient away from the full one even at moderate rates, and training then loses quality per
step. ``choose_rate`` measures, on one batch, how well a step's DropBP gradient follows the full gradient at
each candidate rate (``gradient_fidelity``'s ``mean_tensor_cosine``, with the run's patterns per step) and keeps
the largest rate that stays at or above ``threshold``; when none does, DropBP stays off (rate 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leanft.core.allocate import greedy_rates
from leanft.core.choices import CANDIDATE_RATES, DEFAULT_THRESHOLD
from leanft.core.dropbp import DropBP
from leanft.core.errors import LeanftError
from leanft.core.fidelity import full_gradient, gradient_fidelity

FIDELITY_SAMPLES = 3


@dataclass(frozen=True)
class AutoRate:
    """How ``rate=auto`` picks the rate: the fidelity ``threshold`` a rate must reach, the drop patterns averaged
    per step, the ``candidates`` (tried from the largest down), the patterns sampled per candidate, and the batch
    it measures on (None: the allocation's batch)."""

    threshold: float = DEFAULT_THRESHOLD
    patterns_per_step: int = 1
    candidates: Sequence[float] = CANDIDATE_RATES
    samples: int = FIDELITY_SAMPLES
    batch: dict | None = None


def choose_rate(
    ctrl: DropBP,
    batch: dict,
    auto: AutoRate | None = None,
    sensitivities: Sequence[float] | None = None,
    allocation: str = "leanft",
) -> dict:
    """Set ``ctrl`` to the largest candidate rate whose fidelity on ``batch`` is >= ``auto.threshold`` (else 0).

    Candidates are tried from the largest down. With ``sensitivities`` each candidate's per-branch rates are
    allocated from them (``greedy_rates`` under ``allocation``), else they are uniform. Returns ``{"rate",
    "fidelity", "threshold", "tried": [{"rate", "fidelity"}, ...]}``; ``fidelity`` is the chosen rate's (None
    when DropBP ends up off).
    """
    auto = auto or AutoRate()
    threshold = auto.threshold
    if not 0.0 < threshold <= 1.0:
        raise LeanftError(f"the fidelity threshold must be in (0, 1], got {threshold}")
    flops = [branch.flops for branch in ctrl.branches]
    full = full_gradient(ctrl, batch)  # the same reference for every candidate
    tried = []
    for rate in sorted(auto.candidates, reverse=True):
        rates = greedy_rates(sensitivities, flops, rate, allocation=allocation) if sensitivities else None
        ctrl.drop_rate = rate
        ctrl.set_rates(rates or [rate] * len(ctrl.branches))
        fidelity = gradient_fidelity(ctrl, batch, auto.samples, auto.patterns_per_step, full)
        tried.append({"rate": rate, "fidelity": fidelity["mean_tensor_cosine"]})
        if tried[-1]["fidelity"] >= threshold:
            return {"rate": rate, "fidelity": tried[-1]["fidelity"], "threshold": threshold, "tried": tried}
    ctrl.drop_rate = 0.0
    ctrl.set_rates([0.0] * len(ctrl.branches))
    return {"rate": 0.0, "fidelity": None, "threshold": threshold, "tried": tried}
