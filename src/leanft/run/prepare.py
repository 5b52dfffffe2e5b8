"""``prepare_model``: the one set-up of a loaded model that ``train`` and ``fidelity`` run, in named steps.

The steps and their order (each one only where the config asks for it):

1. ``method``: the fine-tuning method attached (PaCA's data-aware columns scored on ``calibration``);
2. ``precision``: with bf16 compute, the trainable parameters in fp32 (master copies), the frozen base in bf16;
3. ``compile``: each attention and MLP branch compiled, before DropBP, whose wrappers stay outside the graphs;
4. ``dropbp``: the DropBP controller, at the config's starting rate and with its sampler;
5. ``checkpointing``: activation checkpointing (non-reentrant, so dropped branches still build no graph).

Sharding (FSDP) comes last and belongs to the trainer: ``train`` shards after it has probed the model's
attention for padding-free batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from leanft.core.compiled import compile_branches
from leanft.core.dropbp import DropBP, apply_dropbp
from leanft.core.precision import trainable_in_fp32
from leanft.run.config import TrainConfig
from leanft.run.methods import attach_method

STEPS = ("method", "precision", "compile", "dropbp", "checkpointing")


@dataclass
class PreparedModel:
    """A model set up for training: the model, its DropBP controller (None without DropBP) and the steps run."""

    model: nn.Module
    controller: DropBP | None
    steps: list[str] = field(default_factory=list)


def prepare_model(
    model: nn.Module, config: TrainConfig, dropbp_rate: float | None = None
) -> PreparedModel:
    """Run ``STEPS`` on a loaded ``model`` as ``config`` says. ``dropbp_rate`` attaches DropBP at that rate whatever
    the config's (a study that sets rates itself); else DropBP is on where the config's starting rate is > 0."""
    prepared = PreparedModel(attach_method(model, config.method, config.method_settings()), None, ["method"])
    if config.uses_bf16():
        trainable_in_fp32(prepared.model)
        prepared.steps.append("precision")
    if config.compile:
        compile_branches(prepared.model)
        prepared.steps.append("compile")
    rate = config.dropbp.initial_rate() if dropbp_rate is None else dropbp_rate
    if rate > 0 or dropbp_rate is not None:
        prepared.controller = apply_dropbp(prepared.model, drop_rate=rate, seed=config.seed,
                                           sampler=config.dropbp.sampler)  # fmt: skip
        prepared.steps.append("dropbp")
    if config.gradient_checkpointing:
        prepared.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        prepared.steps.append("checkpointing")
    return prepared
