"""``train(config)``: model -> method (+ DropBP) -> ``transformers.Trainer`` -> run folder with a report.

Every file leanft writes itself is written atomically; a checkpoint counts only once its completion marker exists,
so a crash mid-save never leaves a checkpoint that ``resume=true`` would pick up half-written (see
``leanft.run.rundir`` for the folder's layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import transformers
from transformers.trainer_callback import PrinterCallback

from leanft.core.callback import DropBPCallback
from leanft.core.distributed import (
    init_distributed,
    is_main_process,
    run_on_main,
    shard_for_trainer,
    shared_atomic_dir,
    world_size,
)
from leanft.core.dropbp import DropBP
from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_dir, write_json
from leanft.core.packed import POSITIONS, packed_attention_mode, varlen_sdpa
from leanft.run.callbacks import (
    HeldoutCurveCallback,
    InterruptCallback,
    RunLogCallback,
    plot_loss_curve,
    trim_metrics,
)
from leanft.run.config import TrainConfig
from leanft.run.data import Collator, TokenizedStream, tokenize_and_count
from leanft.run.evaluate import eval_options, evaluate
from leanft.run.files import ADAPTER_DIR, BASELINE_FILE, SUMMARY_FILE
from leanft.run.methods import load_trained, method_spec
from leanft.run.models import load_model_and_tokenizer
from leanft.run.optimizers import checkpoint_globals
from leanft.run.prepare import prepare_model
from leanft.run.rundir import (
    RunFolderLock,
    clear_newer_checkpoints,
    prepare_run_dir,
    resume_checkpoint,
    start_run_dir,
)
from leanft.run.sources import load_records
from leanft.run.trainer import LeanftTrainer, training_arguments

logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What a run trains and evaluates on, known good before the run folder is touched."""

    run_dir: Path
    model: object
    tokenizer: object
    features: list | TokenizedStream  # a stream with streaming=true
    eval_records: list
    eval_features: list
    data_report: dict  # examples dropped or truncated by tokenization, per split


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


def claim_run_dir(config: TrainConfig, stack: contextlib.ExitStack) -> Path:
    """Check the run folder and take its lock on rank 0 (held until ``stack`` closes); every rank gets the folder."""

    def claim() -> Path:
        run_dir = prepare_run_dir(config)
        return stack.enter_context(RunFolderLock(run_dir, auto_named=config.output_dir is None))

    return run_on_main(claim)


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


def load_inputs(config: TrainConfig, run_dir: Path) -> RunInputs:
    """Load data, model and tokenizer, tokenize; then (rank 0) start the run folder."""
    transformers.set_seed(config.seed)
    logger.info("run folder: %s", run_dir)
    train_records, eval_records = load_records(config)
    model, tokenizer = load_checked_model(config)
    if config.streaming:
        features, train_report = TokenizedStream(train_records, tokenizer, config.max_seq_len), {"streaming": True}
    else:
        features, train_report = tokenize_and_count(train_records, tokenizer, config.max_seq_len, config.packing)
    eval_features, eval_report = tokenize_and_count(eval_records, tokenizer, config.max_seq_len)
    data_report = {"train": train_report, "heldout": eval_report}
    report_data_changes(data_report, config.max_seq_len)
    open_run_dir(run_dir, config)
    return RunInputs(run_dir, model, tokenizer, features, eval_records, eval_features, data_report)


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


def evaluate_baseline(inputs: RunInputs, config: TrainConfig, known: dict | None) -> dict:
    """Held-out metrics of the untrained model, computed once per run folder (or ``known`` already); rank 0 only."""
    if not is_main_process():
        return {}
    path = inputs.run_dir / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    records, features = inputs.eval_records, inputs.eval_features
    baseline = known if known is not None else evaluate(
        inputs.model, inputs.tokenizer, records, features, desc="baseline evaluation", **eval_options(config)
    )
    write_json(path, baseline)
    return baseline


def build_trainer(
    inputs: RunInputs, config: TrainConfig, extra_callbacks: list
) -> tuple[LeanftTrainer, DropBP | None, dict]:
    """Attach the method and DropBP, and build the Trainer with leanft's callbacks; (trainer, controller, callbacks)."""
    calibration = calibration_batch(config, inputs.model, inputs.features, inputs.tokenizer.pad_token_id)
    prepared = prepare_model(inputs.model, config, calibration)
    model, controller = prepared.model, prepared.controller
    collator = training_collator(config, model, inputs.tokenizer.pad_token_id)
    if config.fsdp:
        shard_for_trainer(model)
    named = {"log": RunLogCallback(inputs.run_dir), "interrupt": InterruptCallback()}
    if config.eval_steps:
        pad = inputs.tokenizer.pad_token_id
        named["curve"] = HeldoutCurveCallback(inputs.run_dir, inputs.eval_features, pad, config.eval_steps)
    if controller is not None:
        allocation_collator = dataclasses.replace(collator)  # its batches are not training's: counted apart
        add_dropbp_callback(named, config, controller, inputs.features, allocation_collator)
    trainer = LeanftTrainer(
        model=model,
        args=training_arguments(config, inputs.run_dir, controller is not None, collator.packing is not None),
        train_dataset=inputs.features,
        data_collator=collator,
        chunked_loss=config.chunked_loss and not config.fsdp,
        loss_kernel=config.loss_kernel,
        **trainer_options(config, named, controller, extra_callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # the run log and its progress bar show the losses instead
    return trainer, controller, named


def trainer_options(config: TrainConfig, named: dict, controller: DropBP | None, extra_callbacks: list) -> dict:
    """The ``LeanftTrainer`` keywords of every run: callbacks, DDP's communication hook, optimizer, the method's
    checkpoints and their rotation, leanft's metrics in the logs."""
    return dict(
        callbacks=[*named.values(), *extra_callbacks],
        comm_hook=config.ddp_comm_hook,
        optimizer_name=config.optimizer,
        powersgd_rank=config.powersgd_rank,
        method=config.method,
        keep_checkpoints=config.save_total_limit,
        extra_metrics=functools.partial(run_metrics, named["log"], controller),
    )


def calibration_batch(config: TrainConfig, model, features, pad_token_id: int) -> dict | None:
    """PaCA's data-aware columns (``paca.columns`` other than random) are scored on the first training batch of
    ``features`` (supervised examples), as one padding-free row; None where nothing is scored."""
    if config.method != "paca" or config.keys_of("paca").columns == "random":
        return None
    collator = Collator(pad_token_id, POSITIONS)  # one row, no padding in the scores
    return on_device(collator(first_examples(features, config.batch_size)), next(model.parameters()).device)


def add_dropbp_callback(named: dict, config: TrainConfig, controller: DropBP, features, collator) -> None:
    """Add DropBP's callback (as ``named["dropbp"]``), its batches from ``features`` (supervised examples)."""
    device = next(controller.model.parameters()).device
    named["dropbp"] = dropbp_callback(config, controller, features, collator, device)
    if world_size() > 1 and not config.fsdp:
        logger.info("DropBP on: DDP runs with find_unused_parameters=True (dropped branches get no gradient)")


def training_collator(config: TrainConfig, model, pad_token_id: int) -> Collator:
    """Padded or padding-free training batches (``padding_free``, ``packing``), as the model's attention allows."""
    if not (config.padding_free or config.packing):
        return Collator(pad_token_id)
    with varlen_sdpa(model):  # as in training
        mode = packed_attention_mode(model)
    if mode is None and config.packing:
        raise LeanftError("packing=true: this model's attention does not keep the examples of a block apart "
                          "(neither from position ids nor from a 4D mask): use packing=false")
    if mode is None:
        logger.warning("this model's attention does not keep examples in one row apart: padded batches instead")
        return Collator(pad_token_id)
    logger.info("padding-free batches: one row per batch, examples kept apart by %s",
                "restarting position ids" if mode == POSITIONS else "a block-diagonal 4D attention mask")
    return Collator(pad_token_id, mode, mask_dtype=model.get_input_embeddings().weight.dtype)


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


def run_report(config: TrainConfig, trainer, controller: DropBP | None, named: dict, wall: float) -> dict:
    """What every run's summary reports first: method, learning rate, DropBP's settings and realised share, steps,
    time, throughput and precision."""
    dropbp = named.get("dropbp")
    return {
        "method": config.method,
        "lr": config.learning_rate(),
        "dropbp_rate": controller.drop_rate if controller is not None else 0.0,
        "dropbp_auto": dropbp.auto_choice if dropbp is not None else None,
        "dropbp_rates": controller.rates if controller is not None else None,
        "dropbp_sensitivities": controller.sensitivities if controller is not None else None,
        "dropbp_skipped_share": controller.realised_drop_fraction() if controller is not None else 0.0,
        "steps": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(named["log"].tokens_per_second(trainer.state), 1),
        "precision": config.precision(),
    }


def summarise(
    inputs: RunInputs, config: TrainConfig, trainer, controller, named: dict, results: tuple[dict, dict], wall: float
) -> dict:
    """The run's ``summary.json``; ``results`` are the held-out metrics (before, after)."""
    before, after = results
    curve = named.get("curve")
    return {
        **run_report(config, trainer, controller, named, wall),
        "padding_share": round(trainer.data_collator.padding_share(), 4),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
        "num_eval": len(inputs.eval_records),
        "heldout_curve": curve.points if curve is not None else [],
        "data": inputs.data_report,
        "run_dir": str(inputs.run_dir),
    }


def train(config: TrainConfig, callbacks: list | None = None, baseline: dict | None = None) -> dict:
    """Fine-tune as ``config`` says; returns the summary also written to ``summary.json`` (empty on other ranks).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for the Trainer; ``baseline`` is the
    untrained model's ``{"loss", "accuracy"}`` on the same held-out data where already known.
    """
    config.validate()
    init_distributed(config.ddp_timeout)
    with contextlib.ExitStack() as stack:
        run_dir = claim_run_dir(config, stack)
        if config.objective == "dpo":  # preference tuning: its own data, trainer and report (leanft.run.dpo)
            from leanft.run.dpo import train_preferences

            return train_preferences(config, run_dir, callbacks or [])
        return run_training(load_inputs(config, run_dir), config, callbacks or [], baseline)


def fit(trainer, named: dict, config: TrainConfig, run_dir: Path) -> float:
    """Train (from the last checkpoint with ``resume=true``); after a Ctrl-C, whose checkpoint the interrupt
    callback saved, raise ``KeyboardInterrupt`` saying how to resume. Returns the training's wall time (s)."""
    started = time.perf_counter()
    resume_from = resume_checkpoint(run_dir)[0] if config.resume else None
    try:
        with checkpoint_globals(config.optimizer), varlen_sdpa(trainer.model):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        named["log"].close()
    if named["interrupt"].interrupted:
        raise KeyboardInterrupt(
            f"interrupted at step {trainer.state.global_step}; checkpoint saved: continue with "
            f"leanft train output_dir={run_dir} resume=true"
        )
    return time.perf_counter() - started


def run_training(inputs: RunInputs, config: TrainConfig, callbacks: list, baseline: dict | None) -> dict:
    """Baseline, training, final save and evaluation of a run whose inputs are loaded; returns the summary."""
    before = evaluate_baseline(inputs, config, baseline)
    trainer, controller, named = build_trainer(inputs, config, callbacks)
    wall = fit(trainer, named, config, inputs.run_dir)
    model = save_final(trainer, config, inputs.run_dir)
    if model is None:
        return {}
    curve = named.get("curve")
    final_loss = curve.loss_at(trainer.state.global_step) if curve is not None else None  # measured already
    after = evaluate(model, inputs.tokenizer, inputs.eval_records, inputs.eval_features, loss=final_loss,
                     desc="final evaluation", **eval_options(config))
    summary = summarise(inputs, config, trainer, controller, named, (before, after), wall)
    title = config.method + (f" + DropBP {controller.drop_rate:g}" if controller is not None else "")
    plot_loss_curve(inputs.run_dir, title=title)
    write_json(inputs.run_dir / SUMMARY_FILE, summary)
    return summary
