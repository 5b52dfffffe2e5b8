"""What a run shows and records: a progress bar, ``metrics.jsonl``, a loss-curve PNG, Ctrl-C handling."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from leanft.core.fileio import atomic_path
from leanft.run.evaluate import heldout_loss
from leanft.run.files import LOSS_CURVE_FILE, METRICS_FILE


class TrainingClock:
    """A run's clock: seconds since ``start`` less the spans spent ``paused`` (waiting while another run of an
    interleaved study trains, say). Evaluations are not paused here: ``HeldoutCurveCallback`` sets them apart."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.paused_s = 0.0

    def start(self) -> None:
        """Start counting from now."""
        self.started, self.paused_s = time.perf_counter(), 0.0

    def seconds(self) -> float:
        """Seconds counted so far."""
        return time.perf_counter() - self.started - self.paused_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The block's time is not counted."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began


class RunLogCallback(TrainerCallback):
    """A tqdm bar with loss and tokens/s, and one JSON line per log event in ``metrics.jsonl``; starts ``clock``."""

    def __init__(self, run_dir: str | Path, clock: TrainingClock | None = None) -> None:
        self.metrics_path = Path(run_dir) / METRICS_FILE
        self.clock = clock or TrainingClock()
        self.bar: tqdm | None = None
        self.state: TrainerState | None = None  # the Trainer's, once training began
        self.first_tokens = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Start the clock; open the bar at the current step (non-zero on resume)."""
        self.clock.start()
        self.state, self.first_tokens = state, state.num_input_tokens_seen
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def tokens_per_second(self, state: TrainerState) -> float:
        """Input tokens (non-padding) per second of this run so far."""
        return (state.num_input_tokens_seen - self.first_tokens) / max(self.clock.seconds(), 1e-9)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Advance the bar."""
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        """Append the logged values (with step, elapsed time and tokens/s) to metrics.jsonl."""
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "elapsed_s": round(self.clock.seconds(), 3)}
        record["tokens_per_s"] = round(self.tokens_per_second(state), 1)
        record.update({key: value for key, value in logs.items() if isinstance(value, (int, float))})
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Close the bar."""
        self.close()

    def close(self) -> None:
        """Close the bar (also when training ended with an error, so it does not print after the error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class HeldoutCurveCallback(TrainerCallback):
    """Held-out loss every ``every`` steps against the training time so far (the run log's clock), evaluation
    time excluded.

    Each point goes to ``points`` and, as ``eval_loss``, to the run log's ``metrics.jsonl`` (so the loss-curve
    PNG shows it).
    """

    def __init__(self, log: RunLogCallback, features: list, pad_token_id: int, every: int) -> None:
        self.metrics_path, self.clock = log.metrics_path, log.clock
        self.features, self.pad_token_id, self.every = features, pad_token_id, every
        self.points: list[dict] = []
        self.eval_seconds = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """No evaluation time yet."""
        self.eval_seconds = 0.0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Measure the held-out loss at every ``every``-th step and at the last one."""
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        began, trained = time.perf_counter(), self.clock.seconds() - self.eval_seconds
        values, logged = self.measure(kwargs["model"])
        point = {"step": state.global_step, "time_s": round(trained, 3)}
        self.points.append({**point, **values})
        self.eval_seconds += time.perf_counter() - began
        if state.is_world_process_zero:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps({**point, **logged}) + "\n")

    def measure(self, model) -> tuple[dict, dict]:
        """(the point's values, what ``metrics.jsonl`` records of them; ``eval_loss`` is plotted) for ``model``."""
        loss = heldout_loss(model, self.features, self.pad_token_id)
        return {"heldout_loss": loss}, {"eval_loss": loss}

    def loss_at(self, step: int) -> float | None:
        """The held-out loss measured at ``step`` in this run, or None."""
        return next((p["heldout_loss"] for p in self.points if p["step"] == step), None)


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Install the SIGINT handler."""
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Ask the Trainer to save and stop after an interrupt."""
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Give SIGINT back to its previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records after ``step`` from ``metrics.jsonl`` (a run resumed from an older checkpoint redoes them)."""
    records = read_metrics(run_dir)
    kept = [record for record in records if record.get("step", 0) <= step]
    if len(kept) < len(records):
        with atomic_path(Path(run_dir) / METRICS_FILE) as temporary:
            temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))


def plot_loss_curve(run_dir: str | Path, title: str = "") -> Path:
    """Write ``loss_curve.png``: training loss per step (and held-out loss where logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    figure, axis = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        axis.plot(*zip(*train, strict=True), label="training loss")
    if heldout:
        axis.plot(*zip(*heldout, strict=True), "o-", label="held-out loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    target = Path(run_dir) / LOSS_CURVE_FILE
    with atomic_path(target) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return target
