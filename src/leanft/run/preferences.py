"""Preference pairs for ``objective=dpo``: records checked and normalised, split, rendered and tokenized.

A record is ``{"prompt", "chosen", "rejected"}`` with three strings, or chat-style: ``chosen`` and ``rejected``
lists of messages ending with the assistant's answer, the prompt being the messages before it (the same in
both) or given as ``prompt`` (a string or a list of messages; ``chosen`` / ``rejected`` then hold one assistant
message each). A pair is normalised to ``{"prompt": messages, "chosen": text, "rejected": text}`` and rendered with
the chat template exactly as supervised fine-tuning renders an answer (``leanft.run.data``): the prompt's pieces up
to the open assistant turn, then the answer up to and including its EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from leanft.core.chunked_loss import IGNORE_INDEX
from leanft.core.errors import LeanftError
from leanft.run.config import TrainConfig
from leanft.run.data import answer_and_rest, render_segments
from leanft.run.sources import located_rows, split_off_held_out
from leanft.run.tasks import builtin_task

Pair = dict  # {"prompt": [messages], "chosen": str, "rejected": str}


def _messages_problem(messages: object, key: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f'"{key}" must be a string or a non-empty list of messages'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            return f'{key}[{i}] needs string "role" and "content"'
    return None


def _answer_problem(messages: list[dict], key: str) -> str | None:
    if messages[-1]["role"] != "assistant":
        return f'the last message of "{key}" must be the assistant\'s answer'
    if not messages[-1]["content"].strip():
        return f'"{key}" has an empty answer'
    return None


def preference_problem(record: object) -> str | None:
    """What is wrong with a preference record (one short phrase), or ``None`` when it is usable."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    for key in ("chosen", "rejected"):
        if key not in record:
            return f'missing "{key}" (a preference record holds prompt, chosen and rejected)'
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(prompt, str) and not prompt.strip():
        return '"prompt" is empty'
    if prompt is not None and not isinstance(prompt, str):
        problem = _messages_problem(prompt, "prompt")
        if problem:
            return problem
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            return 'missing "prompt"'
        empty = next((key for key in ("chosen", "rejected") if not record[key].strip()), None)
        return f'"{empty}" is empty' if empty else None
    if isinstance(chosen, str) or isinstance(rejected, str):
        return '"chosen" and "rejected" must both be strings or both lists of messages'
    problem = _messages_problem(chosen, "chosen") or _messages_problem(rejected, "rejected")
    problem = problem or _answer_problem(chosen, "chosen") or _answer_problem(rejected, "rejected")
    if problem:
        return problem
    if prompt is not None and (len(chosen) > 1 or len(rejected) > 1):
        return 'with "prompt" given, "chosen" and "rejected" must hold one assistant message each'
    if prompt is None and (len(chosen) < 2 or chosen[:-1] != rejected[:-1]):
        return '"chosen" and "rejected" must share the messages before their answers (the prompt), or give "prompt"'
    return None


def normalise(record: dict) -> Pair:
    """A valid preference record as ``{"prompt": messages, "chosen": text, "rejected": text}``."""
    prompt = record.get("prompt")
    if prompt is None:
        prompt = record["chosen"][:-1]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]

    def answer(value: str | list) -> str:
        return value if isinstance(value, str) else value[-1]["content"]

    return {"prompt": prompt, "chosen": answer(record["chosen"]), "rejected": answer(record["rejected"])}


def read_pairs(source: str, split: str) -> list[Pair]:
    """Every preference pair of ``source`` (any form ``data=`` takes); a bad record raises one line naming it."""
    pairs = []
    for where, row in located_rows(source, split):
        problem = preference_problem(row)
        if problem:
            raise LeanftError(f"{where}: {problem}")
        pairs.append(normalise(row))
    return pairs


def load_pairs(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of a run: a built-in task's splits, ``eval_data`` / ``eval_split``, or 5%."""
    task = builtin_task(config.data)
    if task is not None:
        train, held_out = task.generate(config.seed, config.num_train, config.num_eval)
        return [normalise(r) for r in train], [normalise(r) for r in held_out]
    pairs = read_pairs(config.data, config.data_split)
    if config.eval_data is None and config.eval_split is None:
        return split_off_held_out(pairs, config)
    source = config.eval_data if config.eval_data is not None else config.data
    return pairs, read_pairs(source, config.eval_split or config.data_split)[: config.num_eval]


def _prompt_and_answer(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: str) -> tuple[list, list]:
    """(prompt token ids, answer token ids up to its EOS), rendered as supervised fine-tuning renders them."""
    segments = render_segments(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    last = max(i for i, (_, trainable) in enumerate(segments) if trainable)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = [token for text, _ in segments[:last] for token in ids(text)]
    return prompt_ids, answer_and_rest(ids(segments[last][0]), tokenizer.eos_token_id)[0]


def tokenize_pair(pair: Pair, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of a normalised pair (what TRL's DPO collator takes)."""
    prompt_ids, chosen_ids = _prompt_and_answer(tokenizer, pair["prompt"], pair["chosen"])
    rejected_prompt, rejected_ids = _prompt_and_answer(tokenizer, pair["prompt"], pair["rejected"])
    if rejected_prompt != prompt_ids:
        raise LeanftError("this chat template renders a prompt differently for two answers: use string records")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def tokenize_pairs(
    pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[list[dict], dict]:
    """Tokenized pairs, each answer cut to fit ``max_seq_len`` after its prompt, and what that changed: pairs
    dropped (a prompt of ``max_seq_len`` tokens or more leaves no answer) and pairs with an answer cut short."""
    features, dropped, truncated = [], 0, 0
    for pair in pairs:
        feature = tokenize_pair(pair, tokenizer)
        room = max_seq_len - len(feature["prompt_ids"])
        if room <= 0:
            dropped += 1
            continue
        cut = {key: feature[key][:room] for key in ("chosen_ids", "rejected_ids")}
        truncated += any(len(cut[key]) < len(feature[key]) for key in cut)
        features.append({**feature, **cut})
    if not features:
        raise LeanftError(f"no preference pair keeps an answer token within max_seq_len={max_seq_len}: raise it")
    return features, {"examples": len(pairs), "dropped": dropped, "truncated": truncated, "longer_than_a_block": 0}


def chosen_example(feature: dict) -> dict[str, list[int]]:
    """A pair's prompt and chosen answer as a supervised example (labels on the answer): DropBP's allocation batch."""
    ids = feature["prompt_ids"] + feature["chosen_ids"]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(feature["prompt_ids"]) + feature["chosen_ids"]}
