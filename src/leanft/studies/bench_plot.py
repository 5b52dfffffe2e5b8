"""PNG charts of ``leanft bench``: step time and peak memory bars, throughput against the realised drop rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leanft.studies.bench_report import BASELINE, MIB, SHORT_LABELS, Method, interpolated_time

COLORS = {"lora": "#7f7f7f", "full": "#d62728", "paca": "#1f77b4"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_time_memory(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Horizontal bars of median step time and peak memory for every method."""
    plt = _pyplot()
    labels = [row["label"] for row in rows][::-1]
    colors = [COLORS.get(row["base"], "#333333") for row in rows][::-1]
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.6), sharey=True)
    panels = (
        ("median step time (s)", [row["step_s"] for row in rows], "step_s"),
        ("peak memory (MiB)", [None if row["peak"] is None else row["peak"] / MIB for row in rows], "peak"),
    )
    for axis, (name, values, key) in zip(axes, panels, strict=True):
        values = [0.0 if value is None else value for value in values][::-1]
        axis.barh(labels, values, color=colors)
        baseline = next((row[key] for row in rows if row["key"] == BASELINE and row[key] is not None), None)
        if baseline is not None:
            axis.axvline(baseline / (MIB if key == "peak" else 1), color="black", linestyle=":", linewidth=1)
        axis.set_xlabel(name)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_throughput(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Tokens/s against the realised drop fraction per variant, with the DropBP cost model dashed."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    tokens = {row["worker"]: row["tokens_per_s"] * row["step_s"] for row in rows if row["tokens_per_s"]}
    for worker, per_step in tokens.items():
        points = sorted(
            (1.0 if row["floor"] else (row["dropped"] or 0.0), row["step_s"])
            for row in rows
            if row["worker"] == worker and row["step_s"]
        )
        if not points:
            continue
        base = Method(worker).base
        color = COLORS.get(base, "#333333")
        label = SHORT_LABELS.get(base, base) + ("" if worker == base else f" ({worker.split(':', 1)[1]})")
        axis.plot([p[0] for p in points], [per_step / p[1] for p in points], "o-", color=color, label=label)
        floor_key = Method(worker, floor=True).key
        nodrop = next((row["step_s"] for row in rows if row["key"] == worker and row["step_s"]), None)
        floor = next((row["step_s"] for row in rows if row["key"] == floor_key and row["step_s"]), None)
        if nodrop and floor:
            grid = [i / 20 for i in range(21)]
            axis.plot(grid, [per_step / interpolated_time(nodrop, floor, f) for f in grid], "--", color=color,
                      alpha=0.5, linewidth=1)
    axis.set_xlabel("realised DropBP drop fraction (share of branch backward FLOPs skipped)")
    axis.set_ylabel("tokens / s")
    axis.set_title(title + "\n(dashed: cost model, linear in step time from no-drop to floor)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_charts(rows: Sequence[dict], folder: str | Path, title: str) -> list[Path]:
    """Write ``bench_time_memory.png`` and ``bench_throughput.png`` into ``folder``; return their paths."""
    folder = Path(folder)
    return [
        plot_time_memory(rows, folder / "bench_time_memory.png", title),
        plot_throughput(rows, folder / "bench_throughput.png", title),
    ]
