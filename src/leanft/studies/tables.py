"""Markdown tables for the reports of ``leanft bench`` and ``leanft compare``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Column = tuple[str, Callable[[dict], str]]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``, or ``–`` where it was not measured."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """A markdown table: one header per ``(name, cell)`` column, one line per row."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)
