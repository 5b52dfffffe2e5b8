"""``dropbp.*``: the DropBP settings of a run (a group of ``leanft.run.config.TrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from leanft.core import choices
from leanft.core.errors import LeanftError
from leanft.run.options import doc


@dataclass
class DropBPConfig:
    """DropBP settings (``dropbp.KEY=VALUE`` on the command line)."""

    rate: float | str = doc(
        "target drop rate in [0, 1): share of the branches' backward FLOPs skipped; 0 = off (the default: on the "
        "measured tasks DropBP costs quality per step, see the README); auto = the largest of 0.5..0.1 whose "
        "gradient fidelity stays >= auto_threshold (measured at allocate_at; off when none does)",
        0.0,
    )
    auto_threshold: float = doc(
        "rate=auto: lowest accepted mean per-tensor cosine of a step's DropBP gradient with the full one",
        choices.DEFAULT_THRESHOLD,
    )
    allocate_at: float | None = doc(
        "fraction of training after which sensitivity-based allocation sets per-branch rates; null = keep uniform",
        0.1,
    )
    allocation_samples: int = doc("examples for the sensitivity measurement (one forward+backward per branch)", 2)
    allocation: str = doc(
        "leanft | official: sensitivity and greedy cost of the allocation (official: the DropBP authors' rule)",
        "leanft",
    )
    sampler: str = doc(
        "bernoulli | topup: independent draws, or the authors' top-up to drop_rate of the branches",
        "bernoulli",
    )
    patterns_per_step: int = doc(
        "drop patterns per optimizer step: the batch runs as this many micro-batches, each with its own pattern "
        "(same examples and effective batch; must divide batch_size)",
        1,
    )
    warmup: float = doc("share of the steps at the start that drop nothing (a rate schedule's warm-up)", 0.0)
    cooldown: float = doc("share of the steps at the end that drop nothing (a rate schedule's cool-down)", 0.0)

    def initial_rate(self) -> float:
        """The rate the controller starts with (auto: the largest candidate, paused until the choice)."""
        return max(choices.CANDIDATE_RATES) if self.rate == "auto" else float(self.rate)

    def validate(self, batch_size: int) -> None:
        """Raise a LeanftError naming the first bad DropBP value (``batch_size``: examples per device per step)."""
        if self.rate != "auto" and not (isinstance(self.rate, float) and 0.0 <= self.rate < 1.0):
            raise LeanftError(f"dropbp.rate must be in [0, 1) (0 = off) or auto, got {self.rate}")
        if not 0.0 < self.auto_threshold <= 1.0:
            raise LeanftError(f"dropbp.auto_threshold must be in (0, 1], got {self.auto_threshold}")
        if self.allocate_at is not None and not 0.0 <= self.allocate_at <= 1.0:
            raise LeanftError(f"dropbp.allocate_at must be in [0, 1] or null, got {self.allocate_at}")
        if self.allocation not in choices.ALLOCATIONS:
            raise LeanftError(f"dropbp.allocation must be one of {', '.join(choices.ALLOCATIONS)}, "
                              f"got {self.allocation!r}")
        if self.sampler not in choices.SAMPLERS:
            raise LeanftError(f"dropbp.sampler must be one of {', '.join(choices.SAMPLERS)}, got {self.sampler!r}")
        if self.patterns_per_step < 1 or batch_size % self.patterns_per_step:
            raise LeanftError(
                f"dropbp.patterns_per_step must be >= 1 and divide batch_size ({batch_size}), "
                f"got {self.patterns_per_step}"
            )
        try:
            choices.check_schedule(self.warmup, self.cooldown)
        except LeanftError as error:
            raise LeanftError(f"dropbp.{error}") from None
