"""Compressed gradient communication for data-parallel training: PyTorch's DDP communication hooks.

``ddp_comm_hook="powersgd"`` sends a rank-``r`` factorisation of each gradient matrix (Vogels et al., 2019,
with error feedback), ``"fp16"`` / ``"bf16"`` send gradients in half precision (bf16 needs CUDA with NCCL).
leanft implements none of them: it asks accelerate to register PyTorch's own hooks
(``torch.distributed.algorithms.ddp_comm_hooks``) when it wraps the model in DDP.

PowerSGD's hook issues its second and third all-reduce from the callbacks of the first. On gloo those
interleaved, in a different order on each rank, with the next bucket's all-reduces and with the Trainer's own
collectives (the loss gather at a logging step), and a CPU run ended with a collective size mismatch. leanft
therefore runs PowerSGD on a process group of its own and finishes each bucket's exchange before DDP hands
over the next bucket (``in_order_powersgd_hook``): the order of collectives is then the same on every rank.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

from leanft.core.choices import COMM_HOOKS, comm_hook_problem
from leanft.core.errors import LeanftError

logger = logging.getLogger(__name__)

POWERSGD_START = 2  # PowerSGD's first compressed step (before it, plain all-reduce warms its error feedback up)


def powersgd_options(rank: int, min_compression_rate: float = 2.0) -> dict:
    """The ``PowerSGDState`` options leanft uses: rank ``rank``, compression from step ``POWERSGD_START``.

    Matrices that would not shrink by ``min_compression_rate`` (PyTorch's default 2) are sent uncompressed.
    """
    return {"matrix_approximation_rank": rank, "start_powerSGD_iter": POWERSGD_START,
            "min_compression_rate": min_compression_rate}


def in_order_powersgd_hook(state, bucket):
    """PyTorch's ``powerSGD_hook`` with the bucket's whole exchange finished before it returns."""
    future = powerSGD_hook.powerSGD_hook(state, bucket)
    future.wait()
    return future


class OwnGroupDDPKwargs(DistributedDataParallelKwargs):
    """accelerate's DDP settings, registering PowerSGD on a process group of its own (see the module doc)."""

    def register_comm_hook(self, model) -> None:
        """PyTorch's PowerSGD on a new process group, one bucket at a time; any other hook as accelerate does."""
        if self.comm_hook != DDPCommunicationHookType.POWER_SGD:
            return super().register_comm_hook(model)
        state = powerSGD_hook.PowerSGDState(dist.new_group(), **self.comm_state_option)
        model.register_comm_hook(state=state, hook=in_order_powersgd_hook)
        return None


def set_comm_hook(accelerator, hook: str | None, rank: int = 4) -> None:
    """Have ``accelerator`` register the DDP communication hook ``hook`` (one of ``COMM_HOOKS``; None: no hook)
    on its DDP model."""
    if hook is None:
        return
    if hook not in COMM_HOOKS:
        raise LeanftError(comm_hook_problem(hook, cuda=True))
    previous = accelerator.ddp_handler or DistributedDataParallelKwargs()
    handler = accelerator.ddp_handler = OwnGroupDDPKwargs(**previous.to_kwargs())
    handler.comm_hook = {"fp16": DDPCommunicationHookType.FP16, "bf16": DDPCommunicationHookType.BF16,
                         "powersgd": DDPCommunicationHookType.POWER_SGD}[hook]
    handler.comm_state_option = powersgd_options(rank) if hook == "powersgd" else {}
    detail = f" (rank {rank})" if hook == "powersgd" else ""
    logger.info("DDP gradients compressed with PyTorch's %s hook%s", hook, detail)
