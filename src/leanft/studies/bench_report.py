"""Numbers and text of ``leanft bench``: methods, ratios to LoRA, the DropBP cost model, the markdown table.

Everything here is pure (no models, no processes), so it is tested directly on made-up measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from leanft.run.config import TrainConfig
from leanft.run.methods import METHODS
from leanft.run.tasks import builtin_task
from leanft.studies.tables import Column, fmt, markdown_table
from leanft.studies.variants import variant_base, variant_items, variant_name


def _labels() -> tuple[dict[str, str], dict[str, str]]:
    """(table label, short label) of every bench base: each registered method and its 4-bit form."""
    labels, short = {}, {}
    for spec in METHODS.values():
        labels[spec.name], short[spec.name] = spec.label, spec.short_label
        if spec.quantized:
            quantized = "Q" + spec.short_label
            labels[spec.quantized], short[spec.quantized] = f"{quantized} (nf4)", quantized
    return labels, short


def uses_real_data(config: TrainConfig) -> bool:
    """Whether the bench's rows train on ``config.data`` (a file or dataset) rather than a fixed random batch."""
    return builtin_task(config.data) is None


BASE_LABELS, SHORT_LABELS = _labels()
BASELINE = "lora"
TINY_MODEL = "tiny"  # quick's model spec: bench_worker's small random Llama
PEER = "lora:bf16=false"  # peft LoRA in float32, as a user gets it from peft + transformers with no dtype set
MIB = 1024 * 1024
OPTIMIZER_LABELS = {"adamw": "", "apollo": " + APOLLO", "apollo-mini": " + APOLLO-Mini"}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a variant without DropBP (``paca``, ``full:optimizer=apollo``,
    ``paca:quantize=4bit``; see ``leanft.studies.variants``), optionally with uniform DropBP at ``rate`` or with
    every branch dropped (``floor``). Rows of one variant share its timing worker."""

    name: str
    rate: float = 0.0
    floor: bool = False

    @property
    def base(self) -> str:
        """The registered method."""
        return variant_base(self.name)

    @property
    def worker(self) -> str:
        """What its timing worker holds: the variant; rows differing only in DropBP share one."""
        return self.name

    @property
    def key(self) -> str:
        """The row's variant name: ``paca``, ``paca+dropbp-uniform:rate=0.5``, ``paca+floor``, ``lora:bf16=false``."""
        items = variant_items(self.name)
        if self.floor:
            return variant_name(f"{self.base}+floor", items)
        if self.rate:
            return variant_name(f"{self.base}+dropbp-uniform", [*items, f"rate={self.rate:g}"])
        return self.name

    @property
    def label(self) -> str:
        """Human-readable name for tables and charts."""
        if self.name == PEER:
            return f"{BASE_LABELS[BASELINE]}, float32 (transformers' default)"
        items = dict(item.split("=", 1) for item in variant_items(self.name))
        form = METHODS[self.base].quantized if items.pop("quantize", None) else self.base
        optimizer = OPTIMIZER_LABELS.get(items.pop("optimizer", "adamw"), "")
        rest = f" ({', '.join(f'{k}={v}' for k, v in items.items())})" if items else ""
        if self.floor:
            return f"{SHORT_LABELS[form]}{optimizer} floor (all dropped){rest}"
        if self.rate:
            return f"{SHORT_LABELS[form]}{optimizer} + DropBP {self.rate:g}{rest}"
        return BASE_LABELS[form] + optimizer + rest + (" (baseline)" if self.key == BASELINE else "")

    @property
    def uses_dropbp(self) -> bool:
        """Whether the method needs a DropBP controller."""
        return self.floor or self.rate > 0


def build_methods(variants: Sequence[str], rates: Sequence[float], peer: bool = False) -> list[Method]:
    """Table order: (with ``peer``, LoRA in float32 first), the variants, then each variant with DropBP at every
    rate, then each variant's floor."""
    methods = [Method(PEER)] if peer else []
    methods += [Method(name) for name in variants]
    methods += [Method(name, rate) for name in variants for rate in rates]
    if rates:
        methods += [Method(name, floor=True) for name in variants]
    return methods


def parse_method_keys(text: str, methods: Sequence[Method]) -> list[Method]:
    """Methods named in a comma-separated list of keys (``all`` = every method, ``off`` = no method); the
    ``KEY=VALUE`` items of a key may come in any order."""
    if text.strip() in ("", "off", "false"):  # YAML reads a bare off as false
        return []
    by_key = {method.key: method for method in methods}
    if text.strip() == "all":
        return list(methods)
    keys = [variant_name(variant_base(key.strip()), variant_items(key.strip())) for key in text.split(",")
            if key.strip()]
    unknown = [key for key in keys if key not in by_key]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(by_key)}")
    return [by_key[key] for key in keys]


# -- ratios and the DropBP cost model ---------------------------------------------------------------------


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def paired_ratio(values: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Median over rounds of ``values[k] / baseline[k]``: each round's ratio is taken on back-to-back steps."""
    return median_or_none([v / b for v, b in zip(values, baseline, strict=False) if b > 0])


def step_tokens(step: dict, default: int) -> int:
    """The examples' own tokens of a timed step (``default``, batch x length, for a fixed random batch)."""
    return step.get("tokens", default)


def padding_share(steps: Sequence[dict]) -> float | None:
    """The share of the tokens computed in ``steps`` that were padding (None without counts)."""
    computed = sum(step.get("computed", 0) for step in steps)
    return 1.0 - sum(step["tokens"] for step in steps) / computed if computed else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


def interpolated_time(nodrop: float, floor: float, dropped: float) -> float:
    """DropBP cost model: only dropped branches' backward is saved, so time falls linearly to the floor."""
    return nodrop - dropped * (nodrop - floor)


def interpolation_ratio(steps: Sequence[dict], nodrop: Sequence[dict], floor: Sequence[dict]) -> float | None:
    """Median over rounds of measured step time / the cost model at that step's realised drop fraction."""
    ratios = [
        step["seconds"] / interpolated_time(full["seconds"], empty["seconds"], step["dropped"])
        for step, full, empty in zip(steps, nodrop, floor, strict=False)
    ]
    return median_or_none(ratios)


def step_throughput(steps: Sequence[dict], tokens_per_step: int) -> list[float]:
    """Real tokens per second of each timed step."""
    return [step_tokens(step, tokens_per_step) / step["seconds"] for step in steps]


def summarize(
    methods: Sequence[Method],
    timing: dict[str, list[dict]],
    memory: dict[str, dict],
    max_len: dict[str, dict],
    tokens_per_step: int,
) -> list[dict]:
    """One row per method: medians, ratios to LoRA (same dtype; and to LoRA in float32 where that row ran),
    cost-model check, memory and max-length figures."""
    base_steps, peer_steps = timing.get(BASELINE, []), timing.get(PEER, [])
    first_steps = timing.get(methods[0].key, []) if methods else []
    base_memory = memory.get(BASELINE, {})
    base_len = max_len.get(BASELINE, {}).get("max_len")
    rows = []
    for method in methods:
        steps = timing.get(method.key, [])
        seconds = median_or_none([step["seconds"] for step in steps])
        mem = memory.get(method.key, {})
        row = {
            "key": method.key,
            "label": method.label,
            "base": method.base,
            "worker": method.worker,
            "rate": method.rate,
            "floor": method.floor,
            "step_s": seconds,
            "tokens_per_s": median_or_none(step_throughput(steps, tokens_per_step)),
            "speed_vs_first": paired_ratio(step_throughput(steps, tokens_per_step),
                                           step_throughput(first_steps, tokens_per_step)),
            "padding": padding_share(steps),
            "time_ratio": paired_ratio([s["seconds"] for s in steps], [s["seconds"] for s in base_steps]),
            "time_vs_peer": paired_ratio([s["seconds"] for s in steps], [s["seconds"] for s in peer_steps]),
            "cpu_s": median_or_none([s.get("cpu_seconds") for s in steps]),  # process CPU time (see bench_worker)
            "dropped": statistics.fmean(s["dropped"] for s in steps) if steps else None,
            "vs_interp": None,
            "peak": mem.get("peak"),
            "peak_ratio": ratio(mem.get("peak"), base_memory.get("peak")),
            "peak_vs_peer": ratio(mem.get("peak"), memory.get(PEER, {}).get("peak")),
            "train_peak": mem.get("train_peak"),
            "optimizer_state": mem.get("optimizer_state"),
            "saved": mem.get("saved"),
            "mem_dropped": mem.get("dropped"),
            "max_len": max_len.get(method.key, {}).get("max_len"),
            "len_ratio": ratio(max_len.get(method.key, {}).get("max_len"), base_len),
        }
        if method.rate and not method.floor:
            row["vs_interp"] = interpolation_ratio(
                steps, timing.get(method.worker, []), timing.get(Method(method.worker, floor=True).key, [])
            )
        rows.append(row)
    return rows


# -- targets -----------------------------------------------------------------------------------------------


# -- text ---------------------------------------------------------------------------------------------------


REAL_DATA_COLUMNS = ("tokens/s × first row", "padding")
COLUMNS: tuple[Column, ...] = (
    ("method", lambda r: r["label"]),
    ("step (s)", lambda r: fmt(r["step_s"], ".3f")),
    ("tokens/s", lambda r: fmt(r["tokens_per_s"], ",.0f")),
    ("tokens/s × first row", lambda r: fmt(r.get("speed_vs_first"), ".2f", "x")),
    ("padding", lambda r: fmt(None if r.get("padding") is None else 100 * r["padding"], ".1f", "%")),
    ("time × LoRA", lambda r: fmt(r["time_ratio"], ".2f", "x")),
    ("time × LoRA fp32", lambda r: fmt(r["time_vs_peer"], ".2f", "x")),
    ("dropped", lambda r: fmt(r["dropped"], ".2f") if r["rate"] or r["floor"] else "–"),
    ("vs interp.", lambda r: fmt(r["vs_interp"], ".2f", "x")),
    ("peak (MiB)", lambda r: fmt(None if r["peak"] is None else r["peak"] / MIB, ",.0f")),
    ("peak × LoRA", lambda r: fmt(r["peak_ratio"], ".2f", "x")),
    ("peak × LoRA fp32", lambda r: fmt(r["peak_vs_peer"], ".2f", "x")),
    ("train peak (MiB)", lambda r: fmt(None if r["train_peak"] is None else r["train_peak"] / MIB, ",.0f")),
    ("optimizer state (MiB)", lambda r: fmt(None if r.get("optimizer_state") is None
                                            else r["optimizer_state"] / MIB, ",.0f")),
    ("saved for bwd (MiB)", lambda r: fmt(None if r["saved"] is None else r["saved"] / MIB, ",.0f")),
    ("max len", lambda r: fmt(r["max_len"], "d")),
    ("len × LoRA", lambda r: fmt(r["len_ratio"], ".2f", "x")),
)


def render_table(rows: Sequence[dict], real_data: bool = False) -> str:
    """The markdown table of all methods (``–`` where a figure was not measured); "× LoRA" is LoRA in the bench's
    dtype, "× LoRA fp32" (only when that row ran) LoRA as transformers' defaults run it. With ``real_data`` (rows
    trained on the data's own batches) it adds each row's real tokens/s against the first row's and its padding."""
    peer = any(row.get("time_vs_peer") is not None or row.get("peak_vs_peer") is not None for row in rows)
    wanted = [c for c in COLUMNS if (peer or "fp32" not in c[0]) and (real_data or c[0] not in REAL_DATA_COLUMNS)]
    return markdown_table(wanted, rows)
