"""Sensitivity-based drop-rate allocation for DropBP (paper, Sec. 3.2).

Sensitivity of branch i: the L2 norm (over all trainable parameters) of the difference between the
gradient of the full backward pass and the gradient when only branch i is dropped, measured on one
batch with the same dropout masks for every measurement.

Dropping branch i removes exactly the gradient paths that pass through its output ``y_i``, so that
difference is ``J_i^T d_i``: the backward of ``y_i`` alone (down through the layers below it) with
``d_i = dL/dy_i`` of the full pass. One forward, one backward to every ``y_i`` and one partial backward
per branch give all sensitivities, about 10x cheaper than a forward and a full backward per branch (the
LM head is never redone). Branches made of several modules, FSDP2's sharded parameters and reentrant
checkpointing (no graph at the branch outputs) use the direct definition: one forward and backward per
branch, with that branch dropped.

Two rules (``allocation``): ``"leanft"`` (the default) is the above. ``"official"`` follows the DropBP
authors' code: sensitivity is the sum over parameter tensors of the squared change of each tensor's gradient
norm, and the greedy step below costs ``sensitivity * (rate + 0.1)``, not divided by FLOPs.

Allocation (``"leanft"``): every rate starts at ``floor``; while the expected share of skipped backward FLOPs is below
the target, raise by 0.1 (capped at 0.9) the rate of the branch where that adds the least gradient noise per
FLOP saved: sensitivity times the rise of ``drop_cost`` (``p / (1 - p)``, convex), over the branch's FLOPs.
With a cost linear in the rate, the cheapest branches all went to 0.9 and the rest stayed at 0; on SmolLM2
that starved the MLP adapters of updates and converged worse than uniform rates (see README, Results).
The global RNG state (python, numpy, torch) and any gradients already on the parameters are left
exactly as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from leanft.core.choices import ALLOCATIONS
from leanft.core.distributed import is_distributed, squared_norm
from leanft.core.dropbp import MAX_RATE, DropBP, check_rate
from leanft.core.errors import LeanftError
from leanft.core.rng import preserved_rng

STEP = 0.1
MEASURE_SEED = 1234


@contextlib.contextmanager
def preserved_global_state(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Restore python/numpy/torch RNG states, train/eval flags and ``.grad`` of ``params`` on exit."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [param.grad for param in params]
    try:
        with preserved_rng():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad


def gradients_under_pattern(ctrl: DropBP, batch: dict, params: Sequence[nn.Parameter], pattern: list[bool]) -> list:
    """Gradients of ``params`` (None where unused) from one forward and backward on ``batch`` with ``pattern``."""
    for param in params:
        param.grad = None
    torch.manual_seed(MEASURE_SEED)
    with ctrl.forced(pattern):
        loss = ctrl.model(**batch).loss
    if loss is None:
        raise LeanftError("allocation needs a batch with labels (the model returned no loss)")
    if is_distributed() and not any(isinstance(param, DTensor) for param in params):
        # Under DDP a .backward() outside its forward would mark parameters as used and break its next step;
        # autograd.grad runs no gradient-accumulation hook. (FSDP2's sharded parameters need .backward().)
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    loss.backward()
    return [None if param.grad is None else param.grad.detach().clone() for param in params]


def _present_pairs(full: list, change: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(full gradient, gradient change) per tensor in float32, zeros where one side is None; both None: left out."""
    pairs = []
    for ref, delta in zip(full, change, strict=True):
        if ref is None and delta is None:
            continue
        ref = torch.zeros_like(delta) if ref is None else ref
        delta = torch.zeros_like(ref) if delta is None else delta
        pairs.append((ref.float(), delta.float()))
    return pairs


def norm_of_change(full: list, change: list) -> float:
    """leanft's sensitivity: the L2 norm of the gradient change over all trainable tensors."""
    return squared_norm([delta for _, delta in _present_pairs(full, change)]) ** 0.5


def tensor_norm_change(full: list, change: list) -> float:
    """The DropBP authors' sensitivity: sum over tensors of (||g_t|| - ||g_t - change_t||) squared."""
    pairs = _present_pairs(full, change)
    before = [squared_norm([ref]) ** 0.5 for ref, _ in pairs]
    after = [squared_norm([ref - delta]) ** 0.5 for ref, delta in pairs]
    return sum((a - b) ** 2 for a, b in zip(before, after, strict=True))


SENSITIVITIES = {"leanft": norm_of_change, "official": tensor_norm_change}


@contextlib.contextmanager
def _branch_outputs(ctrl: DropBP) -> Iterator[list]:
    """Collect the output tensor of every (single-module) branch during the forward inside the block."""
    outputs: list = [None] * len(ctrl.branches)

    def keeper(index: int):
        def hook(module, args, output):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [branch.modules[0].register_forward_hook(keeper(i)) for i, branch in enumerate(ctrl.branches)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _sensitivities_by_paths(ctrl: DropBP, batch: dict, params: Sequence[nn.Parameter], measure) -> list[float]:
    """All sensitivities from one forward: ``measure`` of the change ``J_i^T dL/dy_i`` per branch output ``y_i``."""
    torch.manual_seed(MEASURE_SEED)
    with ctrl.forced([False] * len(ctrl.branches)), _branch_outputs(ctrl) as outputs:
        loss = ctrl.model(**batch).loss
    if loss is None:
        raise LeanftError("allocation needs a batch with labels (the model returned no loss)")
    live = [i for i, output in enumerate(outputs) if output is not None and output.requires_grad]
    if not live:  # e.g. reentrant checkpointing runs the blocks without a graph: measure by definition
        return _sensitivities_by_dropping(ctrl, batch, params, measure)
    full = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    upstream = torch.autograd.grad(loss, [outputs[i] for i in live], retain_graph=True, allow_unused=True)
    sensitivities = [0.0] * len(ctrl.branches)
    for index, grad_output in zip(live, upstream, strict=True):
        if grad_output is None:
            continue
        through = torch.autograd.grad(outputs[index], params, grad_output, retain_graph=True, allow_unused=True)
        sensitivities[index] = measure(full, list(through))
    return sensitivities


def _sensitivities_by_dropping(ctrl: DropBP, batch: dict, params: Sequence[nn.Parameter], measure) -> list[float]:
    """All sensitivities by definition: a forward and backward with each branch alone dropped."""
    count = len(ctrl.branches)
    reference = gradients_under_pattern(ctrl, batch, params, [False] * count)
    sensitivities = []
    for index in range(count):
        dropped = gradients_under_pattern(ctrl, batch, params, [i == index for i in range(count)])
        change = [None if r is None and d is None else _minus(r, d) for r, d in zip(reference, dropped, strict=True)]
        sensitivities.append(measure(reference, change))
    return sensitivities


def _minus(reference: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor:
    if reference is None:
        return -other.float()
    return reference.float() if other is None else reference.float() - other.float()


@contextlib.contextmanager
def measuring(ctrl: DropBP) -> Iterator[list[nn.Parameter]]:
    """The trainable parameters, with the model in train mode, for gradient measurements inside the block.

    On exit the RNG state, train/eval flags, ``.grad`` and the controller's current pattern are as before.
    """
    params = [param for param in ctrl.model.parameters() if param.requires_grad]
    if not params:
        raise LeanftError("the model has no trainable parameters; apply PaCA/LoRA or unfreeze it first")
    with ctrl.pattern_preserved(), preserved_global_state(ctrl.model, params):
        ctrl.model.train()
        yield params


def measure_sensitivities(
    ctrl: DropBP, batch: dict, by_paths: bool | None = None, allocation: str = "leanft"
) -> list[float]:
    """Gradient change when each branch alone is dropped, one value per branch, in branch order.

    ``by_paths`` picks the single-forward method (default: wherever it applies; see the module docstring);
    ``allocation`` the measure of the change (``"leanft"``: its norm; ``"official"``: per-tensor norm changes).
    """
    measure = _allocation_rule(allocation, SENSITIVITIES)
    with measuring(ctrl) as params:
        if "labels" not in batch:
            raise LeanftError("allocation needs a batch dict with 'labels' (and 'input_ids')")
        sequence = batch.get("input_ids")
        if isinstance(sequence, torch.Tensor) and sequence.dim() >= 2:
            ctrl.set_sequence_length(int(sequence.shape[1]))
        if by_paths is None:
            sharded = any(isinstance(param, DTensor) for param in params)
            by_paths = not sharded and all(len(branch.modules) == 1 for branch in ctrl.branches)
        method = _sensitivities_by_paths if by_paths else _sensitivities_by_dropping
        return method(ctrl, batch, params, measure)


def _allocation_rule(allocation: str, rules: dict):
    if allocation not in ALLOCATIONS:
        raise LeanftError(f"allocation must be one of {', '.join(rules)}, got {allocation!r}")
    return rules[allocation]


def drop_cost(rate: float) -> float:
    """Relative gradient noise of a branch dropped with probability ``rate``: ``rate / (1 - rate)``.

    A branch's gradient arrives in a step with probability ``1 - rate``; relative to its mean, the variance
    of that on/off signal is ``rate / (1 - rate)``. The cost is convex: each further 0.1 on a rate that is
    already high costs more, which spreads the budget instead of parking the cheapest branches at the cap.
    """
    return rate / (1.0 - rate)


def leanft_step_cost(sensitivity: float, rate: float, flops: float) -> float:
    """leanft's cost of raising a branch's rate by 0.1: added relative noise ``drop_cost``, per FLOP saved."""
    return sensitivity * (drop_cost(rate + STEP) - drop_cost(rate)) / flops


def official_step_cost(sensitivity: float, rate: float, flops: float) -> float:
    """The DropBP authors' cost of raising a rate by 0.1: ``sensitivity * (rate + 0.1)``, FLOPs left out."""
    return sensitivity * (rate + STEP)


STEP_COSTS = {"leanft": leanft_step_cost, "official": official_step_cost}


def greedy_rates(
    sensitivities: Sequence[float],
    flops: Sequence[float],
    target: float,
    floor: float = 0.0,
    allocation: str = "leanft",
) -> list[float]:
    """Raise rates by 0.1 where the ``allocation`` rule's step cost is lowest until ``target`` of FLOPs is skipped."""
    step_cost = _allocation_rule(allocation, STEP_COSTS)
    check_rate(target, "target drop rate")
    if target > MAX_RATE or not 0.0 <= floor <= MAX_RATE:
        raise LeanftError(f"target ({target}) and floor ({floor}) must lie in [0, {MAX_RATE}]")
    total = float(sum(flops))
    tenths = [round(floor / STEP) for _ in flops]
    max_tenths = round(MAX_RATE / STEP)

    def dropped_share() -> float:
        return sum(t * STEP * f for t, f in zip(tenths, flops, strict=True)) / total

    def added_cost(i: int) -> float:
        return step_cost(sensitivities[i], tenths[i] * STEP, flops[i])

    while dropped_share() < target - 1e-9:
        open_branches = [i for i, t in enumerate(tenths) if t < max_tenths and flops[i] > 0]
        cheapest = min(open_branches, key=lambda i: (added_cost(i), i))
        tenths[cheapest] += 1
    return [round(t * STEP, 10) for t in tenths]


def allocate_rates(
    ctrl: DropBP, batch: dict, target: float | None = None, floor: float = 0.0, allocation: str = "leanft"
) -> list[float]:
    """Sensitivity-based drop rates for ``ctrl``'s branches, measured on ``batch``; sets and returns ``ctrl.rates``.

    The rates average ``target`` (default: the controller's ``drop_rate``) weighted by FLOPs, none below
    ``floor``. ``allocation``: ``"leanft"`` or ``"official"`` (the DropBP authors' rule; see the module docstring).
    """
    ctrl.sensitivities = measure_sensitivities(ctrl, batch, allocation=allocation)
    flops = [branch.flops for branch in ctrl.branches]
    target = ctrl.drop_rate if target is None else target
    ctrl.set_rates(greedy_rates(ctrl.sensitivities, flops, target, floor, allocation))
    return ctrl.rates
