"""Multi-process training with the stock engines: PyTorch DDP and FSDP2 (``fully_shard``), launched by
``torchrun`` or ``accelerate launch``.

leanft adds no distribution of its own. What DropBP and PaCA need from these engines:

- **Same pattern on every rank.** DropBP draws each step's pattern from ``(seed, step, rates)``; every rank
  starts with the same seed and step and gets rank 0's rates after allocation, so the patterns agree and
  DDP / FSDP reduce the same set of gradients. ``check_same_on_all_ranks`` verifies this where it matters.
- **DDP with ``find_unused_parameters=True``** (a dropped branch's parameters get no gradient). That mode
  and reentrant activation checkpointing cannot be combined: ``prepare_distributed_dropbp`` checks the
  Trainer's DDP settings and switches checkpointing to non-reentrant.
- **FSDP2** shards each decoder block and then the root (``shard_fsdp2``); PaCA's ``paca_weight`` and the
  frozen ``weight`` are sharded like any parameter and ``full_tensor`` gathers them (``save_paca`` does).
- **Bounded waits.** The process group gets a timeout (``init_distributed``), so a rank that dies or
  hangs makes the others fail with an error instead of waiting forever; torchrun then ends the launch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from leanft.core.compat import checkpointing_functions, mark_distributed_loading, set_checkpointing_function
from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_dir

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from leanft.core.dropbp import DropBP

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600
T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: from the process group, else the launcher's ``RANK`` variable, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: from the process group, else the launcher's ``WORLD_SIZE`` variable, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the rank that writes files and logs."""
    return rank() == 0


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> bool:
    """Join the process group a launcher (torchrun, accelerate launch) describes in the environment.

    Does nothing in a single-process run or when a group exists already (``transformers`` / ``accelerate``
    reuse the group made here). ``timeout_s`` bounds every collective wait, so a dead rank cannot hang the
    others. The backend is NCCL on CUDA, gloo otherwise. Returns whether the run is distributed.
    """
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def leave_distributed() -> None:
    """Tear down this process's process group, if any, before the process exits.

    A rank that exits with its gloo group still alive can abort in the group's background threads
    ("terminate called without an active exception") while rank 0 is still writing the run's outputs.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _object_device() -> torch.device | None:
    """Device for object collectives: the current CUDA device under NCCL, else CPU (None)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def gather_objects(value: T) -> list[T]:
    """``value`` from every rank, in rank order (``[value]`` when not distributed)."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: T) -> T:
    """``value`` as rank 0 has it, on every rank (unchanged when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def run_on_main(function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0 only and give its result to every rank.

    When it raises a LeanftError on rank 0, every rank raises one with the same message, so a bad input
    ends all processes with the same clear error instead of leaving the others waiting.
    """
    outcome: tuple[bool, object] = (True, None)
    if is_main_process():
        try:
            outcome = (True, function())
        except LeanftError as error:
            outcome = (False, str(error))
    ok, value = broadcast_from_main(outcome)
    if not ok:
        raise LeanftError(str(value))
    return value  # type: ignore[return-value]


def check_same_on_all_ranks(value: object, what: str) -> None:
    """Raise a LeanftError on every rank when ``value`` differs between ranks (no-op when not distributed)."""
    values = gather_objects(value)
    if any(other != values[0] for other in values[1:]):
        shown = "; ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
        raise LeanftError(f"{what} differs between ranks ({shown}); give every rank the same settings")


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor (FSDP2) is gathered from all ranks (a collective), else as is."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def squared_norm(tensors: Iterable[torch.Tensor]) -> float:
    """Sum of squares of all entries; FSDP2-sharded DTensors count each shard once (one all-reduce)."""
    from torch.distributed.tensor import DTensor

    total, sharded, group = 0.0, None, None
    for tensor in tensors:
        one_dim = isinstance(tensor, DTensor) and tensor.device_mesh.ndim == 1
        if one_dim and all(placement.is_shard() for placement in tensor.placements):
            local = tensor.to_local().float().pow(2).sum()
            sharded = local if sharded is None else sharded + local
            group = tensor.device_mesh.get_group()
        else:
            total += float(full_tensor(tensor).float().pow(2).sum())
    if sharded is not None:
        dist.all_reduce(sharded, group=group)
        total += float(sharded)
    return total


def use_non_reentrant_checkpointing(model: nn.Module) -> bool:
    """Switch Hugging Face gradient checkpointing on ``model`` to its non-reentrant form; True if it was reentrant.

    DDP with ``find_unused_parameters=True`` (which DropBP needs) fails with reentrant checkpointing
    ("mark a variable ready only once"); the non-reentrant form gives the same gradients.
    """
    switched = False
    for module, function in checkpointing_functions(model):
        keywords = dict(getattr(function, "keywords", None) or {})
        if keywords.get("use_reentrant", True):  # torch's checkpoint defaults to reentrant when not told
            base = function.func if isinstance(function, functools.partial) else function
            set_checkpointing_function(module, functools.partial(base, **{**keywords, "use_reentrant": False}))
            switched = True
    return switched


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``model`` (or a sub-module) is sharded with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


class _GraphlessAnchor:
    """The hooks of ``anchor_graphless_forwards`` on one model and the state they share."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.param = next(p for p in model.parameters() if p.requires_grad)
        self.anchoring = False  # the current training forward reaches no trainable parameter
        self.zeros_only = False  # this step, ``param`` has a gradient only from anchors (zeros)
        model.register_forward_hook(self._after_forward, prepend=True)  # before DropBP's own anchor
        self.param.register_post_accumulate_grad_hook(self._accumulated)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the optimizer inside it
        inner.register_step_pre_hook(self._before_step)  # this run's optimizer only

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.zeros_only:  # as in one process: no gradient at all, so the optimizer skips it
            self.param.grad, self.zeros_only = None, False

    def _after_forward(self, module: nn.Module, args: tuple, output):
        if not (module.training and torch.is_grad_enabled()):
            return output
        found = {key: _output_field(output, key) for key in ("loss", "logits")}
        found = {key: value for key, value in found.items() if isinstance(value, torch.Tensor)}
        self.anchoring = bool(found) and not any(value.requires_grad for value in found.values())
        if self.anchoring:
            self.zeros_only = self.zeros_only or self.param.grad is None
            zero = self.param.flatten()[0] * 0  # its backward gives ``param`` an all-zero gradient
            for key, value in found.items():
                if isinstance(output, dict):
                    output[key] = value + zero.to(value.dtype)
                else:
                    setattr(output, key, value + zero.to(value.dtype))
        return output

    def _accumulated(self, param: torch.Tensor) -> None:
        if not self.anchoring:  # a real gradient
            self.zeros_only = False


def _output_field(output: object, key: str) -> object:
    """``output[key]`` of a dict (or ``ModelOutput``), else the attribute, else None."""
    return output.get(key) if isinstance(output, dict) else getattr(output, key, None)


def anchor_graphless_forwards(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make every training forward of a DDP-wrapped ``model`` with DropBP reach DDP's reducer.

    Cause (measured with torch 2.13, ``find_unused_parameters=True``): when DropBP drops every branch, the loss
    has no graph (DropBP adds a fresh zero leaf), so its backward fires none of DDP's autograd hooks. In a
    micro-batch that synchronises, the reducer then neither all-reduces nor finishes: the gradients of the
    earlier ``no_sync`` micro-batches stay local to each rank, and the half-prepared reducer fails the next
    ``no_sync`` backward ("Encountered gradient which is undefined, but still allreduced by DDP reducer").
    Here such a forward's loss and logits get ``0 *`` one entry of the first trainable parameter, so DDP's hooks
    fire and it reduces as usual; where that parameter gets no real gradient in the step, its (zero) gradient is
    set back to None before ``optimizer``'s step, so the gradients are exactly those of one process.
    """
    _GraphlessAnchor(model, optimizer)


def prepare_distributed_dropbp(
    controller: DropBP, args: TrainingArguments, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Check (and where possible fix) a distributed ``Trainer`` run with DropBP, before its first step.

    Under DDP: ``find_unused_parameters`` must be on and ``static_graph`` off (a LeanftError says so),
    reentrant gradient checkpointing is switched to non-reentrant, and ``anchor_graphless_forwards`` keeps DDP
    reducing when a micro-batch drops every branch. On every engine the DropBP state (seed, step, rates), and so
    every future drop pattern, must agree on all ranks. No-op in a single process.
    """
    if not is_distributed():
        return
    if not is_fsdp2(model):
        if args.ddp_static_graph:
            raise LeanftError("DropBP changes the graph every step: ddp_static_graph=True gives wrong gradients")
        checkpointing = bool(args.gradient_checkpointing) or any(True for _ in checkpointing_functions(model))
        find_unused = args.ddp_find_unused_parameters
        if find_unused is False or (find_unused is None and checkpointing):
            raise LeanftError(
                "DropBP under DDP needs ddp_find_unused_parameters=True in TrainingArguments "
                "(a dropped branch's parameters get no gradient)"
            )
        if use_non_reentrant_checkpointing(model):
            logger.info("DropBP under DDP: gradient checkpointing switched to non-reentrant (reentrant breaks DDP)")
        anchor_graphless_forwards(controller.model, optimizer)
    check_same_on_all_ranks(controller.pattern_state(), "DropBP state (seed, step, rates)")


def shard_fsdp2(model: nn.Module, blocks: str | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 in place: ``fully_shard`` each decoder block, then the whole model; returns ``model``.

    Uses a 1-D device mesh over all ranks (CUDA under NCCL, else CPU / gloo). DropBP and PaCA may be
    attached before or after sharding; DropBP's patterns must then agree on every rank, which they do.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from leanft.core.blocks import find_block_list

    if not is_distributed():
        raise LeanftError("FSDP2 needs a distributed launch: start with torchrun or accelerate launch")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for block in find_block_list(model, blocks)[1]:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def shard_for_trainer(model: nn.Module, blocks: str | None = None) -> nn.Module:
    """FSDP2 for a ``transformers.Trainer`` run, on GPUs and on CPU alike; returns ``model``.

    Shards with ``shard_fsdp2``, then sets the flag with which ``transformers`` marks a model that owns its
    placement and gradient reduction (``from_pretrained(distributed_config=...)``), so that the Trainer
    neither wraps it in DDP nor shards it again, and gives its config the ``DistributedConfig`` that such a load
    leaves there (the Trainer reads it to defer the reduce-scatter of gradient accumulation's micro-batches).
    The Trainer then needs ``save_only_model=True`` (checkpoints hold no optimizer state). Works on CPU / gloo
    too, where ``accelerate``'s FSDP plugin does not run.
    """
    from transformers import DistributedConfig

    shard_fsdp2(model, blocks)
    pretrained = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model
    mark_distributed_loading(pretrained)
    pretrained.config.distributed_config = DistributedConfig(fsdp_size=dist.get_world_size())  # one FSDP mesh
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2 model on CPU, on rank 0 (other ranks get ``{}``); every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def shared_atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_dir`` for a save that every rank joins (FSDP2 gathers its shards): rank 0 owns the folder.

    Every rank gets the same temporary path; rank 0 moves it into place once all ranks are done.
    """
    if not is_main_process():
        yield Path(broadcast_from_main(None))
        barrier()
        return
    with atomic_dir(path) as temporary:
        broadcast_from_main(str(temporary))
        yield temporary
        barrier()
