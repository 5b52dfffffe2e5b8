"""Data-aware PaCA columns: score each input column of the targeted linears on a calibration batch.

PaCA trains ``r`` input columns ``j`` of a weight, whose change reaches the output as ``P @ x[j]``: columns whose
inputs are large move the output most per unit of change, and the loss gradient of a column is
``sum_t g_t x_t[j]``. Two scores, each from one pass over the batch with the model unchanged:

- ``activation``: the L2 norm of each input column over the batch's tokens (one forward pass);
- ``gradient``: the norm of each column of the loss gradient of the full weight, ``||G[:, j]||`` with
  ``G = g^T x`` (one forward and backward pass; no weight gradient is kept, only these norms).

``apply_paca(model, ..., columns=scores)`` then trains each layer's ``r`` highest-scoring columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from leanft.core.choices import check_column_choice
from leanft.core.errors import LeanftError


def _inputs(args: tuple) -> torch.Tensor:
    return args[0].detach().reshape(-1, args[0].shape[-1]).float()


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_scores(model: nn.Module, names: Sequence[str], batch: dict) -> dict[str, torch.Tensor]:
    """Per named linear: the L2 norm of each of its input columns over ``batch``'s tokens (no grad, eval mode)."""
    squares: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            x = _inputs(args)
            squares[name] = squares.get(name, 0) + (x * x).sum(0)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    was_training = model.training
    model.eval()
    with _hooks(handles), torch.no_grad():
        model(**batch, use_cache=False)
    model.train(was_training)
    return {name: squares[name].sqrt().cpu() for name in names}


def gradient_scores(model: nn.Module, names: Sequence[str], batch: dict) -> dict[str, torch.Tensor]:
    """Per named linear: the norm of each column of the loss gradient of its full weight on ``batch`` (labels
    needed). Gradients flow from the input embeddings; parameters' ``.grad`` are left as they were."""
    if "labels" not in batch:
        raise LeanftError("gradient column scores need a batch with labels")
    inputs: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args):
            inputs[name] = _inputs(args)
        return hook

    def score(name: str):
        def hook(module, grad_input, grad_output):
            grad = grad_output[0].reshape(-1, grad_output[0].shape[-1]).float()
            column_grads = grad.t() @ inputs.pop(name)  # (out x in): the full weight's gradient
            scores[name] = scores.get(name, 0) + column_grads.square().sum(0)
        return hook

    def require_grad(module, args, output):
        return output.requires_grad_(True)

    handles = [model.get_input_embeddings().register_forward_hook(require_grad)]
    for name in names:
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(keep_input(name)), module.register_full_backward_hook(score(name))]
    was_training = model.training
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    model.eval().requires_grad_(False)  # no weight gradient is computed, only the scores
    try:
        with _hooks(handles), torch.enable_grad():
            model(**batch, use_cache=False).loss.backward()
    finally:
        model.train(was_training)
        for parameter in trainable:
            parameter.requires_grad_(True)
    missing = [name for name in names if name not in scores]
    if missing:
        raise LeanftError(f"no gradient reached {missing[0]} on the calibration batch: use paca.columns=random")
    return {name: scores[name].sqrt().cpu() for name in names}


def column_scores(model: nn.Module, names: Sequence[str], batch: dict, choice: str) -> dict[str, torch.Tensor] | None:
    """The scores of ``choice`` (``COLUMN_CHOICES``) for the named linears; None for ``random``."""
    check_column_choice(choice)
    if choice == "random":
        return None
    return (activation_scores if choice == "activation" else gradient_scores)(model, names, batch)
