"""Data pipeline: prompt-masked labels, JSONL validation, packing, collation, generation, match rate."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_llama_for

from leanft.core.errors import LeanftError
from leanft.run.data import (
    IGNORE_INDEX,
    collate,
    pack_features,
    render_prompt,
    tokenize_dataset,
    tokenize_example,
)
from leanft.run.evaluate import generate_answers, match_rate
from leanft.run.sources import load_jsonl_examples
from leanft.run.tasks import final_answer_match

RECORD = {"instruction": "What is the capital of France?", "output": "Paris."}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def trained_text(tokenizer, feature):
    """Decode only the tokens that carry a label."""
    pairs = zip(feature["input_ids"], feature["labels"], strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


@pytest.mark.parametrize("fixture", ["tiny_chat_tokenizer", "tiny_plain_tokenizer"])
def test_labels_mask_exactly_the_prompt(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    feature = tokenize_example(RECORD, tokenizer)
    prompt_ids = tokenizer(render_prompt(tokenizer, RECORD["instruction"]), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    assert feature["input_ids"][: len(prompt_ids)] == prompt_ids
    assert feature["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer_span = slice(len(prompt_ids), len(prompt_ids) + len(answer_ids))
    assert feature["input_ids"][answer_span] == answer_ids
    assert feature["labels"][answer_span] == answer_ids
    assert all(lab == IGNORE_INDEX for lab in feature["labels"][answer_span.stop :])


def test_input_field_is_part_of_the_prompt(tiny_chat_tokenizer):
    feature = tokenize_example({"instruction": "Translate.", "input": "chat", "output": "cat"}, tiny_chat_tokenizer)
    assert "chat" in tiny_chat_tokenizer.decode(feature["input_ids"])
    assert trained_text(tiny_chat_tokenizer, feature) == "cat<|im_end|>"


def test_chat_records_learn_every_assistant_turn(tiny_chat_tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    feature = tokenize_example(record, tiny_chat_tokenizer)
    assert trained_text(tiny_chat_tokenizer, feature) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert tiny_chat_tokenizer.decode(feature["input_ids"]) == tiny_chat_tokenizer.apply_chat_template(
        record["messages"], tokenize=False
    )


def test_truncation_and_empty_answers(tiny_chat_tokenizer):
    full = tokenize_example(RECORD, tiny_chat_tokenizer)
    short = tokenize_example(RECORD, tiny_chat_tokenizer, max_seq_len=10)
    assert short["input_ids"] == full["input_ids"][:10] and len(short["labels"]) == 10
    with pytest.raises(LeanftError, match="max_seq_len"):
        tokenize_dataset([RECORD], tiny_chat_tokenizer, max_seq_len=5)


def test_load_jsonl_examples(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [RECORD, "", chat])
    assert load_jsonl_examples(path) == [RECORD, chat]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"instruction": "x"}, 'missing "output"'),
        ({"instruction": "x", "output": 3}, '"output" must be a string'),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user"}]}, "messages\\[0\\]"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [RECORD, RECORD, line])
    with pytest.raises(LeanftError, match=f"^data.jsonl:3: {message}"):
        load_jsonl_examples(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(LeanftError, match="does not exist"):
        load_jsonl_examples(tmp_path / "nope.jsonl")
    with pytest.raises(LeanftError, match="no examples"):
        load_jsonl_examples(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_packing_keeps_per_example_masks(tiny_chat_tokenizer):
    records = [RECORD, {"instruction": "Say hi.", "output": "hi"}, RECORD]
    features = tokenize_dataset(records, tiny_chat_tokenizer, max_seq_len=512)
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    expected = [
        {"input_ids": ids[i : i + 16], "labels": labels[i : i + 16]}
        for i in range(0, len(ids), 16)
        if any(lab != IGNORE_INDEX for lab in labels[i : i + 16])  # prompt-only blocks teach nothing
    ]
    blocks = pack_features(features, block_size=16)
    assert [{key: b[key] for key in ("input_ids", "labels")} for b in blocks] == expected
    assert all(b["position_ids"][0] == 0 and len(b["position_ids"]) == len(b["input_ids"]) for b in blocks)
    assert len(expected) < -(-len(ids) // 16)  # this data does have a prompt-only block
    packed = tokenize_dataset(records, tiny_chat_tokenizer, max_seq_len=16, pack=True)
    assert all(any(lab != IGNORE_INDEX for lab in b["labels"]) for b in packed)


def test_collate_pads_to_longest():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert collate(features, pad_token_id=0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)


def test_match_rate():
    assert match_rate([" Paris\n", "Rome", "x"], ["Paris", "Roma", "x "]) == pytest.approx(2 / 3)
    assert match_rate(["2 + 3 = 5\nAnswer: 5", "Answer: 4"], ["Answer: 5", "Answer: 6"], final_answer_match) == 0.5
    assert match_rate([], []) == 0.0
    with pytest.raises(ValueError):
        match_rate(["a"], [])


def test_generate_answers_left_pads_like_single_prompts(tiny_chat_tokenizer):
    model = tiny_llama_for(tiny_chat_tokenizer).train()
    prompts = ["What is the capital of France?", "Hi", "Rewrite the date 14 March 2021."]
    batched = generate_answers(model, tiny_chat_tokenizer, prompts, max_new_tokens=5)
    single = [generate_answers(model, tiny_chat_tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert model.training  # mode restored
