"""DropBP: randomly skip the backward pass of residual branches (Woo et al., NeurIPS 2024).

``apply_dropbp`` wraps the attention and MLP branches of every decoder block. Before each training
forward of the model a drop pattern is drawn from a dedicated generator seeded by ``(seed, step)``,
so every data-parallel rank draws the same pattern and gradient-checkpointing recomputation (which
does not re-enter the model's forward) sees the pattern of its own step. A dropped branch runs under
``torch.no_grad()``: its output is bit-identical, it builds no graph and saves no activations, and
its parameters get no gradient.

Sampling (``sampler``): ``"bernoulli"`` drops each branch independently with its own rate (a draw per
branch and forward). The expected dropped share of backward FLOPs equals the target, and its average over
steps converges to it; a single forward varies around it. ``"topup"`` (the DropBP authors' sampler) then,
when fewer than ``drop_rate`` of the branches (by count) were drawn, drops more, highest rates first, until
that share is reached; it skips more than the target on average.

While ``paused`` (a warm-up or cool-down of a rate schedule) nothing is dropped, and the step still advances.
``realised_drop_fraction()`` is the share of the branches' backward FLOPs actually skipped over all training
forwards so far, and ``pattern_checksum`` a running checksum of every pattern drawn (both kept in
``state_dict``, so they survive a resume; equal checksums on data-parallel ranks mean identical patterns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from leanft.core.blocks import Branch, find_branches
from leanft.core.choices import SAMPLERS
from leanft.core.errors import LeanftError
from leanft.core.patching import PatchedForward, patch_forward

MAX_RATE = 0.9
CONTROLLER_ATTRIBUTE = "leanft_dropbp"  # set on a model while a DropBP controller is attached
CHECKSUM_MODULUS = 2**61 - 1


def check_rate(rate: float, what: str = "drop_rate") -> float:
    """Return ``rate`` as a float if it lies in [0, 1), else raise a LeanftError saying so."""
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise LeanftError(f"{what} must be a number in [0, 1) (0 = DropBP off), got {rate!r}")
    return float(rate)


class DropBP:
    """Controller of DropBP on one model: branches, per-branch rates, the current step's pattern."""

    def __init__(
        self, model: nn.Module, drop_rate: float = 0.5, seed: int = 0, sampler: str = "bernoulli", **where: str | None
    ) -> None:
        """``where`` may name ``blocks``, ``attn`` and ``mlp`` (see ``leanft.core.blocks.find_branches``)."""
        self.drop_rate = check_rate(drop_rate)
        if getattr(model, CONTROLLER_ATTRIBUTE, None) is not None:
            raise LeanftError("the model already has DropBP: call remove() on its controller first, or set_rates()")
        if sampler not in SAMPLERS:
            raise LeanftError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.sampler = sampler
        self.seed = int(seed)
        self.model = model
        self.branches: list[Branch] = find_branches(model, **where)
        self.rates: list[float] = [self.drop_rate] * len(self.branches)
        self.dropped: list[bool] = [False] * len(self.branches)
        self.sensitivities: list[float] | None = None
        self.step = 0
        self.paused = False
        self.skipped_flops = 0.0
        self.total_flops = 0.0
        self.pattern_checksum = 0
        self._active = False
        self._forced: list[bool] | None = None
        self._generator = torch.Generator()
        self._restore: list[PatchedForward] = []
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        for index, branch in enumerate(self.branches):
            for module in branch.modules:
                self._wrap(module, index)
        self.set_sequence_length(getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512)
        setattr(model, CONTROLLER_ATTRIBUTE, self)

    # -- wrapping -------------------------------------------------------------------------------
    def _wrap(self, module: nn.Module, index: int) -> None:
        """Replace ``module.forward`` by a closure that runs it under no_grad when its branch is dropped."""
        original = module.forward

        def forward(*args, **kwargs):
            if self._active and self.dropped[index]:
                with torch.no_grad():
                    return original(*args, **kwargs)
            return original(*args, **kwargs)

        self._restore.append(patch_forward(module, forward))

    def remove(self) -> None:
        """Undo ``apply_dropbp``: original forwards, no hooks; the model is exactly as before."""
        for hook in self._hooks:
            hook.remove()
        for handle in reversed(self._restore):
            handle.restore()
        self._hooks, self._restore = [], []
        self._active = False
        if getattr(self.model, CONTROLLER_ATTRIBUTE, None) is self:
            delattr(self.model, CONTROLLER_ATTRIBUTE)

    # -- per-step pattern -------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = module.training and torch.is_grad_enabled()
        if not self._active:
            return
        seq_len = _sequence_length(args, kwargs)
        if seq_len is not None:
            self.set_sequence_length(seq_len)
        if self._forced is not None:
            self.dropped = list(self._forced)
            return
        self.dropped = [False] * len(self.branches) if self.paused else self.sample(self.step)
        self.step += 1
        self.total_flops += sum(branch.flops for branch in self.branches)
        pairs = zip(self.branches, self.dropped, strict=True)
        self.skipped_flops += sum(branch.flops for branch, dropped in pairs if dropped)
        bits = sum(1 << i for i, dropped in enumerate(self.dropped) if dropped)
        self.pattern_checksum = (self.pattern_checksum * 1_000_003 + bits + 1) % CHECKSUM_MODULUS

    def _after_forward(self, module: nn.Module, args: tuple, output):
        """Keep ``loss.backward()`` callable when the step dropped every trainable path.

        The graph-less loss becomes ``loss + anchor`` (a fresh zero leaf): a non-leaf, so in-place scaling
        (``Trainer`` does ``loss *= ...``) stays legal, and its backward reaches no parameter.
        """
        if not self._active:
            return output
        for key in ("loss", "logits", "log_probs"):  # log_probs: TRL's fused head (preference tuning)
            value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
            if isinstance(value, torch.Tensor) and not value.requires_grad:
                anchored = value + torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)
                if isinstance(output, dict):
                    output[key] = anchored
                else:
                    setattr(output, key, anchored)
        return output

    def sample(self, step: int) -> list[bool]:
        """The drop pattern of training step ``step`` (a pure function of seed, step and rates)."""
        self._generator.manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand(len(self.rates), generator=self._generator)
        pattern = [bool(u < rate) for u, rate in zip(draws.tolist(), self.rates, strict=True)]
        if self.sampler == "topup":
            wanted = self.drop_rate * len(pattern)
            for index in sorted(range(len(pattern)), key=lambda i: (-self.rates[i], i)):
                if sum(pattern) >= wanted - 1e-9:
                    break
                pattern[index] = True
        return pattern

    @contextlib.contextmanager
    def forced(self, pattern: Sequence[bool]) -> Iterator[None]:
        """Use ``pattern`` for every training forward inside the block, without advancing the step."""
        if len(pattern) != len(self.branches):
            raise LeanftError(f"a pattern needs {len(self.branches)} entries, got {len(pattern)}")
        previous, self._forced = self._forced, [bool(p) for p in pattern]
        try:
            yield
        finally:
            self._forced = previous

    @contextlib.contextmanager
    def pattern_preserved(self) -> Iterator[None]:
        """On exit, the current pattern and whether the current forward drops are as on entry (measurements)."""
        saved_pattern, saved_active = self.dropped, self._active
        try:
            yield
        finally:
            self.dropped, self._active = saved_pattern, saved_active

    # -- rates and FLOPs -----------------------------------------------------------------------------
    def set_rates(self, rates: Sequence[float]) -> None:
        """Set per-branch drop rates (each in [0, 1))."""
        if len(rates) != len(self.branches):
            raise LeanftError(f"rates needs {len(self.branches)} entries (one per branch), got {len(rates)}")
        self.rates = [check_rate(rate, f"rates[{i}]") for i, rate in enumerate(rates)]

    def set_sequence_length(self, seq_len: int) -> None:
        """Size the branches' FLOPs (hence the drop shares) for sequences of ``seq_len`` tokens."""
        for branch in self.branches:
            branch.set_seq_len(seq_len)

    def expected_drop_fraction(self, rates: Sequence[float] | None = None) -> float:
        """Expected share of the branches' backward FLOPs skipped per step under ``rates``."""
        rates = self.rates if rates is None else rates
        total = sum(branch.flops for branch in self.branches)
        return sum(rate * branch.flops for rate, branch in zip(rates, self.branches, strict=True)) / total

    def dropped_fraction(self, pattern: Sequence[bool] | None = None) -> float:
        """Share of the branches' backward FLOPs that ``pattern`` (default: the current one) skips."""
        pattern = self.dropped if pattern is None else pattern
        return self.expected_drop_fraction([float(p) for p in pattern])

    def realised_drop_fraction(self) -> float:
        """Share of the branches' backward FLOPs skipped over every training forward so far (0 before any)."""
        return self.skipped_flops / self.total_flops if self.total_flops > 0 else 0.0

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume with the same rates and the same patterns."""
        return {
            "seed": self.seed,
            "step": self.step,
            "drop_rate": self.drop_rate,
            "rates": list(self.rates),
            "skipped_flops": self.skipped_flops,
            "total_flops": self.total_flops,
            "pattern_checksum": self.pattern_checksum,
        }

    def pattern_state(self) -> dict:
        """What fixes the patterns drawn so far and from now on (equal on every data-parallel rank)."""
        keys = ("seed", "step", "drop_rate", "rates", "pattern_checksum")
        return {key: value for key, value in self.state_dict().items() if key in keys}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output."""
        self.seed, self.step, self.drop_rate = int(state["seed"]), int(state["step"]), float(state["drop_rate"])
        self.set_rates(state["rates"])
        self.skipped_flops = float(state.get("skipped_flops", 0.0))  # absent in checkpoints of older versions
        self.total_flops = float(state.get("total_flops", 0.0))
        self.pattern_checksum = int(state.get("pattern_checksum", 0))


def _sequence_length(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[1])
    return None


def apply_dropbp(model: nn.Module, drop_rate: float = 0.5, seed: int = 0, **options: str | None) -> DropBP:
    """Attach DropBP to ``model`` in place and return its controller (options: blocks, attn, mlp, sampler).

    ``blocks`` (dotted path of the decoder-block ModuleList), ``attn`` and ``mlp`` (sub-module names
    in a block; join several with ``+``) point leanft at the branches of architectures it cannot map.
    ``sampler``: ``"bernoulli"`` (independent draws) or ``"topup"`` (see the module docstring).
    """
    return DropBP(model, drop_rate=drop_rate, seed=seed, **options)
