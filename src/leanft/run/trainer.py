"""The ``transformers.Trainer`` of a leanft run and its ``TrainingArguments``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from leanft.core.chunked_loss import chunked_loss_for
from leanft.core.comm_hooks import set_comm_hook
from leanft.core.compat import TrainerCheckpointHooks, accepted_as_adapter
from leanft.core.distributed import full_state_dict, is_fsdp2, world_size
from leanft.core.errors import LeanftError
from leanft.core.paca import paca_modules
from leanft.run.config import TrainConfig
from leanft.run.methods import method_spec
from leanft.run.optimizers import apollo_optimizer
from leanft.run.rundir import disk_is_full, mark_complete, resume_checkpoint, rotate_checkpoints


@dataclass(frozen=True)
class TrainerSettings:
    """What ``LeanftTrainer`` adds to ``Trainer``'s own arguments; ``from_config`` gives a run's."""

    chunked_loss: bool = False
    loss_kernel: str = "auto"
    method: str | None = None  # the registered method whose own save a checkpoint uses (None: the Trainer's)
    keep_checkpoints: int | None = None  # rotated by leanft, after the new checkpoint is complete
    comm_hook: str | None = None
    powersgd_rank: int = 4
    optimizer: str = "adamw"  # adamw: the Trainer's own; apollo, apollo-mini: see run.optimizers

    @classmethod
    def from_config(cls, config: TrainConfig) -> TrainerSettings:
        """The settings of a run of ``config`` (FSDP and preference tuning compute their own losses)."""
        chunked = config.chunked_loss and not config.fsdp and config.objective == "sft"
        return cls(chunked, config.loss_kernel, config.method, config.save_total_limit, config.ddp_comm_hook,
                   config.powersgd_rank, config.optimizer)


class LeanftTrainer(TrainerCheckpointHooks, Trainer):
    """``Trainer`` that checkpoints through the method's own save (PaCA: only its columns) and marks checkpoints
    complete.

    ``settings.chunked_loss`` computes the training loss with ``leanft.core.chunked_loss`` (same value and gradients,
    never the full logits) where the model's head allows; it plugs in as ``compute_loss_func``, so ``Trainer``'s
    gradient-accumulation and multi-process token counting apply unchanged. ``settings.loss_kernel`` picks its
    implementation: ``auto`` (a maintained fused kernel on CUDA where installed), ``leanft``, ``cut-cross-entropy``
    or ``liger-kernel``. ``settings.comm_hook`` (``fp16 | bf16 | powersgd``) compresses DDP's gradient
    all-reduce. ``extra_metrics`` (``() -> {name: value}``) adds to every training log.
    """

    def __init__(
        self, *args, settings: TrainerSettings | None = None, extra_metrics: Callable[[], dict] | None = None, **kwargs
    ) -> None:
        settings = settings or TrainerSettings()
        model = kwargs.get("model", args[0] if args else None)
        self.keep_checkpoints = settings.keep_checkpoints
        self.extra_metrics = extra_metrics
        self.optimizer_name = settings.optimizer
        spec = method_spec(settings.method) if settings.method is not None else None
        self.own_checkpoints = spec if spec is not None and spec.own_checkpoints else None
        chunked = settings.chunked_loss
        self.chunked = chunked_loss_for(model, world_size() > 1, kernel=settings.loss_kernel) if chunked else None
        if self.chunked is not None and kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = self.chunked
        with accepted_as_adapter(model, has_adapter=bool(paca_modules(model))):  # a 4-bit base with QPaCA layers
            super().__init__(*args, **kwargs)
        # registered when accelerate wraps the model
        set_comm_hook(self.accelerator, settings.comm_hook, settings.powersgd_rank)

    def create_optimizer(self, model=None):
        """The Trainer's AdamW, or APOLLO / APOLLO-Mini (``optimizer_name``) over the trainable parameters."""
        if self.optimizer_name == "adamw" or self.optimizer is not None:
            return super().create_optimizer(model)
        self.optimizer = apollo_optimizer(
            self.model, self.optimizer_name, self.args.learning_rate, self.args.weight_decay
        )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss``, with the head returning hidden states for the chunked loss while training."""
        if self.chunked is None or return_outputs or self.compute_loss_func is not self.chunked:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.chunked.capturing(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log`` with leanft's metrics added to training logs (so every ``report_to`` gets them)."""
        if self.extra_metrics is not None and "loss" in logs:
            logs = {**logs, **self.extra_metrics()}
        super().log(logs, *args, **kwargs)

    def save_weights(self, output_dir: str, state_dict: dict | None, trainer_save) -> None:
        """The method's own save where it has one (every rank: FSDP2 gathers; rank 0 writes), else the Trainer's."""
        if self.own_checkpoints is not None:
            self.own_checkpoints.save(self.model, Path(output_dir))
            return
        if state_dict is None and is_fsdp2(self.model):
            state_dict = full_state_dict(self.model)  # every rank joins the gathers; rank 0 gets the tensors
        trainer_save(output_dir, state_dict)

    def load_weights(self, checkpoint: str, model, trainer_load) -> None:
        """The method's own load where it has one, else the Trainer's."""
        if self.own_checkpoints is None:
            trainer_load(checkpoint, model)
            return
        self.own_checkpoints.load(model if model is not None else self.model, Path(checkpoint))

    def checkpoint_failed(self, folder: Path, error: Exception) -> None:
        """A full disk becomes one clear error (the unfinished checkpoint removed, the older ones intact)."""
        if not disk_is_full(folder.parent, error):
            raise error
        shutil.rmtree(folder, ignore_errors=True)
        intact = resume_checkpoint(folder.parent)[0]
        kept = f"{intact.name} is intact" if intact is not None else "no checkpoint was complete yet"
        raise LeanftError(
            f"the disk holding {folder.parent} is full ({shutil.disk_usage(folder.parent).free // 1024} KiB free) "
            f"while writing {folder.name}: free some space, then resume with output_dir={folder.parent} "
            f"resume=true ({kept})"
        ) from None

    def checkpoint_saved(self, folder: Path) -> None:
        """Mark the checkpoint complete (only then does ``resume=true`` pick it), then rotate the older ones."""
        mark_complete(folder)
        if self.keep_checkpoints is not None:
            rotate_checkpoints(folder.parent, self.keep_checkpoints)


def training_arguments(config: TrainConfig, run_dir: Path, dropbp_on: bool, padding_free: bool) -> TrainingArguments:
    """The ``TrainingArguments`` for a run (checkpoints in the run folder; metrics also to ``report_to``).

    ``padding_free``: the batches hold no padding, so every input token counts as seen.

    With DropBP on, ``dropbp.patterns_per_step`` micro-batches make up each device's batch (each forward draws
    its own pattern); the examples of a step and the effective batch stay the same.
    """
    return TrainingArguments(**training_argument_values(config, run_dir, dropbp_on, padding_free))


def training_argument_values(config: TrainConfig, run_dir: Path, dropbp_on: bool, padding_free: bool) -> dict:
    """The keywords of ``training_arguments`` (a ``TrainingArguments`` subclass, such as TRL's, takes them too)."""
    micro = config.dropbp.patterns_per_step if dropbp_on else 1
    bf16 = config.uses_bf16()
    return dict(
        output_dir=str(run_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size // micro,
        gradient_accumulation_steps=config.grad_accum * micro,
        learning_rate=config.learning_rate(),
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=round(config.warmup_ratio * config.max_steps),
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=None,  # LeanftTrainer rotates, and only once the new checkpoint is complete
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        report_to=config.report_to or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=True if dropbp_on else None,
        ddp_timeout=config.ddp_timeout,
        # else accelerate runs no DDP, and refuses bf16, on a CPU
        use_cpu=not torch.cuda.is_available() and (world_size() > 1 or bf16),
        save_only_model=config.fsdp,  # transformers checkpoints no optimizer state of a model sharded by us
    )
