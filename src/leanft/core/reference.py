"""The reference model of preference tuning without a second copy: the policy itself, with what it trained off.

``reference_pass(model)`` is a context manager inside which ``model`` computes exactly as its base model did:
PaCA and S2FT layers use their original columns (``leanft.core.paca.paca_disabled``), a peft model runs with its
adapters disabled (peft's ``disable_adapter``). A DropBP controller on the model keeps the pattern of the training
forward it interrupts, so that a backward still to come (and its recomputation under activation checkpointing)
drops the same branches. ``ReferenceView`` wraps it as a module a trainer can call as its reference model.
Full fine-tuning changes every weight, so it has no such pass: its reference log-probs are computed before
training instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from leanft.core.dropbp import CONTROLLER_ATTRIBUTE
from leanft.core.errors import LeanftError
from leanft.core.paca import paca_disabled, paca_modules


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def has_reference_pass(model: nn.Module) -> bool:
    """Whether ``model`` can compute as its base without a copy (PaCA / S2FT layers, or a peft adapter)."""
    return bool(paca_modules(model)) or _is_peft_model(model)


@contextlib.contextmanager
def reference_pass(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes as its untrained base; a DropBP pattern in flight is kept."""
    if _is_peft_model(model):
        switch = model.disable_adapter()
    elif paca_modules(model):
        switch = paca_disabled(model)
    else:
        raise LeanftError("this model has no trained part to switch off (neither PaCA / S2FT layers nor a peft "
                          "adapter): compute the reference before training instead")
    controller = getattr(model, CONTROLLER_ATTRIBUTE, None)
    kept = controller.pattern_preserved() if controller is not None else contextlib.nullcontext()
    with kept, switch:
        yield


class ReferenceView(nn.Module):
    """A reference model that is a view of ``policy``: calling it calls ``policy`` inside ``reference_pass``.

    It holds no parameters of its own (the policy is not registered as a submodule), so nothing that walks a
    model's parameters or moves it to a device sees a second copy.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not has_reference_pass(policy):
            raise LeanftError("ReferenceView needs a model with PaCA / S2FT layers or a peft adapter")
        self.__dict__["policy"] = policy  # not a submodule
        self.config = policy.config

    def __call__(self, *args, **kwargs):
        """``policy(*args, **kwargs)`` as the base model computes it."""
        with reference_pass(self.policy):
            return self.policy(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The same as calling the view."""
        return self(*args, **kwargs)
