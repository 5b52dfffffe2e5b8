"""The built-in preference task ``builtin:prefs-arith``: arithmetic questions with a right and a wrong answer.

Each record is ``{"prompt": "What is 37 + 48?", "chosen": "85", "rejected": "75"}``: the chosen answer is the
correct result, the rejected one a typical slip (a digit off by one, a dropped or doubled carry, the tens off by
ten, swapped digits). Every record can be checked (``verify_preference``); no held-out question appears in the
training split, and the held-out split does not depend on how many training records are asked for.
"""

from __future__ import annotations

import random
import re

from leanft.core.errors import LeanftError

Records = list[dict]
QUESTION = re.compile(r"What is (\d+) ([-+x]) (\d+)\?")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
SLIPS = (1, -1, 10, -10, 2, -2, 9, -9, 11, -11, 20, -20, 100, -100)  # off by a digit or a carry


def _operands(rng: random.Random) -> tuple[int, str, int]:
    """Two operands and an operation: 2-digit sums and differences (never negative), 2-digit x 1-digit products."""
    operation = rng.choice("+-x")
    if operation == "x":
        return rng.randint(11, 99), operation, rng.randint(2, 9)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), operation, min(a, b)) if operation == "-" else (a, operation, b)


def _wrong_answer(rng: random.Random, right: int) -> int:
    """A plausible wrong answer to a question whose answer is ``right`` (never negative, never ``right``)."""
    digits = str(right)
    if len(digits) > 1 and digits[-1] != digits[-2] and rng.random() < 0.2:
        return int(digits[:-2] + digits[-1] + digits[-2])  # the last two digits swapped
    candidates = [right + slip for slip in SLIPS if right + slip >= 0]
    return rng.choice(candidates)


def prefs_arith_task(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[Records, Records]:
    """Arithmetic preference pairs as ``(train, held_out)`` ``{prompt, chosen, rejected}`` records, fixed by ``seed``.

    Questions are distinct across both splits; the held-out split is drawn first, so it is the same for any
    ``n_train``.
    """
    if n_train + n_eval > 10_000:
        raise LeanftError("builtin:prefs-arith makes at most 10000 distinct questions: ask for fewer examples")
    rng = random.Random(seed)
    records: dict[str, dict] = {}
    while len(records) < n_train + n_eval:
        a, operation, b = _operands(rng)
        right = OPERATIONS[operation](a, b)
        prompt = f"What is {a} {operation} {b}?"
        if prompt not in records:
            records[prompt] = {"prompt": prompt, "chosen": str(right), "rejected": str(_wrong_answer(rng, right))}
    items = list(records.values())
    return items[n_eval:], items[:n_eval]


def verify_preference(record: dict) -> bool:
    """Whether a prefs-arith record is right: its chosen answer solves the question and its rejected one does not."""
    question = QUESTION.fullmatch(record["prompt"])
    if question is None:
        return False
    right = OPERATIONS[question[2]](int(question[1]), int(question[3]))
    return record["chosen"] == str(right) and record["rejected"] != str(right) and record["rejected"].isdigit()
