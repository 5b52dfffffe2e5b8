"""Variants of a study trained in turns: one process per variant, one optimizer step at a time, in rotation.

Run one after another, two variants meet a machine in different states (other load, clock and memory drift on a
shared VM), which can move their step times by more than the methods differ. Here each variant trains in its own
process and holds a turn from the start of one of its optimizer steps to the start of its next one, so everything
it does (its step, its held-out evaluation, its checkpoint) runs alone, and the variants' steps alternate through
the same stretch of time. A variant waiting for its turn does not count that wait as training time.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import queue
from pathlib import Path

from transformers import TrainerCallback

from leanft.core.errors import LeanftError
from leanft.run.callbacks import TrainingClock
from leanft.run.config import TrainConfig
from leanft.run.files import BASELINE_FILE

logger = logging.getLogger(__name__)

POLL_S = 5.0  # how often the parent looks for a variant process that died without a result


class Turns:
    """Whose turn it is among ``count`` processes (0 first); finished processes are skipped."""

    def __init__(self, context, count: int) -> None:
        self.condition = context.Condition()
        self.current = context.RawValue("i", 0)
        self.finished = context.RawArray("b", count)

    def wait(self, index: int) -> None:
        """Block until it is process ``index``'s turn."""
        with self.condition:
            self.condition.wait_for(lambda: self.current.value == index)

    def pass_on(self, index: int) -> None:
        """Give the turn from ``index`` (if it holds it) to the next unfinished process (``index`` itself when it
        is the last)."""
        with self.condition:
            if self.current.value != index:
                return
            count = len(self.finished)
            following = [(index + step) % count for step in range(1, count + 1)]
            self.current.value = next((i for i in following if not self.finished[i]), index)
            self.condition.notify_all()

    def finish(self, index: int) -> None:
        """Process ``index`` is done: pass its turn on for good."""
        with self.condition:
            self.finished[index] = 1
        self.pass_on(index)


class TakeTurns(TrainerCallback):
    """At the start of each optimizer step: hand the turn on and wait for it to come back, the clock paused."""

    def __init__(self, turns: Turns, index: int, clock: TrainingClock) -> None:
        self.turns, self.index, self.clock = turns, index, clock

    def on_step_begin(self, args, state, control, **kwargs):
        """Let the other variants take their step first."""
        with self.clock.paused():
            self.turns.pass_on(self.index)
            self.turns.wait(self.index)


def train_in_turn(config: TrainConfig, index: int, turns: Turns, results, baseline_file: Path) -> None:
    """A variant's process: wait for the first turn, train, put ``(index, summary, error)`` on ``results``."""
    from leanft.run.train import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    turns.wait(index)
    try:
        baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else None
        clock = TrainingClock()
        summary = train(config, callbacks=[TakeTurns(turns, index, clock)], baseline=baseline, clock=clock)
        results.put((index, summary, None))
    except Exception as exc:  # the parent reports it with the variant's name
        results.put((index, None, f"{type(exc).__name__}: {exc}"))
    finally:
        turns.finish(index)


def train_interleaved(configs: list[TrainConfig]) -> list[dict]:
    """Train ``configs`` in turns (one process each, steps alternating); their summaries, in order.

    The first variant evaluates the untrained model and the others reuse that baseline (it is written before the
    first variant's first step, which is when the second variant starts).
    """
    context = multiprocessing.get_context("spawn")
    turns, results = Turns(context, len(configs)), context.Queue()
    baseline_file = Path(configs[0].output_dir) / BASELINE_FILE
    processes = [context.Process(target=train_in_turn, args=(config, index, turns, results, baseline_file))
                 for index, config in enumerate(configs)]  # fmt: skip
    for process in processes:
        process.start()
    summaries: dict[int, dict] = {}
    errors: dict[int, str] = {}
    while len(summaries) + len(errors) < len(configs):
        try:
            index, summary, error = results.get(timeout=POLL_S)
        except queue.Empty:
            for index, process in enumerate(processes):
                if process.exitcode not in (None, 0) and index not in summaries and index not in errors:
                    errors[index] = f"its process ended with exit code {process.exitcode}"
                    turns.finish(index)
            continue
        if error is None:
            summaries[index] = summary
        else:
            errors[index] = error
    for process in processes:
        process.join()
    if errors:
        index = min(errors)
        raise LeanftError(f"variant {Path(configs[index].output_dir).name} failed: {errors[index]}")
    return [summaries[index] for index in range(len(configs))]
