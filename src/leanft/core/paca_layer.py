"""The PaCA layer: a frozen weight ``W`` (out x in) whose columns ``paca_index`` are replaced by the trainable
``paca_weight`` ``P`` (out x r) (Woo et al., ICLR 2025).

Forward is one matmul with ``W`` whose columns ``idx`` are replaced by ``P``; backward gives
``grad_x = grad_y @ W_eff`` and ``grad_P = grad_y^T @ x[..., idx]`` and saves only ``x[..., idx]`` (never the full
input) besides the parameters themselves. ``leanft.core.paca`` puts these layers into a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanft.core.compat import tensor_version


def in_place_columns(weight: torch.Tensor) -> bool:
    """Whether ``P`` is kept written into ``W`` itself: on the CPU, outside ``torch.compile``."""
    return weight.device.type == "cpu" and not torch.compiler.is_compiling()


def effective_weight(
    weight: torch.Tensor | Callable[[], torch.Tensor], index: torch.Tensor, paca_weight: torch.Tensor
) -> torch.Tensor:
    """``W`` with ``P`` in columns ``index``: ``W`` itself on the CPU when it already holds them, else a copy.

    ``weight`` may be a provider returning a fresh dense ``W`` (QPaCA dequantizes its 4-bit base so): ``P`` is
    then written into that tensor in place.

    ``PacaLinear`` writes ``P`` into ``W`` in place on the CPU, where comparing r columns costs far less than
    copying ``W``; on accelerators the copy is cheap and a comparison would stall the stream.
    """
    if callable(weight):
        return weight().index_copy_(1, index, paca_weight)
    if in_place_columns(weight) and torch.equal(weight.index_select(1, index), paca_weight):
        return weight
    return weight.index_copy(1, index, paca_weight)


@dataclass(frozen=True)
class Held:
    """A weight its caller knows to hold ``P`` in the trained columns already (``PacaLinear.hold_columns``)."""

    weight: torch.Tensor


class PacaMatmul(torch.autograd.Function):
    """``y = x @ W_eff^T + b`` with ``W_eff = W`` whose columns ``index`` are ``P``; saves only ``x[..., index]``.

    ``W`` is a tensor, a provider of one (see ``effective_weight``) or ``Held(W)``. A provider is called again in
    backward, so the dense weight it builds is never kept between forward and backward. With ``Held`` neither pass
    compares ``W``'s columns with ``P`` (autograd still refuses a backward whose saved ``W`` was written in place
    after the forward).
    """

    @staticmethod
    def forward(ctx, x, paca_weight, weight, index, bias):  # noqa: D102 - autograd protocol
        # x's columns as r rows (x^T gathered by rows is ~2x faster on the CPU than gathering columns of x)
        selected = x.reshape(-1, x.shape[-1]).t().index_select(0, index) if ctx.needs_input_grad[1] else None
        holds = ctx.holds = isinstance(weight, Held)
        weight = weight.weight if holds else weight
        ctx.provider = weight if callable(weight) else None
        ctx.save_for_backward(selected, paca_weight, None if ctx.provider else weight, index)
        return F.linear(x, weight if holds else effective_weight(weight, index, paca_weight), bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102 - autograd protocol
        selected, paca_weight, weight, index = ctx.saved_tensors
        grad_x = grad_p = grad_bias = None
        flat = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ (weight if ctx.holds else effective_weight(ctx.provider or weight, index, paca_weight))
        if ctx.needs_input_grad[1]:  # (x_sel^T @ grad_y)^T: ~5x faster on the CPU than grad_y^T @ x_sel for r << out
            grad_p = (selected @ flat).t()
        if ctx.needs_input_grad[4]:
            grad_bias = flat.sum(0)
        return grad_x, grad_p, None, None, grad_bias


class PacaLinear(nn.Module):
    """A linear layer whose input columns ``paca_index`` are trained through ``paca_weight``.

    On the CPU the frozen ``weight`` doubles as ``W_eff``: a forward writes ``paca_weight`` into its columns
    ``paca_index`` in place when they may differ (after an optimizer step, say), which costs r columns instead of
    a full copy of ``W`` per matmul (see ``hold_columns``). The original columns stay in the ``paca_original``
    buffer, so disabling, removing and re-indexing restore them exactly.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, source: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.source = source  # "linear" | "conv1d": the module type merge/remove give back
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("paca_index", index.to(device=weight.device, dtype=torch.long))
        self.paca_weight = nn.Parameter(weight.index_select(1, self.paca_index).clone())
        self.register_buffer("paca_original", weight.index_select(1, self.paca_index).clone())
        self.disabled = False
        self.paca_written, self.written_key = None, None  # hold_columns: the columns last written, and where

    @property
    def r(self) -> int:
        """Number of trained input columns."""
        return int(self.paca_index.numel())

    def merged_weight(self) -> torch.Tensor:
        """``W`` with the trained columns written in (a new tensor)."""
        return self.weight.detach().index_copy(1, self.paca_index, self.paca_weight.detach().to(self.weight.dtype))

    def original_weight(self) -> torch.Tensor:
        """The original ``W``: ``weight`` itself where it holds the original columns, else a copy with them.

        ``weight`` is never written here, so a pending backward that saved it (a reference pass between a training
        forward and its backward, as in preference tuning) still finds it unchanged.
        """
        original = self.paca_original.to(self.weight.dtype)
        if torch.equal(self.weight.index_select(1, self.paca_index), original):
            return self.weight
        return self.weight.index_copy(1, self.paca_index, original)

    def write_columns(self, columns: torch.Tensor) -> None:
        """Make ``weight`` hold ``columns`` (out x r) at ``paca_index``, writing in place only if they differ."""
        with torch.no_grad():
            columns = columns.to(self.weight.dtype)
            if not torch.equal(self.weight.index_select(1, self.paca_index), columns):
                self.weight.index_copy_(1, self.paca_index, columns)

    def _weight_key(self) -> tuple[int, ...]:
        """Storage and version counter of ``weight`` and ``paca_index``: a write to either (not via ``.data``)
        changes it."""
        return tuple(value for t in (self.weight, self.paca_index) for value in (t.data_ptr(), tensor_version(t)))

    def hold_columns(self, columns: torch.Tensor) -> bool:
        """Make ``weight`` hold ``columns`` (``paca_weight`` in ``weight``'s dtype) at ``paca_index``; True when no
        later comparison with ``weight`` is needed.

        In one process ``columns`` is compared with a contiguous copy of what was last written (``paca_written``),
        not with ``weight``'s strided columns, and written only when it changed (an optimizer step, a load) or
        ``weight`` / ``paca_index`` did (their version counters). Under a process group every call compares with
        ``weight`` and returns False, so the matmul compares again: FSDP2 re-gathers a weight from its shards (the
        original columns) without counting a version.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.write_columns(columns)
            return False
        if self.written_key == self._weight_key() and torch.equal(self.paca_written, columns):
            return True
        with torch.no_grad():
            self.weight.index_copy_(1, self.paca_index, columns)
        self.paca_written, self.written_key = columns.detach().clone(), self._weight_key()
        return True

    def set_index(self, index: torch.Tensor) -> None:
        """Train other columns: restore the original ones, then point ``paca_index`` at ``index``."""
        self.write_columns(self.paca_original)
        with torch.no_grad():
            self.paca_index.copy_(index)
            self.paca_original.copy_(self.weight.index_select(1, self.paca_index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One matmul with the trained columns in effect (or the original weight while disabled)."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.disabled:
            return F.linear(x.to(dtype), self.original_weight().to(dtype), bias)
        paca, holds = self.paca_weight.to(dtype), False
        if in_place_columns(x):  # see effective_weight
            same_dtype = self.weight.dtype == dtype
            holds = self.hold_columns(paca if same_dtype else self.paca_weight.to(self.weight.dtype)) and same_dtype
        with torch.autocast(device_type, enabled=False):
            weight = Held(self.weight) if holds else self.weight.to(dtype)
            return PacaMatmul.apply(x.to(dtype), paca, weight, self.paca_index, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"

    def merged_module(self) -> nn.Module:
        """The plain module (nn.Linear or Conv1D) with the trained columns written into its weight."""
        self.write_columns(self.paca_weight)
        return self.to_plain(self.weight.detach())

    def original_module(self) -> nn.Module:
        """The plain module (nn.Linear or Conv1D) with the original weight."""
        self.write_columns(self.paca_original)
        return self.to_plain(self.weight.detach())

    def to_plain(self, weight: torch.Tensor) -> nn.Module:
        """A plain module of the original type (nn.Linear or Conv1D) holding ``weight``."""
        bias = None if self.bias is None else self.bias.detach()
        if self.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
            return module
        module = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return module


@dataclass(frozen=True)
class PacaDispatch:
    """How PaCA replaces one kind of layer (as peft's dispatchers do for LoRA): the 4-bit layer plugs in here."""

    matches: Callable[[nn.Module], bool]
    in_features: Callable[[nn.Module], int]
    weight: Callable[[nn.Module], torch.Tensor]  # the dense weight as out x in (4-bit weights dequantized)
    build: Callable[[nn.Module, torch.Tensor, torch.Tensor], PacaLinear]  # (module, column index, weight)
