"""Padding-free batches: examples in one row see only themselves, and the row's loss and gradients equal the
padded batch's, on several architectures and through ``leanft train``."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers.loss.loss_utils import ForCausalLMLoss

import leanft
from leanft.cli import main
from leanft.core.chunked_loss import chunked_causal_lm_loss
from leanft.core.packed import (
    BLOCK_MASK,
    POSITIONS,
    VARLEN_SDPA,
    flatten_examples,
    packed_attention_mode,
    varlen_sdpa,
)
from leanft.run.data import Collator, collate, pack_features

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (7, 12, 5)
NATIVE = ["llama", "gpt2", "phi3", "qwen2", "gemma", "gpt_neox"]  # transformers masks by restarting position ids


def examples(lengths=LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random examples whose first 2 tokens are a prompt (label -100), the rest an answer."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return features


def row_for(model, features) -> dict[str, torch.Tensor]:
    return flatten_examples(features, block_mask=packed_attention_mode(model) == BLOCK_MASK)


def attention(model, varlen: bool):
    """Per-example SDPA (as ``leanft train`` runs) or the model's own attention, masked by position."""
    return varlen_sdpa(model) if varlen else contextlib.nullcontext()


def loss_of(model, batch) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return ForCausalLMLoss(logits, batch["labels"], VOCAB)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("arch", [*NATIVE, "opt"])
def test_each_example_in_a_packed_row_has_the_logits_and_loss_it_has_alone(arch, varlen):
    model = tiny_model(arch).eval()
    features = examples()
    with attention(model, varlen), torch.no_grad():
        row = row_for(model, features)
        packed = model(**{k: v for k, v in row.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for feature in features:
            alone = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
            end = start + len(feature["input_ids"])
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
            labels = torch.tensor([feature["labels"]])
            own = ForCausalLMLoss(packed[None, start:end], labels, VOCAB)
            torch.testing.assert_close(own, ForCausalLMLoss(alone[None], labels, VOCAB), rtol=1e-5, atol=1e-6)
            start = end


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_restarting_positions_examples_would_see_each_other(arch):
    """The check above can fail: the same row with running positions (old packing) leaks across examples."""
    model = tiny_model(arch).eval()
    features = examples()
    ids = torch.tensor([[t for f in features for t in f["input_ids"]]])
    with torch.no_grad():
        leaky = model(input_ids=ids).logits[0, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]]
        alone = model(input_ids=torch.tensor([features[1]["input_ids"]])).logits[0]
    assert (leaky - alone).abs().max() > 1e-2


def test_packed_attention_mode_finds_how_each_model_keeps_examples_apart():
    assert packed_attention_mode(tiny_model("llama")) == POSITIONS
    opt = tiny_model("opt")
    assert packed_attention_mode(opt) == BLOCK_MASK  # OPT's own SDPA masks from attention_mask only
    with varlen_sdpa(opt):
        assert packed_attention_mode(opt) == POSITIONS  # per-example SDPA needs no mask
    model = tiny_model("llama")
    assert model.training and packed_attention_mode(model) and model.training  # the mode is left as it was


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_per_example_sdpa_attends_by_the_rows_boundaries_and_is_undone_on_exit(arch):
    """Given boundaries that merge the examples, per-example SDPA leaks; so the boundaries reach the attention."""
    model = tiny_model(arch).eval()
    row = flatten_examples(examples())
    row.pop("labels")
    total = torch.tensor([0, sum(LENGTHS)], dtype=torch.int32)
    merged = {**row, "cu_seq_lens_q": total, "cu_seq_lens_k": total, "max_length_q": sum(LENGTHS)}
    with varlen_sdpa(model), torch.no_grad():
        assert model.config._attn_implementation == VARLEN_SDPA and model.config.use_cache is False
        kept, leaked = model(**row).logits, model(**merged).logits
    assert (kept - leaked).abs().max() > 1e-2
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "opt"])
@pytest.mark.parametrize("method", ["paca", "lora", "full"])
def test_row_loss_and_gradients_equal_the_padded_batch(arch, method, varlen):
    reference = tiny_model(arch)
    if method == "paca":
        leanft.apply_paca(reference, r=4, seed=0)
    elif method == "lora":
        import peft

        lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        reference = peft.get_peft_model(reference, lora)
    model = copy.deepcopy(reference)
    features = examples()
    padded = collate(features, pad_token_id=0)
    expected = loss_of(reference, padded)
    with attention(model, varlen):
        loss = loss_of(model, row_for(model, features))
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert reference_grads and all(g is not None for g in reference_grads.values())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference_grads[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_with_num_items_equals_the_padded_batch():
    model = tiny_model("llama")
    model.config.use_cache = False  # as leanft train runs (with a cache, transformers would not mask by positions)
    features = examples()
    padded, row = collate(features, pad_token_id=0), row_for(model, features)
    items = int((padded["labels"][:, 1:] != -100).sum())
    assert items == int((row["labels"][:, 1:] != -100).sum())  # the Trainer's num_items_in_batch is the same
    with torch.no_grad():
        expected = chunked_causal_lm_loss(model, padded, num_items_in_batch=items)
        torch.testing.assert_close(chunked_causal_lm_loss(model, row, num_items_in_batch=items), expected)


def test_packed_blocks_restart_positions_at_every_example_and_every_block():
    features = examples((5, 9, 4))
    blocks = pack_features(features, block_size=8)
    assert [b["position_ids"] for b in blocks] == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 4, 5, 0, 1],  # the rest of the second example starts this block at 0
        [0, 1],  # and so does the rest of the third in the short last block
    ]
    model = tiny_model("llama").eval()
    row = flatten_examples(blocks)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([features[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(packed[:5], alone, rtol=1e-5, atol=1e-5)
    assert (row["labels"][0, [0, 5, 8, 14, 16]] == -100).all()  # no token predicts across an example boundary


def test_collator_counts_the_padding_it_computes():
    features = examples((4, 8))
    padded, free = Collator(pad_token_id=0), Collator(pad_token_id=0, packing=POSITIONS)
    assert padded(features)["input_ids"].shape == (2, 8) and padded.padding_share() == pytest.approx(4 / 16)
    assert free(features)["input_ids"].shape == (1, 12) and free.padding_share() == 0.0


def run(model_dir, data_file, run_dir, *extra) -> list[dict]:
    args = ["train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}", "max_steps=4",
            "batch_size=4", "logging_steps=1", "eval_steps=0", "save_steps=100", "num_eval=4", "seed=3", *extra]
    assert main(args) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.parametrize("extra", [(), ("dropbp.rate=0.5", "dropbp.patterns_per_step=2", "dropbp.allocate_at=null")])
def test_a_padding_free_run_trains_as_the_padded_run(model_dir, data_file, tmp_path, extra):
    """Same losses step by step (DropBP's patterns too), no padding computed, and the summary says so."""
    padded = run(model_dir, data_file, tmp_path / "padded", "padding_free=false", *extra)
    free = run(model_dir, data_file, tmp_path / "free", *extra)
    assert len(free) == 4
    torch.testing.assert_close(torch.tensor(free), torch.tensor(padded), rtol=1e-4, atol=1e-5)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("padded", "free")]
    assert summaries[1]["padding_share"] == 0.0 < summaries[0]["padding_share"]
    assert summaries[1]["precision"].startswith(("fp32: ", "bf16: "))
