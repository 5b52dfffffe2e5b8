"""``leanft compare``: several methods trained on the same model, data, seed and steps, quality against time.

Each variant is a ``leanft train`` run (in ``OUTPUT_DIR/<variant>/``) that measures the held-out loss every
``eval_every`` steps (``eval_steps`` of ``leanft train``). Training time excludes those evaluations and includes
everything a method costs (DropBP's allocation too). The first variant is the baseline: a variant's
time-to-quality is the training time at which its held-out loss first reaches the baseline's final one.
With ``budget_s`` the variants get equal training time instead of equal steps: a short probe run measures each
variant's step time, and its schedule is set to the steps that fit (so the cosine anneals within the budget).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path, write_json
from leanft.run.config import TrainConfig, load_config
from leanft.run.files import BASELINE_FILE, METRICS_FILE
from leanft.run.options import apply_items, doc, split_config_path, split_items
from leanft.studies.compare_report import plot_curves, render_table, time_to_quality
from leanft.studies.variants import (
    EXAMPLES,
    STUDY_DROP_RATE,
    VARIANT_TRAIN_KEYS,
    parse_variants,
    study_variants,
    variant_base,
    variant_train_config,
)

logger = logging.getLogger(__name__)


DEFAULT_VARIANTS = "lora,paca,lora+dropbp,paca+dropbp,paca+dropbp-uniform"
PROBE_STEPS = 10  # a budgeted variant's probe run; its first half (warm-up: allocation, pages of the weights
# written for the first time, which a PaCA step pays for several steps) does not set its step time
PROBE_DIR = "probes"
RESULT_FILE = "compare.json"
TABLE_FILE = "compare.md"
PLOT_FILE = "compare_loss.png"


@dataclasses.dataclass
class CompareOptions:
    """The keys ``leanft compare`` adds to those of ``leanft train``."""

    variants: str = doc(
        "comma-separated, the first is the baseline; choose from " + ", ".join(study_variants())
        + f"; DropBP variants run at dropbp.rate ({STUDY_DROP_RATE} when it is 0). A variant may set its own "
        + ", ".join(VARIANT_TRAIN_KEYS) + ", its method's own keys and DropBP keys after colons: " + EXAMPLES,
        DEFAULT_VARIANTS,
    )
    eval_every: int = doc("held-out loss every N optimizer steps (not counted as training time)", 10)
    budget_s: float | None = doc(
        "equal wall time instead of equal steps: each variant trains for about this many seconds (evaluation "
        f"excluded); its step count, and so its schedule's length, comes from its seconds per token in the second "
        f"half of a {PROBE_STEPS}-step probe run; null = every variant runs max_steps",
        None,
    )
    interleave: bool = doc(
        "train the variants in turns, one optimizer step each in rotation (one process per variant, all in "
        "memory at once), so that drift in the machine's speed reaches them alike; false = one after another",
        False,
    )

    def validate(self) -> CompareOptions:
        """Raise a LeanftError naming the first bad option; normalises ``variants``; returns self."""
        if self.eval_every < 1:
            raise LeanftError(f"eval_every must be a whole number >= 1, got {self.eval_every!r}")
        if self.budget_s is not None and not (isinstance(self.budget_s, (int, float)) and self.budget_s > 0):
            raise LeanftError(f"budget_s must be a number of seconds > 0 (or null), got {self.budget_s!r}")
        names = parse_variants(self.variants)
        self.variants = ",".join(names)
        return self


def parse_compare_args(items: Sequence[str]) -> tuple[CompareOptions, str | None, list[str]]:
    """(compare options, YAML path or None, the ``leanft train`` overrides) from the command's arguments."""
    path, items = split_config_path(items)
    own, overrides = split_items(CompareOptions, items)
    return apply_items(CompareOptions(), own, "compare").validate(), path, overrides


def variant_config(base: TrainConfig, name: str, study_dir: Path, eval_every: int) -> TrainConfig:
    """The ``TrainConfig`` of one variant: the shared settings with its method and DropBP settings, in its own
    folder, evaluated every ``eval_every`` steps."""
    run = dataclasses.replace(base, output_dir=str(study_dir / name), eval_steps=eval_every, resume=False,
                              overwrite=False)
    return variant_train_config(run, name)


def check_study(base: TrainConfig, names: Sequence[str]) -> None:
    """Refuse settings under which the named variants would not be what their names say."""
    if base.dropbp.allocate_at is None and any(study_variants()[variant_base(n)]["allocate"] for n in names):
        raise LeanftError("allocated DropBP variants need dropbp.allocate_at (default 0.1); use *-uniform variants")
    if base.resume:
        raise LeanftError("leanft compare cannot resume: rerun it (overwrite=true replaces the study folder)")
    if base.objective != "sft":
        raise LeanftError("leanft compare compares supervised runs by held-out loss: drop objective=dpo")


def prepare_study_dir(base: TrainConfig) -> Path:
    """The study folder: new, or emptied with ``overwrite=true``; never a finished study overwritten silently."""
    from leanft.run.rundir import default_output_dir, fresh_output_dir  # imports torch: not for --help

    if base.output_dir is None:
        return default_output_dir("compare")
    folder = Path(base.output_dir)
    fresh_output_dir(folder, base.overwrite, "is not empty")
    return folder


def run_variant(config: TrainConfig, baseline: dict | None) -> tuple[dict, list[dict]]:
    """Train one variant; (its summary, its held-out curve with the untrained point at time 0)."""
    from leanft.run.train import train

    return curve_of(train(config, baseline=baseline))


def curve_of(summary: dict) -> tuple[dict, list[dict]]:
    """(a variant's summary, its held-out curve with the untrained point at time 0)."""
    start = {"step": 0, "time_s": 0.0, "heldout_loss": summary["heldout_loss_before"]}
    return summary, [start, *summary["heldout_curve"]]


def probe_step_time(config: TrainConfig, probe_dir: Path, baseline: dict | None) -> float:
    """Seconds per optimizer step of ``config`` on an average batch, from a ``PROBE_STEPS``-step run in ``probe_dir``.

    The probe's batches are the data's first ones, not a typical draw of their lengths, so it measures seconds
    per token (the median over the second half of its steps: the first ones are slower) and scales it to the
    training data's mean tokens per step. The probe evaluates on one held-out example and saves no checkpoint.
    """
    from leanft.run.train import train

    probe = dataclasses.replace(config, max_steps=PROBE_STEPS, output_dir=str(probe_dir), eval_steps=0,
                                logging_steps=1, save_steps=PROBE_STEPS + 1, num_eval=1, max_new_tokens=1)
    summary = train(probe.validate(), baseline=baseline)
    lines = [json.loads(line) for line in (probe_dir / METRICS_FILE).read_text().splitlines()]
    logged = [(line["elapsed_s"], line["num_input_tokens_seen"]) for line in lines if "loss" in line]
    steps = logged[len(logged) // 2 - 1:]  # the intervals of the second half
    data = summary["data"]["train"]
    if "tokens" not in data:  # a stream: its mean length is not known ahead
        return statistics.median(t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(steps))
    per_token = statistics.median((t1 - t0) / (n1 - n0) for (t0, n0), (t1, n1) in itertools.pairwise(steps))
    examples_per_step = config.batch_size * config.grad_accum
    return per_token * examples_per_step * data["tokens"] / (data["examples"] - data["dropped"])


def budgeted(config: TrainConfig, budget_s: float, step_s: float) -> TrainConfig:
    """``config`` with as many steps as fit in ``budget_s`` at ``step_s`` seconds each (at least 1)."""
    return dataclasses.replace(config, max_steps=max(1, int(budget_s / step_s)))


def train_variants(configs: dict[str, TrainConfig], options: CompareOptions, study_dir: Path) -> tuple:
    """Train the variants one after another, each probed first with ``budget_s``; (summaries, curves, probe step
    times) by variant name. The untrained model is evaluated once, by the first variant."""
    summaries, curves, baseline, step_times = {}, {}, None, {}
    for index, (name, config) in enumerate(configs.items(), start=1):
        if options.budget_s is not None:
            step_times[name] = probe_step_time(config, study_dir / PROBE_DIR / name, baseline)
            config = budgeted_with_log(config, options.budget_s, step_times[name], f"[{index}/{len(configs)}] {name}")
        logger.info("[%d/%d] %s: training %d steps", index, len(configs), name, config.max_steps)
        summaries[name], curves[name] = run_variant(config, baseline)
        if baseline is None:  # the untrained model is the same for every variant: evaluate it once
            baseline = json.loads((Path(config.output_dir) / BASELINE_FILE).read_text())
    return summaries, curves, step_times


def train_interleaved_variants(configs: dict[str, TrainConfig], options: CompareOptions, study_dir: Path) -> tuple:
    """Train the variants in turns (``leanft.studies.interleave``); with ``budget_s`` their probes run first, one
    after another. (summaries, curves, probe step times) by variant name."""
    from leanft.studies.interleave import train_interleaved

    step_times, probe_baseline, runs = {}, None, dict(configs)
    if options.budget_s is not None:
        for name, config in configs.items():
            step_times[name] = probe_step_time(config, study_dir / PROBE_DIR / name, probe_baseline)
            runs[name] = budgeted_with_log(config, options.budget_s, step_times[name], name)
            if probe_baseline is None:  # the probes share one evaluation of the untrained model, as the runs do
                probe_baseline = json.loads((study_dir / PROBE_DIR / name / BASELINE_FILE).read_text())
    logger.info("training %s in turns, one optimizer step each: %s", ", ".join(runs),
                ", ".join(f"{config.max_steps} steps" for config in runs.values()))  # fmt: skip
    summaries = dict(zip(runs, train_interleaved(list(runs.values())), strict=True))
    return summaries, {name: curve_of(summary)[1] for name, summary in summaries.items()}, step_times


def budgeted_with_log(config: TrainConfig, budget_s: float, step_s: float, label: str) -> TrainConfig:
    """``budgeted``, saying how many steps that gives."""
    config = budgeted(config, budget_s, step_s)
    logger.info("%s: %.2f s/step in its probe, so %d steps in %g s", label, step_s, config.max_steps, budget_s)
    return config


def study_results(names: Sequence[str], summaries: dict[str, dict], curves: dict[str, list[dict]]) -> list[dict]:
    """One result per variant: final loss and accuracy, times, and time-to-quality against the first variant."""
    baseline = names[0]
    target = curves[baseline][-1]["heldout_loss"]
    baseline_time = time_to_quality(curves[baseline], target)
    rows = []
    for name in names:
        summary, curve = summaries[name], curves[name]
        reached = time_to_quality(curve, target)
        rows.append({
            "variant": name,
            "method": summary["method"],
            "lr": summary["lr"],
            "dropbp_rate": summary["dropbp_rate"],
            "allocated": summary["dropbp_sensitivities"] is not None,
            "dropbp_skipped_share": summary.get("dropbp_skipped_share", 0.0),
            "steps": summary["steps"],
            "train_time_s": curve[-1]["time_s"],
            "final_heldout_loss": curve[-1]["heldout_loss"],
            "accuracy": summary["accuracy_after"],
            "time_to_baseline_loss_s": reached,
            "time_to_quality_ratio": None if reached is None or not baseline_time else reached / baseline_time,
            "dropbp_rates": summary["dropbp_rates"],
            "dropbp_sensitivities": summary["dropbp_sensitivities"],
            "curve": curve,
        })
    return rows


def run_compare(items: Sequence[str]) -> dict:
    """Run ``leanft compare`` on its command-line arguments; returns what ``compare.json`` holds."""
    options, path, overrides = parse_compare_args(items)
    base = load_config(path, overrides)
    names = options.variants.split(",")
    check_study(base, names)
    study_dir = prepare_study_dir(base)
    configs = {name: variant_config(base, name, study_dir, options.eval_every) for name in names}
    study_dir.mkdir(parents=True, exist_ok=True)
    trained = train_interleaved_variants if options.interleave else train_variants
    summaries, curves, step_times = trained(configs, options, study_dir)
    rows = study_results(names, summaries, curves)
    for row in rows:
        row["probe_s_per_step"] = step_times.get(row["variant"])
    result = {
        "baseline": names[0],
        "settings": {"model": base.model, "data": base.data, "max_steps": base.max_steps, "seed": base.seed,
                     "batch_size": base.batch_size, "r": base.r, "eval_every": options.eval_every,
                     "budget_s": options.budget_s, "interleave": options.interleave},
        "accuracy_before": summaries[names[0]]["accuracy_before"],
        "heldout_loss_before": summaries[names[0]]["heldout_loss_before"],
        "variants": rows,
    }
    table = render_table(rows, names[0])
    with atomic_path(study_dir / TABLE_FILE) as temporary:
        temporary.write_text(table + "\n")
    length = f"{options.budget_s:g} s each" if options.budget_s is not None else f"{base.max_steps} steps"
    plot_curves(rows, study_dir / PLOT_FILE, title=f"{base.model} on {base.data}, {length}")
    write_json(study_dir / RESULT_FILE, result)
    print(table)
    print(f"\nwritten: {study_dir / RESULT_FILE}, {study_dir / TABLE_FILE}, {study_dir / PLOT_FILE}")
    return result
