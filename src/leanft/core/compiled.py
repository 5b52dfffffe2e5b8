"""Compiled residual branches: ``torch.compile`` on each attention and MLP branch, not on the whole model.

A whole-model compile sees every DropBP pattern as a new graph and falls back to eager after a few; a branch
compiled on its own has one graph with gradients and one without (a dropped branch runs under ``no_grad``),
whatever the pattern. Call ``compile_branches`` after the method is attached and before ``apply_dropbp``, so
that DropBP's wrapper stays outside the compiled code.
"""

from __future__ import annotations

import torch
from torch import nn

from leanft.core.blocks import find_branches
from leanft.core.compat import allow_retained_graphs_in_compiled_code
from leanft.core.dropbp import CONTROLLER_ATTRIBUTE
from leanft.core.errors import LeanftError
from leanft.core.patching import patch_forward

COMPILED_ATTRIBUTE = "_leanft_compiled_forward"


def compile_branches(model: nn.Module, backend: str = "inductor", blocks: str | None = None) -> int:
    """Compile the forward of every attention and MLP branch of ``model`` in place; returns how many.

    ``backend`` is a ``torch.compile`` backend; ``blocks`` names the decoder-block list where it is not found.
    """
    if getattr(model, CONTROLLER_ATTRIBUTE, None) is not None:
        raise LeanftError("compile the branches before apply_dropbp, so that DropBP's wrapper stays outside them")
    modules = [module for branch in find_branches(model, blocks=blocks) for module in branch.modules]
    allow_retained_graphs_in_compiled_code()  # DropBP's sensitivity measurement retains the graph
    for module in modules:
        if COMPILED_ATTRIBUTE not in module.__dict__:
            setattr(module, COMPILED_ATTRIBUTE, patch_forward(module, torch.compile(module.forward, backend=backend)))
    return len(modules)


def uncompile_branches(model: nn.Module) -> None:
    """Undo ``compile_branches``: every branch runs its eager forward again (remove DropBP first)."""
    if getattr(model, CONTROLLER_ATTRIBUTE, None) is not None:
        raise LeanftError("remove DropBP first (controller.remove()): its wrappers hold the compiled forwards")
    for module in model.modules():
        if COMPILED_ATTRIBUTE in module.__dict__:
            module.__dict__.pop(COMPILED_ATTRIBUTE).restore()
