"""The optimizer of a run: AdamW (the Trainer's), or APOLLO / APOLLO-Mini from the ``apollo-torch`` package.

APOLLO (Zhu et al., 2024) keeps AdamW's moments in a random low-rank projection of each weight matrix's
gradient and uses them only to scale the raw gradient (per channel, or per tensor for APOLLO-Mini), so its
optimizer state is a fraction of AdamW's. leanft builds ``apollo_torch.APOLLOAdamW`` with the projected group on
every trainable matrix larger than the rank, and plain AdamW updates for the rest (biases, norms, PaCA's
narrow column blocks under full APOLLO); the settings are the paper's and transformers' defaults.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING

from leanft.core.errors import LeanftError

if TYPE_CHECKING:  # torch is imported where an optimizer is built, so checking a name stays light
    import torch
    from torch import nn

OPTIMIZERS = ("adamw", "apollo", "apollo-mini")
APOLLO_SETTINGS = {
    "apollo": {"rank": 128, "proj": "random", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200,
               "proj_type": "std"},
    "apollo-mini": {"rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0, "update_proj_gap": 200,
                    "proj_type": "std"},
}


def optimizer_problem(name: str) -> str | None:
    """Why the optimizer ``name`` cannot be used here (None when it can)."""
    if name not in OPTIMIZERS:
        return f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}"
    if name != "adamw" and importlib.util.find_spec("apollo_torch") is None:
        return f"optimizer={name} needs the apollo-torch package: pip install leanft[apollo]"
    return None


def apollo_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``APOLLOAdamW`` over ``model``'s trainable parameters, the projected group on matrices wider than the rank."""
    problem = optimizer_problem(name)
    if problem or name == "adamw":
        raise LeanftError(problem or "apollo_optimizer builds APOLLO or APOLLO-Mini, not adamw")
    from apollo_torch import APOLLOAdamW

    settings = APOLLO_SETTINGS[name]
    trainable = [p for p in model.parameters() if p.requires_grad]
    projected = [p for p in trainable if p.dim() == 2 and min(p.shape) > settings["rank"]]
    rest = [p for p in trainable if all(p is not q for q in projected)]
    groups = [{"params": rest}] if rest else []
    groups += [{"params": projected, **settings}] if projected else []
    return APOLLOAdamW(groups, lr=lr, weight_decay=weight_decay)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (``name='adamw'``) or APOLLO / APOLLO-Mini over ``model``'s trainable parameters."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return apollo_optimizer(model, name, lr, weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state (moments, projections)."""
    import torch

    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def checkpoint_globals(name: str) -> contextlib.AbstractContextManager:
    """Allow ``torch.load(weights_only=True)`` (the Trainer's resume) to read this optimizer's saved state.

    APOLLO keeps a ``GradientProjector`` (plain numbers and its projection's seed) in each projected parameter's
    state; only that class is allowed, and only while a run reads back its own checkpoint.
    """
    if name == "adamw":
        return contextlib.nullcontext()
    import torch
    from apollo_torch.random_projector import GradientProjector

    return torch.serialization.safe_globals([GradientProjector])
