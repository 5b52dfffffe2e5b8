"""DropBP as a ``transformers.TrainerCallback``: allocation during training, rates kept in checkpoints.

Add it to any ``Trainer`` (or TRL ``SFTTrainer``)::

    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=args.seed)
    trainer = Trainer(model=model, args=args, ..., callbacks=[leanft.DropBPCallback(ctrl, allocate_at=0.1)])

Patterns are drawn by the controller at each training forward. The callback runs the sensitivity-based
allocation once, after ``allocate_at`` of the optimizer steps (on ``allocation_batch``, or else the first batch
of the training data loader), gives every data-parallel rank rank 0's rates, and stores the controller's state
(seed, step, rates, FLOPs skipped so far) in ``trainer_state.json`` of every checkpoint, from which it is
restored on resume. A ``DropSchedule(warmup, cooldown)`` (shares of the optimizer steps) pauses dropping at the
start / end of training; the schedule is a function of the optimizer step, so a resumed run follows it exactly.
With ``auto=AutoRate(threshold, ...)`` the callback also picks the drop rate (``leanft.core.autorate``) at the
allocation step (step 0 without allocation); nothing is dropped before that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from leanft.core.allocate import allocate_rates
from leanft.core.autorate import AutoRate, choose_rate
from leanft.core.choices import check_schedule
from leanft.core.distributed import broadcast_from_main, check_same_on_all_ranks, prepare_distributed_dropbp
from leanft.core.dropbp import DropBP
from leanft.core.errors import LeanftError
from leanft.core.rng import preserved_rng

logger = logging.getLogger(__name__)


def _first_batch(loader) -> dict:
    """The first batch of ``loader``, leaving the global RNG (and so the data order) untouched."""
    with preserved_rng():
        return next(iter(loader))


def drops_at(step: int, max_steps: int, warmup: float = 0.0, cooldown: float = 0.0) -> bool:
    """Whether optimizer step ``step`` (0-based) of ``max_steps`` drops under a warm-up / cool-down schedule."""
    return round(warmup * max_steps) <= step < max_steps - round(cooldown * max_steps)


@dataclass(frozen=True)
class DropSchedule:
    """When DropBP drops: not in the first ``warmup`` nor in the last ``cooldown`` share of the steps."""

    warmup: float = 0.0
    cooldown: float = 0.0

    def __post_init__(self) -> None:
        check_schedule(self.warmup, self.cooldown)

    def drops_at(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step ``step`` (0-based) of ``max_steps`` drops."""
        return drops_at(step, max_steps, self.warmup, self.cooldown)


class DropBPCallback(TrainerCallback, ExportableState):
    """Runs DropBP's allocation and rate schedule inside ``Trainer``; saves / restores its state with checkpoints."""

    def __init__(
        self,
        controller: DropBP | None = None,
        allocate_at: float | None = 0.1,
        allocation_batch: dict | None = None,
        schedule: DropSchedule | None = None,
        allocation: str = "leanft",
        auto: AutoRate | None = None,
    ) -> None:
        """``schedule``: no drops in its warm-up and cool-down shares of the steps; ``auto``: pick the rate
        (``leanft.core.autorate``) at the allocation step, or at step 0 without allocation."""
        if allocate_at is not None and not 0.0 <= allocate_at <= 1.0:
            raise LeanftError(f"allocate_at must be a fraction of training in [0, 1] (or None), got {allocate_at!r}")
        self.controller = controller
        self.allocate_at = allocate_at
        self.allocation_batch = allocation_batch
        self.schedule, self.allocation, self.auto = schedule or DropSchedule(), allocation, auto
        self.allocated = False
        self.auto_choice: dict | None = None

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps: the controller's state, whether allocation ran, the automatic rate."""
        dropbp = None if self.controller is None else self.controller.state_dict()
        return {"args": {}, "attributes": {"dropbp": dropbp, "allocated": self.allocated, "auto": self.auto_choice}}

    def _decision_step(self, state: TrainerState) -> int | None:
        """The step that allocates rates and / or picks the automatic rate (None: neither happens)."""
        if self.controller is None or (self.controller.drop_rate == 0 and self.auto is None):
            return None
        if not self._allocates():
            return 0 if self.auto is not None else None
        return round(self.allocate_at * state.max_steps)

    def _allocates(self) -> bool:
        """Whether this run allocates per-branch rates."""
        return self.allocate_at is not None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Restore the controller's state on resume; check a distributed run's DDP settings and DropBP state."""
        if self.controller is None:
            raise LeanftError("DropBPCallback needs the controller returned by leanft.apply_dropbp")
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict) and saved.get("attributes", {}).get("dropbp"):
            self.controller.load_state_dict(saved["attributes"]["dropbp"])
            self.allocated = bool(saved["attributes"].get("allocated"))
            self.auto_choice = saved["attributes"].get("auto")
            logger.info("DropBP state restored at step %d (rates %s)", state.global_step, self.controller.rates)
        prepare_distributed_dropbp(self.controller, args, kwargs["model"], kwargs["optimizer"])

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Allocate / pick the automatic rate once it is time; pause or resume dropping as the schedule says.

        With an automatic rate nothing is dropped before it is chosen.
        """
        at = self._decision_step(state)
        if not self.allocated and at is not None and state.global_step >= at:
            self._decide(state, kwargs.get("train_dataloader"))
        waiting = self.auto is not None and not self.allocated
        self.controller.paused = waiting or not self.schedule.drops_at(state.global_step, state.max_steps)

    def _decide(self, state: TrainerState, loader) -> None:
        """Run the allocation and / or the automatic rate choice; every rank gets rank 0's result."""
        ctrl = self.controller
        batch = self.allocation_batch if self.allocation_batch is not None else _first_batch(loader)
        if self._allocates():
            allocate_rates(ctrl, batch, allocation=self.allocation)
        if self.auto is not None:
            sensitivities = ctrl.sensitivities if self._allocates() else None
            fidelity_batch = self.auto.batch if self.auto.batch is not None else batch
            choice = choose_rate(ctrl, fidelity_batch, self.auto, sensitivities, self.allocation)
            self.auto_choice = broadcast_from_main(choice)
            ctrl.drop_rate = self.auto_choice["rate"]
            logger.info("DropBP rate=auto at step %d: %s", state.global_step, self.auto_choice)
        ctrl.set_rates(broadcast_from_main(ctrl.rates))
        self.allocated = True
        logger.info("DropBP allocation at step %d: rates %s", state.global_step, ctrl.rates)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Check that every data-parallel rank drew the same patterns so far (a no-op in one process)."""
        check_same_on_all_ranks(self.controller.pattern_state(), f"DropBP patterns at step {state.global_step}")
