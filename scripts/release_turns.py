"""Two source trees of leanft (two releases, say) training in turns, one optimizer step each, on the same data.

    python scripts/release_turns.py OLD_SRC NEW_SRC OUT.json [key=value ...]

Each tree's ``leanft train`` runs in its own process with its own defaults and the given keys (``A_ITEMS`` and
``B_ITEMS`` in the environment add keys for one side only); the two hold the machine in turns, from the start of
an optimizer step to its end, so drift in the machine's speed reaches both alike. OUT.json gets, for steps 6 to
``max_steps - 2`` (the first ones overlap the other process's start, the last ones its final evaluation), each
side's training seconds, its examples' own tokens and tokens/s, and B's tokens/s over A's. Make OLD_SRC with
``git worktree add ../old COMMIT`` (its ``src/``); both trees run on this environment's packages. The turns are
kept here rather than by ``leanft.studies.interleave``, which an older tree does not have.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

FIRST_STEP, LAST_STEPS_LEFT_OUT = 5, 2


def run_side(src: str, index: int, turn, items: list[str], result: str) -> None:
    """Train with the leanft under ``src``, taking turn ``index`` of two; write per-step seconds and tokens."""
    sys.path.insert(0, src)
    from transformers import TrainerCallback

    import leanft
    from leanft.run.config import load_config
    from leanft.run.train import train

    if not Path(leanft.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"leanft was imported from {leanft.__file__}, not from {src}")

    condition, current, finished = turn

    def pass_turn() -> None:
        with condition:
            if current.value == index:
                current.value = index if finished[1 - index] else 1 - index
                condition.notify_all()

    class Turns(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            with condition:
                condition.wait_for(lambda: current.value == index)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            self.tokens.append(state.num_input_tokens_seen)
            pass_turn()

    turns = Turns()
    try:
        train(load_config(None, items), callbacks=[turns])
    finally:
        with condition:
            finished[index] = 1
        pass_turn()
    Path(result).write_text(json.dumps({"seconds": turns.seconds, "tokens": turns.tokens}))


def summary(side: dict) -> dict:
    """Training seconds, own tokens and tokens/s of one side over the compared steps."""
    last = len(side["seconds"]) - LAST_STEPS_LEFT_OUT
    seconds = sum(side["seconds"][FIRST_STEP:last])
    tokens = side["tokens"][last - 1] - side["tokens"][FIRST_STEP - 1]
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main(argv: list[str]) -> None:
    """Run both sides in turns and write OUT.json."""
    old_src, new_src, out, *items = argv
    context = multiprocessing.get_context("spawn")
    turn = (context.Condition(), context.RawValue("i", 0), context.RawArray("b", 2))
    sides = []
    for index, (src, extra) in enumerate(((old_src, "A_ITEMS"), (new_src, "B_ITEMS"))):
        side_items = [*items, *os.environ.get(extra, "").split(), f"output_dir={out}.side{index}"]
        result = f"{out}.side{index}.json"
        sides.append((context.Process(target=run_side, args=(src, index, turn, side_items, result)), result))
    for process, _ in sides:
        process.start()
    for process, _ in sides:
        process.join()
    failed = [src for (process, _), src in zip(sides, (old_src, new_src), strict=True) if process.exitcode]
    if failed:
        raise SystemExit(f"training failed with the leanft under {', '.join(failed)}: see its output above")
    runs = [json.loads(Path(result).read_text()) for _, result in sides]
    a, b = (summary(run) for run in runs)
    report = {"a": {"src": old_src, **a}, "b": {"src": new_src, **b},
              "b_over_a_tokens_per_s": round(b["tokens_per_s"] / a["tokens_per_s"], 3),
              "steps": f"{FIRST_STEP + 1}-{len(runs[0]['seconds']) - LAST_STEPS_LEFT_OUT}"}
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
