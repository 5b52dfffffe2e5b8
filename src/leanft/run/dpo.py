"""``train(config)`` with ``objective=dpo``: pairs -> reference log-probs -> method (+ DropBP) -> DPO -> report.

The run folder, resume, Ctrl-C, ``metrics.jsonl`` and the loss curve work as for supervised fine-tuning
(``leanft.run.train``). The held-out pairs' reference log-probs are the untrained base model's, computed once per
run folder (kept in ``baseline.json``); the summary compares the trained model with them: preference accuracy
(the share of pairs whose chosen answer gained more log-probability over the reference than the rejected one,
ties counted half) and the mean margin, before and after (``leanft.run.dpo_eval``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.trainer_callback import PrinterCallback

from leanft.core.compat import trl_logprob_tiles
from leanft.core.distributed import is_main_process
from leanft.core.fileio import write_json
from leanft.run import run_parts as parts
from leanft.run.callbacks import HeldoutCurveCallback, InterruptCallback, RunLogCallback, plot_loss_curve
from leanft.run.config import TrainConfig
from leanft.run.data import Collator
from leanft.run.dpo_eval import pair_logps, preference_metrics
from leanft.run.dpo_trainer import LeanftDPOTrainer, dpo_arguments, reference_for
from leanft.run.files import BASELINE_FILE, SUMMARY_FILE
from leanft.run.preferences import chosen_example, load_pairs, tokenize_pairs
from leanft.run.prepare import prepare_model
from leanft.run.training_run import RunCallbacks, run_report

logger = logging.getLogger(__name__)
REFERENCES = {"paca": "the policy with its trained columns switched off", "s2ft": "the policy with its trained "
              "columns switched off", "lora": "the policy with its adapter disabled (peft)",
              "full": "log-probs precomputed by the untrained model"}  # fmt: skip


@dataclass
class PreferenceInputs:
    """What a preference run trains and evaluates on, known good before the run folder is touched."""

    run_dir: Path
    model: object
    tokenizer: object
    features: list  # tokenized pairs: prompt_ids, chosen_ids, rejected_ids
    eval_features: list
    data_report: dict


def load_preference_inputs(config: TrainConfig, run_dir: Path) -> PreferenceInputs:
    """Read and check the pairs, load model and tokenizer, tokenize; then (rank 0) start the run folder."""
    transformers.set_seed(config.seed)
    logger.info("run folder: %s", run_dir)
    train_pairs, eval_pairs = load_pairs(config)
    model, tokenizer = parts.load_checked_model(config)
    features, train_report = tokenize_pairs(train_pairs, tokenizer, config.max_seq_len)
    eval_features, eval_report = tokenize_pairs(eval_pairs, tokenizer, config.max_seq_len)
    data_report = {"train": train_report, "heldout": eval_report}
    parts.report_data_changes(data_report, config.max_seq_len)
    parts.open_run_dir(run_dir, config)
    return PreferenceInputs(run_dir, model, tokenizer, features, eval_features, data_report)


def reference_logps(inputs: PreferenceInputs, config: TrainConfig) -> tuple[torch.Tensor | None, dict]:
    """(the held-out pairs' log-probs under the untrained model, its metrics), computed once per run folder and
    kept in ``baseline.json``; (None, {}) on ranks other than 0."""
    if not is_main_process():
        return None, {}
    path = inputs.run_dir / BASELINE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        logps = torch.tensor(saved.pop("reference_logps"), dtype=torch.float64)
        return logps, saved
    logps = pair_logps(inputs.model, inputs.eval_features, inputs.tokenizer.pad_token_id)
    metrics = preference_metrics(logps, logps, config.dpo.beta)
    write_json(path, {**metrics, "reference_logps": logps.tolist()})
    return logps, metrics


class PreferenceCurveCallback(HeldoutCurveCallback):
    """Held-out preference metrics every ``every`` steps; ``eval_loss`` in ``metrics.jsonl`` is the DPO loss."""

    def __init__(self, log: RunLogCallback, features: list, pad_token_id: int, every: int, reference, beta: float
                 ) -> None:  # fmt: skip
        super().__init__(log, features, pad_token_id, every)
        self.reference, self.beta = reference, beta

    def measure(self, model) -> tuple[dict, dict]:
        """(the point's preference metrics, what ``metrics.jsonl`` records) for ``model``."""
        metrics = preference_metrics(pair_logps(model, self.features, self.pad_token_id), self.reference, self.beta)
        logged = {"eval_loss": metrics["dpo_loss"], "eval_preference_accuracy": metrics["preference_accuracy"],
                  "eval_mean_margin": metrics["mean_margin"]}  # fmt: skip
        return metrics, logged


def build_dpo_trainer(
    inputs: PreferenceInputs, config: TrainConfig, extra_callbacks: list, reference: torch.Tensor | None
) -> tuple[LeanftDPOTrainer, object, RunCallbacks]:
    """Attach the method and DropBP, and build the DPO trainer with leanft's callbacks; (trainer, controller,
    callbacks). ``reference``: the held-out reference log-probs (rank 0) for the held-out curve."""
    import datasets

    pad = inputs.tokenizer.pad_token_id
    examples = [chosen_example(f) for f in inputs.features[: max(config.batch_size, config.dropbp.allocation_samples)]]
    prepared = prepare_model(inputs.model, config)
    model, controller = prepared.model, prepared.controller
    run_callbacks = RunCallbacks(RunLogCallback(inputs.run_dir), InterruptCallback())
    if config.eval_steps and reference is not None:
        run_callbacks.curve = PreferenceCurveCallback(run_callbacks.log, inputs.eval_features, pad, config.eval_steps,
                                                 reference, config.dpo.beta)  # fmt: skip
    if controller is not None:
        parts.add_dropbp_callback(run_callbacks, config, controller, examples, Collator(pad))
    view = reference_for(model)
    trainer = LeanftDPOTrainer(
        model=model,
        ref_model=view,
        args=dpo_arguments(config, inputs.run_dir, controller is not None, precompute=view is None),
        train_dataset=datasets.Dataset.from_list(inputs.features),
        processing_class=inputs.tokenizer,
        **parts.trainer_options(config, run_callbacks, controller, extra_callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # the run log and its progress bar show the losses instead
    return trainer, controller, run_callbacks


def preference_summary(inputs: PreferenceInputs, config: TrainConfig, run: tuple, results: tuple[dict, dict]) -> dict:
    """The run's ``summary.json``; ``run`` is (trainer, controller, callbacks, wall time), ``results`` the held-out
    preference metrics (before, after)."""
    trainer, controller, run_callbacks, wall = run
    before, after = results
    curve = run_callbacks.curve
    return {
        "objective": "dpo",
        **run_report(config, trainer, controller, run_callbacks, wall),
        "dpo": dataclasses.asdict(config.dpo),
        "reference": REFERENCES.get(config.method, ""),
        **{f"{key}_{when}": metrics[key] for key in before for when, metrics in (("before", before), ("after", after))},
        "num_eval": len(inputs.eval_features),
        "heldout_curve": curve.points if curve is not None else [],
        "data": inputs.data_report,
        "run_dir": str(inputs.run_dir),
    }


def head_tiles(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """On the CPU, TRL's fused LM head in tiles of 512 tokens x 4096 vocabulary rows instead of 4096 x 32768: the
    same log-probs, and on SmolLM2-135M 0.54x the peak memory of a DPO step of 8 pairs (TRL's torch fallback makes
    several tile-sized temporaries). Its Triton kernel on a GPU keeps TRL's tiles."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return trl_logprob_tiles(tokens=512, vocab=4096) if on_cpu else contextlib.nullcontext()


def train_preferences(config: TrainConfig, run_dir: Path, callbacks: list) -> dict:
    """Preference-tune as ``config`` says (``objective=dpo``) into ``run_dir``; returns the summary (empty on
    other ranks), also written to ``summary.json``."""
    inputs = load_preference_inputs(config, run_dir)
    reference, before = reference_logps(inputs, config)
    with head_tiles(inputs.model):
        trainer, controller, run_callbacks = build_dpo_trainer(inputs, config, callbacks, reference)
        wall = parts.fit(trainer, run_callbacks, config, inputs.run_dir)
    model = parts.save_final(trainer, config, inputs.run_dir)
    if model is None:
        return {}
    logps = pair_logps(model, inputs.eval_features, inputs.tokenizer.pad_token_id)
    after = preference_metrics(logps, reference, config.dpo.beta)
    summary = preference_summary(inputs, config, (trainer, controller, run_callbacks, wall), (before, after))
    title = f"DPO, {config.method}" + (f" + DropBP {controller.drop_rate:g}" if controller is not None else "")
    plot_loss_curve(inputs.run_dir, title=title)
    write_json(inputs.run_dir / SUMMARY_FILE, summary)
    return summary
