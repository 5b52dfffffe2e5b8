"""The parts of a training run that supervised and preference tuning share (``leanft.run.train``,
``leanft.run.dpo``): the checked model, the run folder's start, DropBP's callback, the trainer's keywords, training
with Ctrl-C and resume, the final save and the common part of the summary."""

from __future__ import annotations

import functools
import logging
import time
from itertools import islice
from pathlib import Path

import torch

from leanft.core.autorate import AutoRate
from leanft.core.callback import DropBPCallback, DropSchedule
from leanft.core.distributed import is_main_process, shared_atomic_dir, world_size
from leanft.core.dropbp import DropBP
from leanft.core.fileio import atomic_dir
from leanft.core.packed import varlen_sdpa
from leanft.run.callbacks import RunLogCallback, trim_metrics
from leanft.run.config import TrainConfig
from leanft.run.files import ADAPTER_DIR
from leanft.run.methods import load_trained, method_spec
from leanft.run.models import load_model_and_tokenizer
from leanft.run.optimizers import checkpoint_globals
from leanft.run.rundir import clear_newer_checkpoints, resume_checkpoint, start_run_dir
from leanft.run.trainer import LeanftTrainer, TrainerSettings
from leanft.run.training_run import RunCallbacks

logger = logging.getLogger(__name__)


def first_examples(features, count: int) -> list:
    """The first ``count`` training examples (of a list or a stream)."""
    return list(islice(features, count))


def on_device(batch: dict, device) -> dict:
    """``batch`` with its tensors on ``device``."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def dropbp_callback(config: TrainConfig, controller: DropBP, features: list, collator, device) -> DropBPCallback:
    """The DropBP callback of a run: allocation on the first examples, schedule, automatic rate."""
    settings = config.dropbp

    def first(count: int) -> dict:
        return on_device(collator(first_examples(features, count)), device)

    auto = None
    if settings.rate == "auto":
        auto = AutoRate(settings.auto_threshold, settings.patterns_per_step, batch=first(config.batch_size))
    schedule = DropSchedule(settings.warmup, settings.cooldown)
    return DropBPCallback(controller, settings.allocate_at, first(settings.allocation_samples), schedule,
                          settings.allocation, auto)


def report_data_changes(report: dict, max_seq_len: int) -> None:
    """One log line per split that tokenization changed (examples dropped, answers cut, examples over a block)."""
    for split, counts in report.items():
        if "examples" not in counts:  # a stream: counted only as it is read
            continue
        changes = [f"{counts[key]} {text}" for key, text in (
            ("dropped", "dropped (no answer token within max_seq_len)"),
            ("truncated", "with the answer cut at max_seq_len"),
            ("longer_than_a_block", "longer than a packed block"),
        ) if counts[key]]
        if changes:
            logger.warning("%s data, %d examples: %s (max_seq_len=%d)", split, counts["examples"], "; ".join(changes),
                           max_seq_len)


def load_checked_model(config: TrainConfig) -> tuple:
    """(model, tokenizer) of a run, checked against its method before the run folder is touched."""
    logger.info("loading model %s; compute precision %s", config.model, config.precision())
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.base_dtype(), quantize=config.quantize)
    method_spec(config.method).check(model, config.method_settings())
    return model, tokenizer


def open_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Start the run folder (rank 0), only once every input is known good; with ``resume=true`` prepare it."""
    if is_main_process():
        start_run_dir(run_dir, config)
        if config.resume:
            prepare_resume(run_dir)


def prepare_resume(run_dir: Path) -> None:
    """Say which checkpoint the run resumes from and why it skipped newer ones; clear what it will redo."""
    resume_from, skipped = resume_checkpoint(run_dir)
    for reason in skipped:
        logger.warning("skipping %s", reason)
    logger.info("resuming from %s", resume_from)
    clear_newer_checkpoints(run_dir, resume_from)
    trim_metrics(run_dir, int(resume_from.name.rsplit("-", 1)[1]))


def trainer_options(
    config: TrainConfig, callbacks: RunCallbacks, controller: DropBP | None, extra_callbacks: list
) -> dict:
    """The ``LeanftTrainer`` keywords of every run: callbacks, its settings (loss, DDP's communication hook,
    optimizer, the method's checkpoints and their rotation), leanft's metrics in the logs."""
    return dict(
        callbacks=[*callbacks.all(), *extra_callbacks],
        settings=TrainerSettings.from_config(config),
        extra_metrics=functools.partial(run_metrics, callbacks.log, controller),
    )


def add_dropbp_callback(callbacks: RunCallbacks, config: TrainConfig, controller: DropBP, features, collator) -> None:
    """Add DropBP's callback (as ``callbacks.dropbp``), its batches from ``features`` (supervised examples)."""
    device = next(controller.model.parameters()).device
    callbacks.dropbp = dropbp_callback(config, controller, features, collator, device)
    if world_size() > 1 and not config.fsdp:
        logger.info("DropBP on: DDP runs with find_unused_parameters=True (dropped branches get no gradient)")


def run_metrics(run_log: RunLogCallback, controller: DropBP | None) -> dict[str, float]:
    """What a run adds to the Trainer's logs: tokens/s, and with DropBP its realised skipped share and mean rate."""
    metrics = {"tokens_per_s": round(run_log.tokens_per_second(run_log.state), 1)} if run_log.state else {}
    if controller is not None:
        metrics["dropbp_skipped_share"] = controller.realised_drop_fraction()
        metrics["dropbp_mean_rate"] = sum(controller.rates) / len(controller.rates)
    return metrics


def save_final(trainer: LeanftTrainer, config: TrainConfig, run_dir: Path):
    """Write the trained adapter or model; the model to evaluate on rank 0 (None on other ranks)."""
    if config.fsdp:  # every rank joins the gathers of the shards, rank 0 writes and evaluates an unsharded copy
        with shared_atomic_dir(run_dir / ADAPTER_DIR) as folder:
            trainer.save_model(str(folder))
        if not trainer.args.should_save:
            return None
        return load_trained(load_model_and_tokenizer(config.model)[0], config.method, run_dir / ADAPTER_DIR)
    if not trainer.args.should_save:
        return None
    with atomic_dir(run_dir / ADAPTER_DIR) as folder:
        method_spec(config.method).save(trainer.model, folder)
    return trainer.model


def fit(trainer, callbacks: RunCallbacks, config: TrainConfig, run_dir: Path) -> float:
    """Train (from the last checkpoint with ``resume=true``); after a Ctrl-C, whose checkpoint the interrupt
    callback saved, raise ``KeyboardInterrupt`` saying how to resume. Returns the training's wall time (s)."""
    started = time.perf_counter()
    resume_from = resume_checkpoint(run_dir)[0] if config.resume else None
    try:
        with checkpoint_globals(config.optimizer), varlen_sdpa(trainer.model):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        callbacks.log.close()
    if callbacks.interrupt.interrupted:
        raise KeyboardInterrupt(
            f"interrupted at step {trainer.state.global_step}; checkpoint saved: continue with "
            f"leanft train output_dir={run_dir} resume=true"
        )
    return time.perf_counter() - started
