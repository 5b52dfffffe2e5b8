"""The maintained fused linear-cross-entropy kernels (cut-cross-entropy, liger-kernel) behind leanft's chunked loss.

On CUDA, ``loss_kernel="auto"`` uses cut-cross-entropy when it is installed, else liger-kernel, else leanft's own
chunked loss (``leanft.core.chunked_loss``). Elsewhere ``auto`` keeps leanft's: cut-cross-entropy's CPU path
(``impl="torch_compile"``) materialises most of the logits, and liger-kernel's Triton kernels need a GPU. Every
path returns the same quantity: the sum of the cross-entropy of ``rows @ weight^T + bias`` against ``targets``.
"""

from __future__ import annotations

import torch

from leanft.core.choices import LOSS_MODULES
from leanft.core.errors import LeanftError


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
    raise LeanftError(f"no fused loss kernel named {kernel!r}: use one of {', '.join(LOSS_MODULES)}")
