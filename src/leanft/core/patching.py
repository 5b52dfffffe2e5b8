"""Replacing a module's ``forward`` on the instance, and putting back exactly what was there: the one idiom that
compiled branches, DropBP and the chunked loss use.

They stack in this order, each wrapping what the one before left: ``compile_branches`` (the compiled forward,
innermost), then ``apply_dropbp`` (runs it under ``no_grad`` when its branch is dropped), then, per step, the
chunked loss's identity output head (a module none of the others patch). Each handle restores the forward it
replaced, so they come off in the reverse order: ``DropBP.remove()`` before ``uncompile_branches``
(``compile_branches`` refuses a model that already has DropBP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn


@dataclass
class PatchedForward:
    """A replaced ``forward``: the module, and the instance attribute it had before (None: the class's)."""

    module: nn.Module
    previous: Callable | None

    def restore(self) -> None:
        """Put the previous forward back (with None, the class's own ``forward`` shows through again)."""
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


def patch_forward(module: nn.Module, replacement: Callable) -> PatchedForward:
    """Make ``replacement`` the forward of this ``module`` instance; returns the handle that undoes it."""
    handle = PatchedForward(module, module.__dict__.get("forward"))
    module.forward = replacement
    return handle


@contextlib.contextmanager
def patched_forward(module: nn.Module, replacement: Callable) -> Iterator[nn.Module]:
    """Inside the block ``module`` runs ``replacement`` as its forward; restored on exit."""
    handle = patch_forward(module, replacement)
    try:
        yield module
    finally:
        handle.restore()
