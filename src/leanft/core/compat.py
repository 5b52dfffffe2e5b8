"""Every use of a private API of transformers, its Trainer, TRL, bitsandbytes or torch, in one place.

Each is pinned by a test (``tests/test_compat.py``) that fails when an installed version changes it, so an upgrade
that breaks one shows up there, not as a wrong result somewhere else. pyproject's lower bounds are the versions the
tests ran with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from leanft.core.fileio import WRITE_ERRORS


class TrainerCheckpointHooks:
    """Mixin before ``transformers.Trainer``: its private checkpoint methods, turned into public hooks.

    ``Trainer._save``, ``_load_from_checkpoint``, ``_save_checkpoint`` and ``_get_output_dir`` are private; a
    subclass overrides ``save_weights``, ``load_weights``, ``checkpoint_saved`` and ``checkpoint_failed`` instead.
    """

    def save_weights(self, output_dir: str, state_dict: dict | None, trainer_save: Callable) -> None:
        """Write the weights into ``output_dir``; ``trainer_save(output_dir, state_dict)`` is the Trainer's way."""
        trainer_save(output_dir, state_dict)

    def load_weights(self, checkpoint: str, model: nn.Module | None, trainer_load: Callable) -> None:
        """Load a checkpoint's weights; ``trainer_load(checkpoint, model)`` is the Trainer's way."""
        trainer_load(checkpoint, model)

    def checkpoint_saved(self, folder: Path) -> None:
        """Called on the saving process once everything of checkpoint ``folder`` is written."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.save_weights(output_dir or self.args.output_dir, state_dict, super()._save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_weights(resume_from_checkpoint, model, super()._load_from_checkpoint)

    def checkpoint_failed(self, folder: Path, error: Exception) -> None:
        """Called when writing checkpoint ``folder`` raised ``error``; re-raises it unless overridden."""
        raise error

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except WRITE_ERRORS as error:  # a full disk: OSError, torch.save's RuntimeError, safetensors' error
            self.checkpoint_failed(folder, error)
        if self.args.should_save:
            self.checkpoint_saved(folder)


class PretokenizedPreferences:
    """Mixin before ``trl.DPOTrainer``: datasets of pairs that leanft already tokenized go in as they are.

    ``DPOTrainer._prepare_dataset`` (private) renders and tokenizes ``prompt`` / ``chosen`` / ``rejected`` itself;
    leanft renders them as its supervised fine-tuning does, into the ``prompt_ids`` / ``chosen_ids`` /
    ``rejected_ids`` columns that the trainer's collator reads.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


@contextlib.contextmanager
def trl_logprob_tiles(tokens: int, vocab: int) -> Iterator[None]:
    """Inside the block, TRL's fused LM head works in tiles of ``tokens`` x ``vocab`` logits.

    TRL 1.x projects ``TOKEN_CHUNK_SIZE`` (4096) tokens by ``_CHUNKED_LOGPROB_CHUNK_SIZE`` (32768) vocabulary rows
    at a time, both module constants read at call time (forward and backward). On devices without Triton it folds
    each tile with plain torch ops, which make several tile-sized temporaries: up to 0.5 GiB each in fp32, more
    than a small model's whole activations. Smaller tiles give the same log-probs with a fraction of that memory.
    Where an installed TRL lacks either constant, nothing changes.
    """
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    places = [(chunked_logprob, "TOKEN_CHUNK_SIZE", tokens), (utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab)]
    places = [place for place in places if hasattr(place[0], place[1])]
    saved = [getattr(module, name) for module, name, _ in places]
    for module, name, value in places:
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), value in zip(places, saved, strict=True):
            setattr(module, name, value)


@contextlib.contextmanager
def accepted_as_adapter(model: nn.Module, has_adapter: bool) -> Iterator[None]:
    """Inside the block, ``transformers.Trainer`` accepts the quantized ``model`` when ``has_adapter`` (QPaCA).

    Trainer refuses to train a quantized model unless it carries a peft adapter (its check reads the
    ``_hf_peft_config_loaded`` flag); QPaCA layers are such an adapter, so the flag is set while the Trainer is
    built and restored afterwards.
    """
    marked = getattr(model, "hf_quantizer", None) is not None and has_adapter
    previous = model.__dict__.get("_hf_peft_config_loaded")
    if marked:
        model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if marked and previous is None:
            del model._hf_peft_config_loaded
        elif marked:
            model._hf_peft_config_loaded = previous


def mark_distributed_loading(pretrained: nn.Module) -> None:
    """Mark a transformers model as placed and sharded by its owner (what ``from_pretrained(distributed_config=)``
    sets), so that the Trainer neither wraps it in DDP nor shards it again."""
    pretrained._is_distributed_loading_by_transformers = True


def checkpointing_functions(model: nn.Module) -> Iterator[tuple[nn.Module, Callable]]:
    """(module, its checkpoint function) for each module with transformers' gradient checkpointing on."""
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and function is not None:
            yield module, function


def set_checkpointing_function(module: nn.Module, function: Callable) -> None:
    """Make ``module`` checkpoint with ``function`` (e.g. a ``functools.partial`` of torch's checkpoint)."""
    module._gradient_checkpointing_func = function


def unpack_4bit_for_cpu(weight, state) -> tuple:
    """(packed data, quant state) of a bitsandbytes 4-bit weight before its CPU inference repacking."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight, state)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (itself when not compiled)."""
    return getattr(model, "_orig_mod", model)


def softmax_backward(grad_output: torch.Tensor, output: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of a softmax's input from its ``output`` and the gradient of that output, in one fused kernel
    (``torch._softmax_backward_data``, what autograd runs for ``torch.softmax``)."""
    return torch._softmax_backward_data(grad_output, output, dim, output.dtype)


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's version counter (``Tensor._version``): every in-place write to it or a view of it adds one."""
    return tensor._version


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX tiles), as PyTorch's CPU backend detects."""
    return bool(torch.cpu._is_avx512_bf16_supported() or cpu_has_amx_tiles())


def cpu_has_amx_tiles() -> bool:
    """Whether this CPU has AMX tiles, as PyTorch's CPU backend detects."""
    return bool(torch.cpu._is_amx_tile_supported())


def allow_retained_graphs_in_compiled_code() -> None:
    """Let compiled backward passes run with ``retain_graph=True`` (DropBP's allocation measures so).

    AOTAutograd donates saved buffers to the backward by default, which then refuses a retained graph.
    """
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
