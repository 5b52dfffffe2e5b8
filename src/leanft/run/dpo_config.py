"""``dpo.*``: the preference-tuning settings of a run (a group of ``leanft.run.config.TrainConfig``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from leanft.core.errors import LeanftError
from leanft.run.options import doc
from leanft.run.tasks import builtin_task

OBJECTIVES = ("sft", "dpo")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # TRL's DPO losses over one preference pair each
DPO_LR_DIVISOR = 10  # the default learning rate of preference tuning: the method's divided by this (DPO is usually
# trained at about a tenth of the supervised rate; TRL's LoRA at the supervised 3e-3 diverged within 3 steps here)


@dataclass
class DPOKeys:
    """DPO settings (``dpo.KEY=VALUE`` on the command line); used with ``objective=dpo``."""

    beta: float = doc("strength of the pull towards the reference model (DPO's beta; smaller = further from it)", 0.1)
    loss_type: str = doc(
        " | ".join(LOSS_TYPES) + ": DPO's logistic loss, its hinge form, or IPO's squared loss", "sigmoid"
    )

    def validate(self) -> None:
        """Raise a LeanftError naming the first bad DPO value."""
        if not self.beta > 0:
            raise LeanftError(f"dpo.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise LeanftError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")


# keys of supervised fine-tuning that a preference run cannot honour, and why (checked before any model loads)
SFT_ONLY = {
    "packing": "packing=true concatenates examples into blocks; a preference pair is one chosen and one rejected "
               "answer to the same prompt: use packing=false",
    "streaming": "streaming=true is not supported with objective=dpo (pairs are checked and tokenized up front): "
                 "use streaming=false",
    "columns": "columns= maps instruction-tuning fields; preference records need prompt, chosen and rejected "
               "(drop columns=)",
    "fsdp": "fsdp=true is not supported with objective=dpo: run with DDP (fsdp=false) or in one process",
    "quantize": "quantize=4bit is not supported with objective=dpo yet: use quantize=null",
    "compile": "compile=true is not supported with objective=dpo yet: use compile=false",
}  # fmt: skip


def check_objective(config) -> None:
    """Raise a LeanftError for an ``objective`` the run cannot train (``config``: a ``TrainConfig``)."""
    if config.objective not in OBJECTIVES:
        raise LeanftError(f"objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    task = builtin_task(config.data)
    wanted = task.objective if task is not None else None
    if config.objective == "dpo" and wanted == "sft":
        raise LeanftError(f"objective=dpo needs preference data, and data={config.data} is an instruction task: "
                          "use data=builtin:prefs-arith or a file of {prompt, chosen, rejected} records")
    if wanted is not None and wanted != config.objective:
        raise LeanftError(f"data={config.data} is a task for objective={wanted}: set objective={wanted} or pick "
                          "another task")
    if config.objective != "dpo":
        return
    config.dpo.validate()
    for key, why in SFT_ONLY.items():
        if getattr(config, key) not in (False, None):
            raise LeanftError(why)
    if importlib.util.find_spec("trl") is None:
        raise LeanftError("objective=dpo trains with TRL's DPOTrainer: pip install leanft[trl]")
