"""What ``leanft compare`` reports: time-to-quality, the markdown table, the loss-against-time PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leanft.core.fileio import atomic_path
from leanft.studies.tables import Column, fmt, markdown_table


def time_to_quality(curve: Sequence[dict], target: float) -> float | None:
    """Training time at which the held-out loss first reaches ``target`` (None if it never does).

    ``curve`` is a list of ``{"time_s", "heldout_loss"}`` points in time order; between two measured points
    the loss is taken as linear in time, so the crossing is interpolated rather than rounded up to the next
    evaluation.
    """
    previous = None
    for point in curve:
        if point["heldout_loss"] <= target:
            if previous is None:
                return point["time_s"]
            drop = previous["heldout_loss"] - point["heldout_loss"]
            share = (previous["heldout_loss"] - target) / drop
            return previous["time_s"] + share * (point["time_s"] - previous["time_s"])
        previous = point
    return None


def _columns(baseline: str) -> tuple[Column, ...]:
    return (
        ("variant", lambda r: r["variant"]),
        ("lr", lambda r: f"{r['lr']:g}"),
        ("steps", lambda r: str(r["steps"])),
        ("train time (s)", lambda r: fmt(r["train_time_s"], ".0f")),
        ("s/step", lambda r: fmt(r["train_time_s"] / max(r["steps"], 1), ".2f")),
        ("backward skipped", lambda r: fmt(100 * r.get("dropbp_skipped_share", 0.0), ".0f", "%")),
        ("final held-out loss", lambda r: fmt(r["final_heldout_loss"], ".4f")),
        ("exact match", lambda r: fmt(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f", "%")),
        (f"time to {baseline}'s final loss (s)", lambda r: fmt(r["time_to_baseline_loss_s"], ".0f")),
        (f"× {baseline}", lambda r: fmt(r["time_to_quality_ratio"], ".2f", "x")),
    )


def render_table(rows: Sequence[dict], baseline: str) -> str:
    """The markdown table of a study, one row per variant (``–``: not reached / not measured)."""
    return markdown_table(_columns(baseline), rows)


def plot_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """One PNG: held-out loss against training time (left) and against steps (right), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in rows:
        curve = row["curve"]
        style = "--" if row["variant"] == rows[0]["variant"] else "-"
        losses = [p["heldout_loss"] for p in curve]
        by_time.plot([p["time_s"] for p in curve], losses, style, marker=".", label=row["variant"])
        by_step.plot([p["step"] for p in curve], losses, style, marker=".", label=row["variant"])
    target = rows[0]["final_heldout_loss"]
    for axis, name in ((by_time, "training time (s, evaluation excluded)"), (by_step, "optimizer step")):
        axis.axhline(target, color="black", linestyle=":", linewidth=1)
        axis.set_xlabel(name)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    by_time.set_ylabel(f"held-out loss (dotted: {rows[0]['variant']}'s final)")
    by_step.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return path
