"""``train(config)``: model -> method (+ DropBP) -> ``transformers.Trainer`` -> run folder with a report.

Every file leanft writes itself is written atomically; a checkpoint counts only once its completion marker exists,
so a crash mid-save never leaves a checkpoint that ``resume=true`` would pick up half-written (see
``leanft.run.rundir`` for the folder's layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import transformers
from transformers.trainer_callback import PrinterCallback

from leanft.core.distributed import init_distributed, is_main_process, run_on_main, shard_for_trainer
from leanft.core.errors import LeanftError
from leanft.core.fileio import write_json
from leanft.core.packed import POSITIONS, packed_attention_mode, varlen_sdpa
from leanft.run.callbacks import (
    HeldoutCurveCallback,
    InterruptCallback,
    RunLogCallback,
    TrainingClock,
    plot_loss_curve,
)
from leanft.run.config import TrainConfig
from leanft.run.data import Collator, TokenizedStream, tokenize_and_count
from leanft.run.evaluate import eval_settings, evaluate
from leanft.run.files import BASELINE_FILE, SUMMARY_FILE
from leanft.run.prepare import prepare_model
from leanft.run.run_parts import (
    add_dropbp_callback,
    fit,
    load_checked_model,
    open_run_dir,
    report_data_changes,
    save_final,
    trainer_options,
)
from leanft.run.rundir import RunFolderLock, prepare_run_dir
from leanft.run.sources import load_records
from leanft.run.trainer import LeanftTrainer, training_arguments
from leanft.run.training_run import Run, RunCallbacks, RunInputs

logger = logging.getLogger(__name__)


def claim_run_dir(config: TrainConfig, stack: contextlib.ExitStack) -> Path:
    """Check the run folder and take its lock on rank 0 (held until ``stack`` closes); every rank gets the folder."""

    def claim() -> Path:
        run_dir = prepare_run_dir(config)
        return stack.enter_context(RunFolderLock(run_dir, auto_named=config.output_dir is None))

    return run_on_main(claim)


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


def evaluate_baseline(inputs: RunInputs, config: TrainConfig, known: dict | None) -> dict:
    """Held-out metrics of the untrained model, computed once per run folder (or ``known`` already); rank 0 only."""
    if not is_main_process():
        return {}
    path = inputs.run_dir / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    records, features = inputs.eval_records, inputs.eval_features
    baseline = known if known is not None else evaluate(
        inputs.model, inputs.tokenizer, records, features, eval_settings(config, "baseline evaluation")
    )
    write_json(path, baseline)
    return baseline


def build_trainer(inputs: RunInputs, config: TrainConfig, extra_callbacks: list, clock: TrainingClock) -> Run:
    """Set the model up (``prepare_model``: method, precision, compile, DropBP, checkpointing), then the Trainer with
    leanft's callbacks, timed by ``clock``: the ``Run`` that training fills in."""
    prepared = prepare_model(inputs.model, config)
    model, controller = prepared.model, prepared.controller
    collator = training_collator(config, model, inputs.tokenizer.pad_token_id)
    if config.fsdp:
        shard_for_trainer(model)
    callbacks = RunCallbacks(RunLogCallback(inputs.run_dir, clock), InterruptCallback())
    if config.eval_steps:
        pad = inputs.tokenizer.pad_token_id
        callbacks.curve = HeldoutCurveCallback(callbacks.log, inputs.eval_features, pad, config.eval_steps)
    if controller is not None:
        allocation_collator = dataclasses.replace(collator)  # its batches are not training's: counted apart
        add_dropbp_callback(callbacks, config, controller, inputs.features, allocation_collator)
    trainer = LeanftTrainer(
        model=model,
        args=training_arguments(config, inputs.run_dir, controller is not None, collator.packing is not None),
        train_dataset=inputs.features,
        data_collator=collator,
        **trainer_options(config, callbacks, controller, extra_callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # the run log and its progress bar show the losses instead
    return Run(config, inputs, trainer, controller, callbacks)


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


def train(
    config: TrainConfig,
    callbacks: list | None = None,
    baseline: dict | None = None,
    clock: TrainingClock | None = None,
) -> dict:
    """Fine-tune as ``config`` says; returns the summary also written to ``summary.json`` (empty on other ranks).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for the Trainer; ``baseline`` is the
    untrained model's ``{"loss", "accuracy"}`` on the same held-out data where already known; ``clock`` times the
    training (tokens/s, the held-out curve), so a caller may pause it while the run waits (default: a new one).
    """
    config.validate()
    init_distributed(config.ddp_timeout)
    with contextlib.ExitStack() as stack:
        run_dir = claim_run_dir(config, stack)
        if config.objective == "dpo":  # preference tuning: its own data, trainer and report (leanft.run.dpo)
            from leanft.run.dpo import train_preferences

            return train_preferences(config, run_dir, callbacks or [])
        return run_training(load_inputs(config, run_dir), config, callbacks or [], baseline, clock or TrainingClock())


def run_training(
    inputs: RunInputs, config: TrainConfig, callbacks: list, baseline: dict | None, clock: TrainingClock
) -> dict:
    """Baseline, training, final save and evaluation of a run whose inputs are loaded; returns the summary."""
    before = evaluate_baseline(inputs, config, baseline)
    run = build_trainer(inputs, config, callbacks, clock)
    run.before = before
    run.wall_s = fit(run.trainer, run.callbacks, config, inputs.run_dir)
    model = save_final(run.trainer, config, inputs.run_dir)
    if model is None:
        return {}
    curve = run.callbacks.curve
    final_loss = curve.loss_at(run.trainer.state.global_step) if curve is not None else None  # measured already
    run.after = evaluate(model, inputs.tokenizer, inputs.eval_records, inputs.eval_features,
                         eval_settings(config, "final evaluation"), loss=final_loss)
    summary = run.summary()
    title = config.method + (f" + DropBP {run.controller.drop_rate:g}" if run.controller is not None else "")
    plot_loss_curve(inputs.run_dir, title=title)
    write_json(inputs.run_dir / SUMMARY_FILE, summary)
    return summary
