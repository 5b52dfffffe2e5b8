"""The real default job on the embedded SmolLM2-135M (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import json
import time

import pytest

from leanft.cli import main


@pytest.mark.slow
def test_default_job_learns_the_builtin_task_within_15_minutes(tmp_path):
    started = time.perf_counter()
    assert main(["train", f"output_dir={tmp_path / 'run'}"]) == 0
    elapsed = time.perf_counter() - started
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(json.dumps(summary, indent=2), f"\nwhole command: {elapsed:.0f} s")
    assert summary["accuracy_before"] <= 0.2
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.5
    for name in ("adapter/paca_adapter.safetensors", "metrics.jsonl", "loss_curve.png", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    assert elapsed < 15 * 60
