"""DropBP as a ``transformers.TrainerCallback``: allocation during training, rates kept in checkpoints.

Add it to any ``Trainer`` (or TRL ``SFTTrainer``)::

    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=args.seed)
    trainer = Trainer(model=model, args=args, ..., callbacks=[leanft.DropBPCallback(ctrl, allocate_at=0.1)])

Patterns are drawn by the controller at each training forward. The callback runs the sensitivity-based
allocation once, after ``allocate_at`` of the optimizer steps (on ``allocation_batch``, or else the first batch
of the training data loader), gives every data-parallel rank rank 0's rates, and stores the controller's state
(seed, step, rates) in ``trainer_state.json`` of every checkpoint, from which it is restored on resume.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from leanft.distributed import broadcast_from_main, prepare_distributed_dropbp
from leanft.dropbp import DropBP
from leanft.errors import LeanftError

logger = logging.getLogger(__name__)


def _first_batch(loader) -> dict:
    """The first batch of ``loader``, leaving the global RNG (and so the data order) untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        batch = next(iter(loader))
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return batch


class DropBPCallback(TrainerCallback, ExportableState):
    """Runs DropBP's allocation inside ``Trainer`` and saves / restores its state with checkpoints."""

    def __init__(
        self, controller: DropBP | None = None, allocate_at: float | None = 0.1, allocation_batch: dict | None = None
    ) -> None:
        if allocate_at is not None and not 0.0 <= allocate_at <= 1.0:
            raise LeanftError(f"allocate_at must be a fraction of training in [0, 1] (or None), got {allocate_at!r}")
        self.controller = controller
        self.allocate_at = allocate_at
        self.allocation_batch = allocation_batch
        self.allocated = False

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps: the controller's seed, step and rates, and whether allocation ran."""
        dropbp = None if self.controller is None else self.controller.state_dict()
        return {"args": {}, "attributes": {"dropbp": dropbp, "allocated": self.allocated}}

    def _allocation_step(self, state: TrainerState) -> int | None:
        if self.allocate_at is None or self.controller is None or self.controller.drop_rate == 0:
            return None
        return round(self.allocate_at * state.max_steps)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Restore the controller's state on resume; check a distributed run's DDP settings and DropBP state."""
        if self.controller is None:
            raise LeanftError("DropBPCallback needs the controller returned by leanft.apply_dropbp")
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict) and saved.get("attributes", {}).get("dropbp"):
            self.controller.load_state_dict(saved["attributes"]["dropbp"])
            self.allocated = bool(saved["attributes"].get("allocated"))
            logger.info("DropBP state restored at step %d (rates %s)", state.global_step, self.controller.rates)
        prepare_distributed_dropbp(self.controller, args, kwargs["model"])

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Run the allocation once the configured share of training is done."""
        at = self._allocation_step(state)
        if self.allocated or at is None or state.global_step < at:
            return
        batch = self.allocation_batch if self.allocation_batch is not None else _first_batch(kwargs["train_dataloader"])
        rates = self.controller.allocate(batch)
        self.controller.set_rates(broadcast_from_main(rates))
        self.allocated = True
        logger.info("DropBP allocation at step %d: rates %s", state.global_step, self.controller.rates)
