"""The choices of leanft's options and the checks that need no model, importing neither torch nor transformers,
so the command line can document and check its options at once. The modules that run a choice import it here."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from leanft.core.errors import LeanftError

ALLOCATIONS = ("leanft", "official")  # DropBP's sensitivity rule and greedy cost: leanft's, or the authors'
SAMPLERS = ("bernoulli", "topup")  # how DropBP draws a step's pattern
CANDIDATE_RATES = (0.5, 0.4, 0.3, 0.2, 0.1)  # dropbp.rate=auto tries these, largest first
DEFAULT_THRESHOLD = 0.8  # dropbp.rate=auto: the lowest accepted mean per-tensor gradient cosine
QUANTIZE_CHOICES = ("4bit",)
COMM_HOOKS = ("fp16", "bf16", "powersgd")  # DDP gradient compression
LEANFT_LOSS = "leanft"  # leanft's own chunked loss
LOSS_MODULES = {"cut-cross-entropy": "cut_cross_entropy", "liger-kernel": "liger_kernel"}  # in auto's order
LOSS_KERNELS = ("auto", LEANFT_LOSS, *LOSS_MODULES)


def device_type() -> str:
    """``"cuda"`` where torch sees a CUDA device, else ``"cpu"`` (imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_schedule(warmup: float, cooldown: float) -> None:
    """Raise a LeanftError unless ``warmup`` and ``cooldown`` are shares of training in [0, 1] adding up to <= 1."""
    if not (0.0 <= warmup <= 1.0 and 0.0 <= cooldown <= 1.0 and warmup + cooldown <= 1.0):
        raise LeanftError(
            f"warmup and cooldown must be shares of training in [0, 1] adding up to at most 1, got {warmup}, {cooldown}"
        )


def comm_hook_problem(hook: str | None, cuda: bool) -> str | None:
    """Why ``hook`` cannot run (None when it can, or when there is no hook); ``cuda``: the run uses NCCL."""
    if hook is not None and hook not in COMM_HOOKS:
        return f"ddp_comm_hook must be null (none) or one of {', '.join(COMM_HOOKS)}, got {hook!r}"
    if hook == "bf16" and not cuda:
        return "ddp_comm_hook=bf16 needs CUDA with NCCL (PyTorch's hook): use fp16 or powersgd on a CPU"
    return None


def installed(package: str) -> bool:
    """Whether the loss-kernel package ``package`` (a name in ``LOSS_MODULES``) can be imported."""
    return importlib.util.find_spec(LOSS_MODULES[package]) is not None


def select_loss_kernel(
    requested: str, device: str, is_installed: Callable[[str], bool] = installed, head_bias: bool = False
) -> str:
    """The loss kernel to run for ``requested`` on a ``device`` (``"cuda"``, ``"cpu"``) device; a LeanftError
    when it cannot run. ``head_bias``: the output head has a bias, which cut-cross-entropy does not take."""
    if requested not in LOSS_KERNELS:
        raise LeanftError(f"loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got {requested!r}")
    usable = [name for name in LOSS_MODULES if not (head_bias and name == "cut-cross-entropy")]
    if requested == "auto":
        found = [name for name in usable if device == "cuda" and is_installed(name)]
        return found[0] if found else LEANFT_LOSS
    if requested != LEANFT_LOSS and requested not in usable:
        raise LeanftError(f"loss_kernel={requested} does not take the output head's bias: use auto")
    if requested == "liger-kernel" and device != "cuda":
        raise LeanftError(f"loss_kernel=liger-kernel runs on CUDA only, this machine has {device}: use auto")
    if requested != LEANFT_LOSS and not is_installed(requested):
        raise LeanftError(f"loss_kernel={requested} needs its package: pip install {requested}")
    return requested
