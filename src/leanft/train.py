"""``train(config)``: model -> method (+ DropBP) -> ``transformers.Trainer`` -> run folder with a report.

A run folder holds ``run_config.yaml``, ``checkpoint-N/`` folders (the adapter or model, optimizer, scheduler,
RNG and trainer state with the DropBP rates), then at the end ``adapter/`` (or ``model/`` for full fine-tuning),
``metrics.jsonl``, ``loss_curve.png`` and ``summary.json``. Every file leanft writes itself is written atomically;
a checkpoint counts only once its completion marker exists, so a crash mid-save never leaves a checkpoint
that ``resume=true`` would pick up half-written.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
import transformers
import yaml
from transformers import Trainer, TrainingArguments

from leanft.callback import DropBPCallback
from leanft.chunked_loss import chunked_loss_for
from leanft.config import TrainConfig, config_to_dict, load_config
from leanft.data import collate, load_jsonl_examples, tokenize_dataset
from leanft.distributed import (
    full_state_dict,
    init_distributed,
    is_fsdp2,
    is_main_process,
    run_on_main,
    shard_for_trainer,
    shared_atomic_dir,
    world_size,
)
from leanft.errors import LeanftError
from leanft.evaluate import evaluate
from leanft.fileio import atomic_dir, atomic_path, write_json
from leanft.methods import ADAPTER_DIR, attach_dropbp, attach_method, load_trained, save_trained
from leanft.models import load_model_and_tokenizer
from leanft.paca import load_paca, paca_modules, save_paca
from leanft.quant import trainer_accepts
from leanft.runlog import HeldoutCurveCallback, InterruptCallback, RunLogCallback, plot_loss_curve
from leanft.tasks import builtin_task, eval_options

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
SUMMARY_FILE = "summary.json"
BASELINE_FILE = "baseline.json"
COMPLETE_MARKER = "leanft_complete"


class LeanftTrainer(Trainer):
    """``Trainer`` that checkpoints PaCA models as adapters and marks checkpoints complete.

    ``chunked_loss=True`` computes the training loss with ``leanft.chunked_loss`` (same value and gradients, never
    the full logits) where the model's head allows; it plugs in as ``compute_loss_func``, so ``Trainer``'s
    gradient-accumulation and multi-process token counting apply unchanged.
    """

    def __init__(self, *args, chunked_loss: bool = False, **kwargs) -> None:
        model = kwargs.get("model", args[0] if args else None)
        self.chunked = chunked_loss_for(model, world_size() > 1) if chunked_loss else None
        if self.chunked is not None and kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = self.chunked
        with trainer_accepts(model):  # a 4-bit base with QPaCA layers
            super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss``, with the head returning hidden states for the chunked loss while training."""
        if self.chunked is None or return_outputs or self.compute_loss_func is not self.chunked:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.chunked.capturing(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if paca_modules(self.model):
            save_paca(self.model, output_dir or self.args.output_dir)  # every rank: FSDP2 gathers; rank 0 writes
            return
        if state_dict is None and is_fsdp2(self.model):
            state_dict = full_state_dict(self.model)  # every rank joins the gathers; rank 0 gets the tensors
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if not paca_modules(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_paca(target, resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            with atomic_path(folder / COMPLETE_MARKER) as temporary:
                temporary.write_text("complete\n")


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder whose save finished, or None."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run folder, checked against finished / unfinished runs already in it."""
    if config.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{stamp}-{config.method}"
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LeanftError(f"output_dir {run_dir} is a file: pass a folder")
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        if last_complete_checkpoint(run_dir) is None:
            raise LeanftError(f"{run_dir} holds no complete checkpoint to resume from: drop resume=true")
        return run_dir
    if (run_dir / SUMMARY_FILE).is_file() and not config.overwrite:
        raise LeanftError(f"{run_dir} holds a finished run: pass overwrite=true or choose another output_dir")
    if has_content and not config.overwrite:
        raise LeanftError(f"{run_dir} is not empty: pass resume=true to continue the run in it, or overwrite=true")
    return run_dir


def start_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run folder (emptied first for ``overwrite=true``) and record the config in it."""
    if config.overwrite and not config.resume and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / RUN_CONFIG_FILE) as temporary:
        temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def load_records(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) from a built-in task or JSONL files."""
    task = builtin_task(config.data)
    if task is not None:
        return task.generate(config.seed, config.num_train, config.num_eval)
    records = load_jsonl_examples(config.data)
    if config.eval_data is not None:
        return records, load_jsonl_examples(config.eval_data)[: config.num_eval]
    held = max(1, min(config.num_eval, len(records) // 20))
    if len(records) < 2:
        raise LeanftError(f"{config.data} has {len(records)} example: a held-out split needs at least 2")
    return records[:-held], records[-held:]


def use_bf16(config: TrainConfig) -> bool:
    """bf16 mixed precision: on when asked, or with 'auto' where a GPU supports it."""
    if config.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config.bf16 == "true"


def training_arguments(config: TrainConfig, run_dir: Path, dropbp_on: bool) -> TrainingArguments:
    """The ``TrainingArguments`` for a run (checkpoints in the run folder, no external reporting).

    With DropBP on, ``dropbp.patterns_per_step`` micro-batches make up each device's batch (each forward draws
    its own pattern); the examples of a step and the effective batch stay the same.
    """
    micro = config.dropbp.patterns_per_step if dropbp_on else 1
    return TrainingArguments(
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
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=use_bf16(config),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=True if dropbp_on else None,
        ddp_timeout=config.ddp_timeout,
        use_cpu=not torch.cuda.is_available() and world_size() > 1,  # else accelerate runs no DDP on CPU
        save_only_model=config.fsdp,  # transformers checkpoints no optimizer state of a model sharded by us
    )


def dropbp_callback(config: TrainConfig, controller, features: list, collator, device) -> DropBPCallback:
    """The DropBP callback of a run: allocation on the first examples, schedule, automatic rate."""
    settings = config.dropbp

    def first(count: int) -> dict:
        return {key: value.to(device) for key, value in collator(features[:count]).items()}

    auto = settings.rate == "auto"
    return DropBPCallback(
        controller,
        settings.allocate_at,
        first(settings.allocation_samples),
        settings.warmup,
        settings.cooldown,
        settings.allocation,
        auto_threshold=settings.auto_threshold if auto else None,
        fidelity_batch=first(config.batch_size) if auto else None,
        patterns_per_step=settings.patterns_per_step,
    )


def _baseline(run_dir: Path, model, tokenizer, records, features, config: TrainConfig, known: dict | None) -> dict:
    """Held-out metrics of the untrained model, computed once per run folder (or ``known`` already)."""
    path = run_dir / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    baseline = known if known is not None else evaluate(model, tokenizer, records, features, **eval_options(config))
    write_json(path, baseline)
    return baseline


def train(config: TrainConfig, callbacks: list | None = None, baseline: dict | None = None) -> dict:
    """Fine-tune as ``config`` says; returns the summary also written to ``summary.json``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for the Trainer; ``baseline`` is the
    untrained model's ``{"loss", "accuracy"}`` on the same held-out data where already known.
    """
    config.validate()
    init_distributed(config.ddp_timeout)
    run_dir = run_on_main(lambda: prepare_run_dir(config))  # rank 0 checks, every rank gets the folder
    transformers.set_seed(config.seed)
    train_records, eval_records = load_records(config)
    model, tokenizer = load_model_and_tokenizer(config.model, quantize=config.quantize)
    features = tokenize_dataset(train_records, tokenizer, config.max_seq_len, config.packing)
    eval_features = tokenize_dataset(eval_records, tokenizer, config.max_seq_len)
    if is_main_process():  # only now that every input is known good
        start_run_dir(run_dir, config)
    before = {}
    if is_main_process():
        before = _baseline(run_dir, model, tokenizer, eval_records, eval_features, config, baseline)

    model = attach_method(model, config.method, config.r, config.target_modules, config.seed, config.lora_alpha)
    controller = attach_dropbp(model, config.dropbp.initial_rate(), config.seed, config.dropbp.sampler)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.fsdp:
        shard_for_trainer(model)
    collator = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    run_log, interrupt = RunLogCallback(run_dir), InterruptCallback()
    callbacks = [run_log, interrupt, *(callbacks or [])]
    curve = None
    if config.eval_steps:
        curve = HeldoutCurveCallback(run_dir, eval_features, tokenizer.pad_token_id, config.eval_steps)
        callbacks.append(curve)
    if controller is not None:
        dropbp = dropbp_callback(config, controller, features, collator, next(model.parameters()).device)
        callbacks.append(dropbp)
        if world_size() > 1 and not config.fsdp:
            logger.info("DropBP on: DDP runs with find_unused_parameters=True (dropped branches get no gradient)")
    trainer = LeanftTrainer(
        model=model,
        args=training_arguments(config, run_dir, controller is not None),
        train_dataset=features,
        data_collator=collator,
        callbacks=callbacks,
        chunked_loss=config.chunked_loss and not config.fsdp,
    )
    started = time.perf_counter()
    resume_from = last_complete_checkpoint(run_dir) if config.resume else None
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    if interrupt.interrupted:
        raise KeyboardInterrupt(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {run_dir}")
    if config.fsdp:  # every rank joins the gathers of the shards, rank 0 writes and evaluates an unsharded copy
        with shared_atomic_dir(run_dir / ADAPTER_DIR) as folder:
            trainer.save_model(str(folder))
        if not trainer.args.should_save:
            return {}
        model = load_trained(load_model_and_tokenizer(config.model)[0], config.method, run_dir / ADAPTER_DIR)
    elif not trainer.args.should_save:
        return {}
    else:
        with atomic_dir(run_dir / ADAPTER_DIR) as folder:
            save_trained(model, config.method, folder)
    final_loss = curve.loss_at(trainer.state.global_step) if curve is not None else None  # measured already
    after = evaluate(model, tokenizer, eval_records, eval_features, loss=final_loss, **eval_options(config))
    summary = {
        "method": config.method,
        "lr": config.learning_rate(),
        "dropbp_rate": controller.drop_rate if controller is not None else 0.0,
        "dropbp_auto": dropbp.auto_choice if controller is not None else None,
        "dropbp_rates": controller.rates if controller is not None else None,
        "dropbp_sensitivities": controller.sensitivities if controller is not None else None,
        "dropbp_skipped_share": controller.realised_drop_fraction() if controller is not None else 0.0,
        "steps": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(run_log.tokens_per_second(trainer.state), 1),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
        "num_eval": len(eval_records),
        "heldout_curve": curve.points if curve is not None else [],
    }
    title = config.method + (f" + DropBP {controller.drop_rate:g}" if controller is not None else "")
    plot_loss_curve(run_dir, title=title)
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[torch.nn.Module, object, TrainConfig]:
    """(trained model, tokenizer, config) of a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        raise LeanftError(f"{run_dir} is not a finished leanft run (no {RUN_CONFIG_FILE} and {ADAPTER_DIR}/)")
    config = load_config(run_dir / RUN_CONFIG_FILE)
    base, tokenizer = load_model_and_tokenizer(config.model, device=device, quantize=config.quantize)
    return load_trained(base, config.method, run_dir / ADAPTER_DIR), tokenizer, config
