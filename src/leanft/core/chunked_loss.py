"""Chunked linear cross-entropy: the LM head and the loss over token chunks, never the full (tokens x vocab) logits.

``chunked_causal_lm_loss(model, batch)`` runs the model's own forward (so DropBP's per-step pattern, gradient
checkpointing and adapters work as usual) with its output head temporarily returning its input, i.e. the final
hidden states, then computes ``head(hidden)`` and the cross-entropy chunk by chunk in one autograd function.
Forward computes each chunk's gradient right away (``softmax - onehot``), keeps ``grad_hidden`` (tokens x hidden,
the size of one hidden state) and, when the head is trained, ``grad_weight``, and frees the chunk's logits: peak
extra memory is one chunk of logits, not all of them. Only positions with a label are sent through the head.

The loss is exactly ``transformers``' ``ForCausalLMLoss``: labels shifted left by one, ``-100`` ignored, the mean
over labelled tokens, or the sum divided by ``num_items_in_batch`` when given (gradient accumulation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from leanft.core.choices import LEANFT_LOSS, select_loss_kernel
from leanft.core.compat import uncompiled
from leanft.core.errors import LeanftError
from leanft.core.fused_loss import fused_cross_entropy_sum
from leanft.core.patching import patched_forward

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (8M: 32 MiB in fp32, 8-16% faster on a CPU than 4M); tokens follow


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden @ weight^T + bias, targets)``, computed ``chunk_size`` rows at a time.

    Gradients are computed in forward and only scaled in backward; the logits of one chunk at a time exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: D102 - autograd protocol
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows, target = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(rows, weight, bias).float()
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_logits = logits.sub_(norm[:, None]).exp_()  # softmax, in place
            grad_logits[torch.arange(target.numel(), device=target.device), target] -= 1.0
            grad_logits = grad_logits.to(hidden.dtype)  # what the plain head's backward gets from logits.float()
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])
            if need_weight:
                grad_weight += (grad_logits.t() @ rows).float()
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102 - autograd protocol
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of logits holds about ``CHUNK_ELEMENTS`` values."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    kernel: str = LEANFT_LOSS,
) -> torch.Tensor:
    """Causal-LM loss of ``hidden`` (... x seq x hidden) through the LM ``head`` (its ``weight`` and ``bias``, as
    an ``nn.Linear`` holds them), chunk by chunk.

    Same value and gradients as ``ForCausalLMLoss(F.linear(hidden, weight, bias), labels, ...)``: labels are shifted
    by one, ``-100`` is ignored, the loss is the mean over labelled tokens or the sum / ``num_items_in_batch``.
    ``kernel`` names a maintained fused kernel to compute it instead (see ``leanft.core.fused_loss``).
    """
    if hidden.shape[:-1] != labels.shape:
        raise LeanftError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    weight, bias = head.weight, getattr(head, "bias", None)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise LeanftError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    dtype = None
    if torch.is_autocast_enabled(device_type):  # the head would run in the autocast dtype: do the same
        dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:  # the model ran under autocast and the loss runs outside it (Trainer)
        dtype = min(hidden.dtype, weight.dtype, key=lambda kind: torch.finfo(kind).bits)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    kept_targets = targets.index_select(0, keep)
    with torch.autocast(device_type, enabled=False):
        if kernel == LEANFT_LOSS:
            total = LinearCrossEntropy.apply(rows, weight, bias, kept_targets, chunk_size)
        else:
            total = fused_cross_entropy_sum(kernel, rows, weight, bias, kept_targets)
    if num_items_in_batch is None:
        return total / keep.numel()  # nan without labelled tokens, like the mean of an empty cross-entropy
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# -- the model side --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif uncompiled(model) is not model:
            model = uncompiled(model)
        else:
            return model


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output head as a plain ``nn.Linear``; a LeanftError says why when it is something else."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise LeanftError(f"the chunked loss needs a plain nn.Linear output head, found {type(head).__name__}")
    if any(type(tensor).__name__ == "DTensor" for tensor in (head.weight, head.bias) if tensor is not None):
        raise LeanftError("the chunked loss does not support a sharded (FSDP / tensor-parallel) output head")
    return head


@contextlib.contextmanager
def hidden_states_as_logits(model: nn.Module) -> Iterator[nn.Linear]:
    """Inside the block the model's output head returns its input: ``outputs.logits`` are the final hidden states."""
    with patched_forward(output_head(model), _identity) as head:
        yield head


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def chunked_causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    kernel: str = LEANFT_LOSS,
) -> torch.Tensor:
    """The causal-LM loss of ``model`` on ``batch`` (with ``labels``), exactly as the model computes it, chunked.

    Runs the model's forward (hooks such as DropBP's fire as usual) without ever materialising the full logits;
    ``kernel`` as in ``linear_cross_entropy``.
    """
    if "labels" not in batch:
        raise LeanftError("chunked_causal_lm_loss needs a batch with labels")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with hidden_states_as_logits(model) as head:
        hidden = model(**inputs).logits
    return linear_cross_entropy(hidden, head, batch["labels"], num_items_in_batch, chunk_size, kernel)


def chunked_loss_problem(model: nn.Module, distributed: bool = False) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own loss (None when it can).

    Besides the head's type, it checks on a few tokens (eval mode, no grad) that the model's logits are exactly
    ``head(final hidden states)``: models that scale or soft-cap their logits after the head are refused.
    """
    try:
        head = output_head(model)
    except LeanftError as error:
        return str(error)
    if distributed and head.weight.requires_grad:
        return "a trained output head is not supported in multi-process runs"
    inner = unwrap_model(model)
    device = head.weight.device
    ids = torch.arange(3, 3 + min(8, head.out_features - 3), device=device)[None]
    was_training = inner.training
    try:
        inner.eval()
        with torch.no_grad():
            logits = inner(input_ids=ids).logits
            with hidden_states_as_logits(inner):
                hidden = inner(input_ids=ids).logits
    finally:
        inner.train(was_training)
    if hidden.shape[-1] != head.in_features:
        return "the model does not feed its final hidden states straight into its head"
    expected = head(hidden).to(logits.dtype)
    if not torch.allclose(logits, expected, rtol=1e-3, atol=1e-3 * float(logits.abs().max().clamp(min=1))):
        return "the model transforms its logits after the head (scaling or soft-capping)"
    return None


class ChunkedLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: chunked when ``active`` (hidden states come in).

    ``Trainer`` pops the labels, runs the model (inside ``hidden_states_as_logits`` when ``active``) and calls this
    with the outputs; outside that block the real logits come in and the plain loss is computed.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, kernel: str = "auto") -> None:
        self.head = output_head(model)
        self.chunk_size = chunk_size
        self.kernel = select_loss_kernel(kernel, self.head.weight.device.type, head_bias=self.head.bias is not None)
        self.active = False

    @contextlib.contextmanager
    def capturing(self, model: nn.Module) -> Iterator[None]:
        """Make ``model``'s forward return hidden states for this loss inside the block."""
        with hidden_states_as_logits(model):
            self.active = True
            try:
                yield
            finally:
                self.active = False

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        """The loss from ``outputs.logits`` (hidden states while capturing, else logits) and ``labels``."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.active:
            return linear_cross_entropy(logits, self.head, labels, num_items_in_batch, self.chunk_size, self.kernel)
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch)


def chunked_loss_for(
    model: nn.Module, distributed: bool = False, chunk_size: int | None = None, kernel: str = "auto"
) -> ChunkedLoss | None:
    """A ``ChunkedLoss`` for training ``model``, or None (logged, with the reason) where its head does not allow.

    ``kernel`` picks the implementation (``leanft.core.choices.LOSS_KERNELS``); the choice is logged.
    """
    problem = chunked_loss_problem(model, distributed)
    if problem is not None:
        logger.info("chunked loss off, the plain LM loss is used: %s", problem)
        return None
    loss = ChunkedLoss(model, chunk_size, kernel)
    logger.info("LM-head loss: %s", "leanft's chunked loss" if loss.kernel == LEANFT_LOSS else loss.kernel)
    return loss
