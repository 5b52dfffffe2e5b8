"""The maintained fused linear-cross-entropy kernels (cut-cross-entropy, liger-kernel) behind leanft's chunked loss.

On CUDA, ``loss_kernel="auto"`` uses cut-cross-entropy when it is installed, else liger-kernel, else leanft's own
chunked loss (``leanft.core.chunked_loss``). Elsewhere ``auto`` keeps leanft's: cut-cross-entropy's CPU path
(``impl="torch_compile"``) materialises most of the logits, and liger-kernel's Triton kernels need a GPU. Every
path returns the same quantity: the sum of the cross-entropy of ``rows @ weight^T + bias`` against ``targets``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from leanft.core.errors import LeanftError

LEANFT = "leanft"
MODULES = {"cut-cross-entropy": "cut_cross_entropy", "liger-kernel": "liger_kernel"}  # in auto's order of choice
LOSS_KERNELS = ("auto", LEANFT, *MODULES)


def installed(package: str) -> bool:
    """Whether the loss-kernel package ``package`` (a name in ``MODULES``) can be imported."""
    return importlib.util.find_spec(MODULES[package]) is not None


def select_loss_kernel(
    requested: str, device_type: str, is_installed: Callable[[str], bool] = installed, head_bias: bool = False
) -> str:
    """The loss kernel to run for ``requested`` on a ``device_type`` device; a LeanftError when it cannot run.

    ``head_bias``: the output head has a bias, which cut-cross-entropy does not take.
    """
    if requested not in LOSS_KERNELS:
        raise LeanftError(f"loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got {requested!r}")
    usable = [name for name in MODULES if not (head_bias and name == "cut-cross-entropy")]
    if requested == "auto":
        found = [name for name in usable if device_type == "cuda" and is_installed(name)]
        return found[0] if found else LEANFT
    if requested != LEANFT and requested not in usable:
        raise LeanftError(f"loss_kernel={requested} does not take the output head's bias: use auto")
    if requested == "liger-kernel" and device_type != "cuda":
        raise LeanftError(f"loss_kernel=liger-kernel runs on CUDA only, this machine has {device_type}: use auto")
    if requested != LEANFT and not is_installed(requested):
        raise LeanftError(f"loss_kernel={requested} needs its package: pip install {requested}")
    return requested


def fused_cross_entropy_sum(
    kernel: str, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Sum over ``rows`` of the cross-entropy of their logits against ``targets``, by a maintained kernel."""
    if kernel == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if rows.device.type == "cuda" else "torch_compile"
        if bias is not None:
            raise LeanftError("cut-cross-entropy does not take an output head's bias: use leanft's chunked loss")
        return linear_cross_entropy(rows, weight, targets, shift=False, reduction="sum", impl=impl)
    if kernel == "liger-kernel":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, rows, targets, bias)
    raise LeanftError(f"no fused loss kernel named {kernel!r}: use one of {', '.join(MODULES)}")
