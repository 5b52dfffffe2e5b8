"""A ``leanft train`` run as one object: what it trains on, what was set up for it, and what it measured, by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from leanft.core.callback import DropBPCallback
from leanft.core.dropbp import DropBP
from leanft.run.callbacks import HeldoutCurveCallback, InterruptCallback, RunLogCallback
from leanft.run.config import TrainConfig
from leanft.run.data import TokenizedStream
from leanft.run.trainer import LeanftTrainer


@dataclass
class RunInputs:
    """What a run trains and evaluates on, known good before the run folder is touched."""

    run_dir: Path
    model: object
    tokenizer: object
    features: list | TokenizedStream  # a stream with streaming=true
    eval_records: list
    eval_features: list
    data_report: dict  # examples dropped or truncated by tokenization, per split


@dataclass
class RunCallbacks:
    """The callbacks a run adds to its Trainer, by role (``curve`` with ``eval_steps``, ``dropbp`` with DropBP)."""

    log: RunLogCallback
    interrupt: InterruptCallback
    curve: HeldoutCurveCallback | None = None
    dropbp: DropBPCallback | None = None

    def all(self) -> list:
        """Those present, in the order the Trainer calls them."""
        return [c for c in (self.log, self.interrupt, self.curve, self.dropbp) if c is not None]


@dataclass
class Run:
    """One run: its config and inputs, the trainer and DropBP controller set up for it, and its results."""

    config: TrainConfig
    inputs: RunInputs
    trainer: LeanftTrainer
    controller: DropBP | None
    callbacks: RunCallbacks
    before: dict = field(default_factory=dict)  # held-out metrics of the untrained model
    after: dict = field(default_factory=dict)  # and of the trained one
    wall_s: float = 0.0  # training time, evaluations included

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C stopped training (a checkpoint was saved first)."""
        return self.callbacks.interrupt.interrupted

    @property
    def heldout_curve(self) -> list[dict]:
        """Held-out loss every ``eval_steps`` steps: ``{"step", "time_s", "heldout_loss"}`` each."""
        return self.callbacks.curve.points if self.callbacks.curve is not None else []

    @property
    def dropbp_auto(self) -> dict | None:
        """What ``dropbp.rate=auto`` chose (None without it)."""
        return self.callbacks.dropbp.auto_choice if self.callbacks.dropbp is not None else None

    def summary(self) -> dict:
        """The run's ``summary.json``."""
        return {
            **run_report(self.config, self.trainer, self.controller, self.callbacks, self.wall_s),
            "padding_share": round(self.trainer.data_collator.padding_share(), 4),
            "accuracy_before": self.before["accuracy"],
            "accuracy_after": self.after["accuracy"],
            "heldout_loss_before": self.before["loss"],
            "heldout_loss_after": self.after["loss"],
            "num_eval": len(self.inputs.eval_records),
            "heldout_curve": self.heldout_curve,
            "data": self.inputs.data_report,
            "run_dir": str(self.inputs.run_dir),
        }


def run_report(config: TrainConfig, trainer, controller: DropBP | None, callbacks: RunCallbacks, wall: float) -> dict:
    """What every run's summary reports first: method, learning rate, DropBP's settings and realised share, steps,
    time, throughput and precision."""
    dropbp = callbacks.dropbp
    return {
        "method": config.method,
        "lr": config.learning_rate(),
        "dropbp_rate": controller.drop_rate if controller is not None else 0.0,
        "dropbp_auto": dropbp.auto_choice if dropbp is not None else None,
        "dropbp_rates": controller.rates if controller is not None else None,
        "dropbp_sensitivities": controller.sensitivities if controller is not None else None,
        "dropbp_skipped_share": controller.realised_drop_fraction() if controller is not None else 0.0,
        "steps": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(callbacks.log.tokens_per_second(trainer.state), 1),
        "precision": config.precision(),
    }
