"""``leanft fidelity``: does DropBP suit this model and batch? ``gradient_fidelity`` over rates and patterns per step.

On the first ``batch_size`` training examples of a ``leanft train`` job (same model, method, data and seed), it
measures at each drop rate and number of patterns per step (micro-batches that each draw their own DropBP
pattern, as under gradient accumulation) how close the sampled gradients are to the full one, and prints a
markdown table; ``output=PATH.json`` also keeps the numbers, and ``plot_fidelity`` draws several such files
against model size. Every option is checked before the model loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from leanft.core.dropbp import check_rate
from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path, write_json
from leanft.run.config import TrainConfig, load_config
from leanft.run.options import apply_items, doc, split_items
from leanft.studies.tables import fmt, markdown_table

if TYPE_CHECKING:
    from leanft.run.prepare import PreparedModel

DEFAULT_PATTERNS = (1, 4, 8)
PLOT_HELP = "  plot=OUT.png results=A.json,B.json: instead of measuring, draw saved results against model size"


@dataclasses.dataclass
class FidelityKeys:
    """The keys ``leanft fidelity`` adds to those of ``leanft train``, as given."""

    rates: str = doc("comma-separated DropBP drop rates, each in [0, 1)", "0.25,0.5")
    patterns: str | None = doc(
        "comma-separated patterns per step (the batch runs as that many micro-batches, each with its own pattern); "
        f"null = {','.join(map(str, DEFAULT_PATTERNS))}, those <= batch_size",
        None,
    )
    samples: str = doc("sampled steps per (rate, patterns) pair", "6")
    output: str | None = doc("also write the results as JSON to this path (never overwrites a file)", None)


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """What ``leanft fidelity`` measures, besides the train keys."""

    rates: tuple[float, ...] = (0.25, 0.5)
    patterns: tuple[int, ...] = DEFAULT_PATTERNS
    samples: int = 6
    output: Path | None = None


def _items(key: str, text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise LeanftError(f"{key} must be a comma-separated list, got {text!r}")
    return parts


def _whole(key: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise LeanftError(f"{key} must be whole numbers {bound}, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise LeanftError(f"rates must be numbers in [0, 1), got {text!r}") from exc
    return check_rate(value, "each of rates")


def _refuse_existing(output: Path | None) -> None:
    if output is not None and output.exists():
        raise LeanftError(f"output {output} already exists: choose another path (leanft fidelity never overwrites)")


def parse_options(path: str | None, items: Sequence[str]) -> tuple[TrainConfig, StudyOptions]:
    """(train config, study options) from an optional YAML path and ``key=value`` items; raises on any bad value."""
    own, train_items = split_items(FidelityKeys, items)
    keys = apply_items(FidelityKeys(), own, "fidelity")
    config = load_config(path, train_items)
    if config.objective != "sft":
        raise LeanftError("leanft fidelity measures gradients of the supervised loss: drop objective=dpo")
    rows = config.batch_size
    patterns = (
        tuple(k for k in DEFAULT_PATTERNS if k <= rows)
        if keys.patterns is None
        else tuple(_whole("patterns", text, 1, rows) for text in _items("patterns", keys.patterns))
    )
    options = StudyOptions(
        rates=tuple(_rate(text) for text in _items("rates", keys.rates)),
        patterns=patterns,
        samples=_whole("samples", keys.samples, 1),
        output=Path(keys.output) if keys.output else None,
    )
    _refuse_existing(options.output)
    return config, options


def study_model(config: TrainConfig, rate: float) -> tuple[PreparedModel, object, dict]:
    """(the model as train sets it up, with DropBP at ``rate``; its tokenizer; its size): the dtype train loads,
    the method, fp32 trainables under bf16, compile, DropBP's sampler."""
    from leanft.run.models import load_model_and_tokenizer
    from leanft.run.prepare import prepare_model

    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.base_dtype(), quantize=config.quantize)
    text_config = model.config.get_text_config()
    size = {"parameters": model.num_parameters(), "layers": text_config.num_hidden_layers,
            "width": text_config.hidden_size}
    return prepare_model(model, config, dropbp_rate=rate), tokenizer, size


def run_study(config: TrainConfig, options: StudyOptions) -> dict:
    """Load the job's model and first batch, measure every (rate, patterns) pair; write ``options.output`` if set."""
    import torch

    from leanft.core.fidelity import answer_tokens, full_gradient, gradient_fidelity
    from leanft.run.data import collate, tokenize_dataset
    from leanft.run.sources import load_records

    prepared, tokenizer, size = study_model(config, options.rates[0])
    ctrl = prepared.controller
    features = tokenize_dataset(list(islice(load_records(config)[0], config.batch_size)), tokenizer, config.max_seq_len)
    device = next(ctrl.model.parameters()).device
    batch = {key: value.to(device) for key, value in collate(features, tokenizer.pad_token_id).items()}
    measurements = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.uses_bf16()):  # as the Trainer runs it
        full = full_gradient(ctrl, batch)
        for rate in options.rates:
            ctrl.set_rates([rate] * len(ctrl.branches))
            for patterns in options.patterns:
                scores = gradient_fidelity(ctrl, batch, options.samples, patterns, full)
                measurements.append({"rate": rate, "patterns_per_step": patterns, **scores})
    result = {
        "model": config.model,
        **size,
        "method": config.method,
        "r": config.rank(),
        "quantize": config.quantize,
        "seed": config.seed,
        "batch_rows": len(features),
        "answer_tokens": answer_tokens(batch),
        "max_seq_len": config.max_seq_len,
        "samples": options.samples,
        "measurements": measurements,
    }
    if options.output is not None:
        _refuse_existing(options.output)
        write_json(options.output, result)
    return result


def _count(parameters: int) -> str:
    if parameters >= 1e9:
        return f"{parameters / 1e9:.2f}B"
    return f"{parameters / 1e6:.0f}M" if parameters >= 1e6 else f"{parameters:,}"


LINESTYLES = ("-", "--", ":", "-.")
COLUMNS = (
    ("rate", lambda row: f"{row['rate']:g}"),
    ("patterns per step", lambda row: str(row["patterns_per_step"])),
    ("mean cosine", lambda row: fmt(row["mean_cosine"], ".3f")),
    ("per-tensor cosine", lambda row: fmt(row["mean_tensor_cosine"], ".3f")),
    ("cosine of mean", lambda row: fmt(row["cosine_of_mean"], ".3f")),
    ("norm ratio", lambda row: fmt(row["norm_ratio_of_mean"], ".3f")),
)


def render(result: dict) -> str:
    """The study as markdown: one line on the model and batch, then one table row per (rate, patterns)."""
    head = (
        f"DropBP gradient fidelity on {result['model']} ({_count(result['parameters'])} parameters, "
        f"{result['layers']} layers x {result['width']}), method {result['method']} r={result['r']}, "
        f"one batch of {result['batch_rows']} examples ({result['answer_tokens']} answer tokens), "
        f"{result['samples']} sampled steps each. Cosines are with the full gradient (1 = the same direction)."
    )
    return head + "\n\n" + markdown_table(COLUMNS, result["measurements"])


def plot_fidelity(results: Sequence[dict], path: str | Path) -> Path:
    """One PNG: per-tensor cosine against parameter count (log x), one line per (rate, patterns per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise LeanftError("plot_fidelity needs at least one result")
    series: dict[tuple[float, int], list[tuple[int, float]]] = {}
    for result in results:
        for row in result["measurements"]:
            series.setdefault((row["rate"], row["patterns_per_step"]), []).append(
                (result["parameters"], row["mean_tensor_cosine"])
            )
    rates = sorted({rate for rate, _ in series})
    counts = sorted({patterns for _, patterns in series})
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (rate, patterns), points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        axis.plot(
            xs,
            ys,
            marker="o",
            color=f"C{rates.index(rate) % 10}",
            linestyle=LINESTYLES[counts.index(patterns) % len(LINESTYLES)],
            label=f"rate {rate:g}, {patterns} pattern{'s' * (patterns > 1)}/step",
        )
    axis.set_xscale("log")
    axis.minorticks_off()
    ticks = sorted({(result["parameters"], Path(str(result["model"])).stem) for result in results})
    axis.set_xticks([size for size, _ in ticks], [f"{name}\n{_count(size)}" for size, name in ticks], fontsize=7)
    axis.set_xlim(ticks[0][0] / 1.5, ticks[-1][0] * 1.5)
    axis.set_ylim(top=1.02)
    axis.set_xlabel("parameters")
    axis.set_ylabel("per-tensor cosine with the full gradient")
    axis.set_title("DropBP gradient fidelity against model size", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    target = Path(path)
    with atomic_path(target) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return target


def plot_command(items: Sequence[str]) -> Path | None:
    """``plot=OUT.png results=A.json,B.json``: draw saved results without loading a model; None without ``plot=``."""
    options = dict(item.partition("=")[::2] for item in items)
    if "plot" not in options:
        return None
    if set(options) != {"plot", "results"} or not options["plot"]:
        raise LeanftError("to draw saved results pass exactly plot=OUT.png results=A.json,B.json")
    paths = [Path(text) for text in _items("results", options["results"])]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise LeanftError(f"results file(s) not found: {', '.join(missing)}")
    try:
        results = [json.loads(path.read_text()) for path in paths]
    except json.JSONDecodeError as exc:
        raise LeanftError(f"a results file is not JSON written by leanft fidelity ({exc.msg})") from None
    return plot_fidelity(results, options["plot"])
