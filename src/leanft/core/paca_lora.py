"""PaCA's update as an exact LoRA: the trained columns are a rank-r update with a column selector for ``A``.

A PaCA layer (also S2FT's and QPaCA's) computes ``W`` with its columns ``idx`` replaced by ``P``, so its update
is ``dW = (P - W[:, idx]) S`` with ``S`` the r x in selector (``S[j, idx[j]] = 1``). That is LoRA's ``B A`` with
``A = S`` and ``B = P - W[:, idx]`` at scale 1 (``lora_alpha = r``). ``A``'s entries are 0 and 1, so ``A x`` is
``x[..., idx]`` exactly and the LoRA forward differs from the merged weight's only by the rounding of one more
addition. Tensors in, tensors out: ``leanft.run.export`` writes them in peft's adapter format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanft.core.errors import LeanftError
from leanft.core.paca import paca_modules
from leanft.core.paca_layer import PacaLinear


@dataclass(frozen=True)
class LoraFactors:
    """One layer's update as LoRA factors, ``dW = b @ a`` (fp32), in the layer's ``out x in`` orientation."""

    a: torch.Tensor  # rank x in: one-hot rows selecting the trained columns (zero rows where padded)
    b: torch.Tensor  # out x rank: the trained columns minus the original ones (zero columns where padded)
    transposed: bool  # the module stores its weight as in x out (GPT-2's Conv1D: peft's fan_in_fan_out)

    @property
    def rank(self) -> int:
        """The number of rows of ``a`` (the layer's LoRA rank)."""
        return int(self.a.shape[0])


def lora_factors(
    index: torch.Tensor, trained: torch.Tensor, original: torch.Tensor, in_features: int, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in fp32 with ``B @ A`` zero except at the columns ``index``, where it is ``trained - original``.

    ``trained`` and ``original`` are out x r (r = ``index.numel()``); ``rank`` (at least r) pads ``A`` with zero
    rows and ``B`` with zero columns, which changes nothing in ``B @ A``.
    """
    columns = int(index.numel())
    rank = columns if rank is None else rank
    if trained.shape != original.shape or trained.shape[1] != columns:
        raise LeanftError(f"trained and original columns must both be out x {columns}, got {tuple(trained.shape)} "
                          f"and {tuple(original.shape)}")
    if rank < columns:
        raise LeanftError(f"rank {rank} is below the {columns} trained columns: pass a rank of at least {columns}")
    a = torch.zeros(rank, in_features, dtype=torch.float32)
    a[torch.arange(columns), index.cpu().long()] = 1.0
    b = torch.zeros(trained.shape[0], rank, dtype=torch.float32)
    b[:, :columns] = trained.detach().cpu().float() - original.detach().cpu().float()
    return a, b


def _trained_columns(layer: PacaLinear) -> torch.Tensor:
    """The columns the merged weight holds: ``P`` in the base weight's dtype (as ``merged_weight`` writes it)."""
    return layer.paca_weight.detach().to(layer.paca_original.dtype)


def paca_as_lora(model: nn.Module, uniform_rank: bool = False) -> dict[str, LoraFactors]:
    """Every PaCA layer of ``model`` (PaCA, S2FT, QPaCA) as exact LoRA factors, by module name.

    Each layer keeps its own rank (its number of trained columns) unless ``uniform_rank``: then every layer is
    padded to the largest. The update is taken against the base weight the layer trained on (for QPaCA the
    dequantized 4-bit weight). A trained bias has no LoRA form: it is refused, and so is a model without PaCA
    layers.
    """
    layers = paca_modules(model)
    if not layers:
        raise LeanftError("the model has no PaCA layers to convert: apply_paca / apply_s2ft (or load_paca) first")
    biased = [name for name, layer in layers.items() if layer.bias is not None and layer.bias.requires_grad]
    if biased:
        raise LeanftError(f"{biased[0]} trains its bias, which a LoRA adapter cannot hold: merge the model instead "
                          "(merge_paca, or leanft export format=hf)")
    rank = max(layer.r for layer in layers.values()) if uniform_rank else None
    factors = {}
    for name, layer in layers.items():
        a, b = lora_factors(layer.paca_index, _trained_columns(layer), layer.paca_original, layer.in_features, rank)
        factors[name] = LoraFactors(a=a, b=b, transposed=layer.source == "conv1d")
    return factors
