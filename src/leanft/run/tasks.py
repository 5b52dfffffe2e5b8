"""Built-in synthetic tasks, chosen with ``data=builtin:NAME``: generated instruction records and their scorer.

``dates`` (also plain ``builtin``) rewrites dates as ``YYYY-MM-DD``: quick to learn, it saturates within a few
dozen steps. ``arith`` is multi-step arithmetic word problems with a worked answer of one line per step; it
keeps a held-out loss well above zero for longer, and its accuracy checks only the final answer.
``prefs-arith`` (``leanft.run.pref_tasks``) is preference pairs for ``objective=dpo``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from leanft.core.errors import LeanftError
from leanft.run.pref_tasks import prefs_arith_task

Records = list[dict]
Scorer = Callable[[str, str], bool]


@dataclass(frozen=True)
class Task:
    """A built-in task: ``generate(seed, n_train, n_eval) -> (train, held_out)`` records and how to score them."""

    name: str
    description: str
    generate: Callable[[int, int, int], tuple[Records, Records]]
    max_new_tokens: int
    correct: Scorer
    objective: str = "sft"  # dpo: records of {prompt, chosen, rejected} (leanft.run.pref_tasks)


def same_text(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


# --------------------------------------------------------------------------- dates

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip


def dates_task(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[Records, Records]:
    """A synthetic date-conversion task as ``(train, held_out)`` instruction records, fixed by ``seed``.

    Each record asks to rewrite a date (1900-2099, written in one of three styles) as ``YYYY-MM-DD``.
    No date of the held-out split appears in the training split, in any style. SmolLM2-135M-Instruct
    gets few of these exactly right before fine-tuning and nearly all after a few minutes of it.
    """
    if n_train + n_eval > 200 * 12 * 28:
        raise LeanftError(f"the built-in task has {200 * 12 * 28} distinct dates: ask for fewer examples")
    rng = random.Random(seed)
    records: dict[str, dict] = {}
    while len(records) < n_train + n_eval:
        year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        name = MONTHS[month - 1]
        text = rng.choice([f"{day} {name} {year}", f"{name} {day}, {year}", f"{day} {name[:3]} {year}"])
        answer = f"{year}-{month:02d}-{day:02d}"
        records.setdefault(answer, {"instruction": f"Convert the date to YYYY-MM-DD: {text}", "output": answer})
    items = list(records.values())
    return items[n_eval:], items[:n_eval]


# --------------------------------------------------------------------------- arithmetic word problems

NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
         ("Ivy", "She"), ("Sam", "He"), ("Lena", "She"), ("Ravi", "He"), ("Nora", "She"), ("Kai", "He"))  # fmt: skip
THINGS = (("stickers", "packs"), ("marbles", "bags"), ("pencils", "boxes"), ("cookies", "trays"),
          ("eggs", "cartons"), ("stamps", "sheets"), ("apples", "crates"), ("beads", "jars"))  # fmt: skip
PEOPLE = ("a friend", "a neighbor", "a cousin", "the teacher", "a classmate")
# Sentence templates by the operation they stand for; {a} and {b} are numbers. The verifier reads them back.
SENTENCES = {
    "start": ("{who} has {a} {obj}.", "{who} starts with {a} {obj}.", "{who} owns {a} {obj}."),
    "+": ("{who} finds {a} more.", "{who} gets {a} more from {person}.", "{who} wins {a} {obj}."),
    "-": ("{who} gives {a} to {person}.", "{who} loses {a} of them.", "{who} uses {a}.", "{who} sells {a} {obj}."),
    "packs": ("{who} buys {a} {box} of {b} {obj}.", "{who} gets {a} {box} with {b} {obj} each."),
    "/": ("{who} shares them equally among {a} friends.", "{who} puts them equally into {a} {box}."),
}
QUESTIONS = {
    "total": (
        "How many {obj} does {who} have now?",
        "How many {obj} are there now?",
        "How many does {who} have in the end?",
    ),
    "/": ("How many {obj} does each get?", "How many {obj} are in each?"),
}
STEP = re.compile(r"(\d+) ([-+x/]) (\d+) = (\d+)")
ANSWER = re.compile(r"Answer:\s*(-?\d+)")
OPERATIONS: dict[str, Callable[[int, int], int | None]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "x": lambda a, b: a * b,
    "/": lambda a, b: a // b if b and a % b == 0 else None,  # exact division only
}


def _problem(rng: random.Random) -> dict | None:
    """One word problem with its worked answer (2-4 steps, results in [0, 1000)), or None for a failed draw."""
    name, pronoun = rng.choice(NAMES)
    obj, box = rng.choice(THINGS)
    words = {"obj": obj, "box": box, "person": rng.choice(PEOPLE)}
    total = rng.randint(5, 60)
    sentences = [rng.choice(SENTENCES["start"]).format(who=name, a=total, **words)]
    steps: list[str] = []
    share = rng.random() < 0.3
    budget = rng.randint(2, 4) - share
    while len(steps) < budget:
        kind = rng.choice(["+", "-", "packs"] if budget - len(steps) >= 2 else ["+", "-"])
        kind = "+" if kind == "-" and total < 2 else kind
        who = rng.choice([name, pronoun])
        if kind == "packs":
            count, each = rng.randint(2, 9), rng.randint(2, 15)
            sentences.append(rng.choice(SENTENCES["packs"]).format(who=who, a=count, b=each, **words))
            steps += [f"{count} x {each} = {count * each}", f"{total} + {count * each} = {total + count * each}"]
            total += count * each
            continue
        amount = rng.randint(2, 40) if kind == "+" else rng.randint(1, min(total - 1, 40))
        sentences.append(rng.choice(SENTENCES[kind]).format(who=who, a=amount, **words))
        result = total + amount if kind == "+" else total - amount
        steps.append(f"{total} {kind} {amount} = {result}")
        total = result
    question = "total"
    if share:
        divisors = [k for k in range(2, 10) if total % k == 0]
        if not divisors:
            return None
        parts = rng.choice(divisors)
        sentences.append(rng.choice(SENTENCES["/"]).format(who=rng.choice([name, pronoun]), a=parts, **words))
        steps.append(f"{total} / {parts} = {total // parts}")
        total, question = total // parts, "/"
    sentences.append(rng.choice(QUESTIONS[question]).format(who=name, **words))
    return {"instruction": " ".join(sentences), "output": "\n".join([*steps, f"Answer: {total}"])}


def arith_task(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[Records, Records]:
    """Arithmetic word problems with 2-4 operations as ``(train, held_out)`` instruction records, fixed by ``seed``.

    The output is one ``A op B = C`` line per step (``+``, ``-``, ``x``, ``/``), then ``Answer: N``. No held-out
    problem text appears in the training split; the held-out split does not depend on ``n_train``.
    """
    rng = random.Random(seed)
    records: dict[str, dict] = {}
    while len(records) < n_train + n_eval:
        record = _problem(rng)
        if record is not None:
            records.setdefault(record["instruction"], record)
    items = list(records.values())
    return items[n_eval:], items[:n_eval]


def _template_pattern(template: str) -> re.Pattern:
    """A sentence template as a regex: numbers become groups, names and words match any word(s)."""
    pattern = re.escape(template)
    for slot in ("who", "obj", "box", "person"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), r"[\w ]+?")
    return re.compile(pattern.replace(re.escape("{a}"), r"(\d+)").replace(re.escape("{b}"), r"(\d+)"))


READERS = [(kind, _template_pattern(t)) for kind, templates in SENTENCES.items() for t in templates]


def _solve(problem: str) -> int | None:
    """The answer to a problem text, computed from its sentences alone (None when a sentence is not understood)."""
    total = None
    for sentence in re.findall(r"[^.?]+[.?]", problem):
        sentence = sentence.strip()
        if sentence.endswith("?"):
            continue
        match = next(((kind, m) for kind, p in READERS if (m := p.fullmatch(sentence))), None)
        if match is None:
            return None
        kind, numbers = match[0], [int(n) for n in match[1].groups()]
        if kind == "start":
            total = numbers[0]
        elif total is None:
            return None
        elif kind == "packs":
            total += numbers[0] * numbers[1]
        else:
            total = OPERATIONS[kind](total, numbers[0])
    return total


def verify_arith(record: dict) -> bool:
    """Whether an arith record is right: every step's arithmetic, the final answer, and the answer to the problem.

    Each output line but the last must read ``A op B = C`` with ``C`` correct and in [0, 1000); the last must be
    ``Answer: N`` with ``N`` the last step's result; and ``N`` must equal the answer recomputed from the
    problem text's sentences (not from the worked answer).
    """
    *lines, last = record["output"].split("\n")
    results = []
    for line in lines:
        step = STEP.fullmatch(line)
        if step is None:
            return False
        a, op, b, c = int(step[1]), step[2], int(step[3]), int(step[4])
        if OPERATIONS[op](a, b) != c or not 0 <= c < 1000:
            return False
        results.append(c)
    answer = re.fullmatch(r"Answer: (\d+)", last)
    if answer is None or not results or int(answer[1]) != results[-1]:
        return False
    return _solve(record["instruction"]) == results[-1]


def final_answer_match(prediction: str, reference: str) -> bool:
    """Whether the number after the last ``Answer:`` in ``prediction`` equals the one in ``reference``."""
    numbers = [ANSWER.findall(text) for text in (prediction, reference)]
    return all(numbers) and int(numbers[0][-1]) == int(numbers[1][-1])


# --------------------------------------------------------------------------- registry

TASKS = {
    "dates": Task(
        name="dates",
        description="date conversion: '14 March 2021', 'March 14, 2021' or '14 Mar 2021' -> '2021-03-14'",
        generate=dates_task,
        max_new_tokens=16,
        correct=same_text,
    ),
    "arith": Task(
        name="arith",
        description="arithmetic word problems with 2-4 operations, worked one step per line, then 'Answer: N'",
        generate=arith_task,
        max_new_tokens=60,
        correct=final_answer_match,
    ),
    "prefs-arith": Task(
        name="prefs-arith",
        description="preference pairs (objective=dpo): 'What is 37 + 48?', the right answer chosen, a slip rejected",
        generate=prefs_arith_task,
        max_new_tokens=8,
        correct=same_text,
        objective="dpo",
    ),
}


def builtin_task(data: str) -> Task | None:
    """The built-in task that ``data`` names (``builtin`` = dates, ``builtin:NAME``), or None for a data file."""
    if data == "builtin":
        return TASKS["dates"]
    if not data.startswith("builtin:"):
        return None
    name = data.removeprefix("builtin:")
    if name not in TASKS:
        raise LeanftError(f"unknown built-in task {name!r}: choose {' or '.join(f'builtin:{n}' for n in TASKS)}")
    return TASKS[name]
