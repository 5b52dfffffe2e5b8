"""Preference tuning (objective=dpo): the reference without a copy, the loss at step 0, learning, resume, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_tokenizer, tiny_llama_for
from safetensors.torch import load_file
from test_cli import InterruptAt, one_line_error
from transformers import AutoModelForCausalLM, TrainerCallback

import leanft
from leanft.cli import main
from leanft.core.reference import ReferenceView
from leanft.run.config import TrainConfig, load_config
from leanft.run.dpo_eval import pair_logps
from leanft.run.methods import attach_method
from leanft.run.pref_tasks import prefs_arith_task, verify_preference
from leanft.run.preferences import normalise, tokenize_pairs
from leanft.run.train import train

pytest.importorskip("trl")

TINY = ["max_steps=6", "batch_size=4", "save_steps=3", "num_eval=6", "logging_steps=1", "bf16=false"]


def pair(i: int) -> dict:
    """A pair whose chosen answer always says yes: learnable, so held-out margins must rise."""
    return {"prompt": f"Is {i} a number?", "chosen": f"yes, {i}", "rejected": f"no, {i + 3}"}


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    """30 string preference records in JSONL, and 6 held-out ones next to it (``heldout.jsonl``)."""
    folder = tmp_path_factory.mktemp("prefs")
    (folder / "heldout.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(100, 106)))
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(30)))
    return path


def dpo_args(model_dir, data, run_dir, *extra) -> list[str]:
    held_out = f"eval_data={data.parent / 'heldout.jsonl'}"
    return ["train", "objective=dpo", f"model={model_dir}", f"data={data}", held_out, f"output_dir={run_dir}", *TINY,
            *extra]


def features(tokenizer, count: int = 6) -> list[dict]:
    return tokenize_pairs([normalise(pair(i)) for i in range(count)], tokenizer, 64)[0]


def train_a_little(model, steps: int = 3) -> None:
    """A few SGD steps on random tokens, so every trained part moves away from the base."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["paca", "s2ft", "lora"])
def test_the_reference_view_computes_exactly_the_untouched_base(method):
    tokenizer = make_tiny_tokenizer()
    base = tiny_llama_for(tokenizer).eval()
    policy = attach_method(copy.deepcopy(base), method, TrainConfig(method=method, r=4).method_settings())
    pairs = features(tokenizer)
    expected = pair_logps(base, pairs, tokenizer.pad_token_id)
    train_a_little(policy)
    trained = pair_logps(policy, pairs, tokenizer.pad_token_id)
    assert not torch.allclose(trained, expected)  # the policy did move
    reference = ReferenceView(policy)
    ids = torch.tensor([pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    with leanft.reference_pass(policy):
        torch.testing.assert_close(pair_logps(policy, pairs, tokenizer.pad_token_id), expected, rtol=0, atol=0)
    torch.testing.assert_close(pair_logps(policy, pairs, tokenizer.pad_token_id), trained, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_reference_pass_between_forward_and_backward_leaves_the_gradients_alone(checkpointing):
    """On the CPU PaCA keeps its columns written into W: a reference pass must not invalidate a pending backward
    (whose saved W it would change), and DropBP's pattern (recomputed under activation checkpointing) must
    survive it."""
    tokenizer = make_tiny_tokenizer()
    policy = leanft.apply_paca(tiny_llama_for(tokenizer), r=4)
    train_a_little(policy)  # the columns now differ from W's originals
    leanft.apply_dropbp(policy, drop_rate=0.5, seed=3)
    if checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = []
    for with_reference in (False, True):
        controller = policy.leanft_dropbp
        controller.step = 0  # the same pattern both times
        loss = policy(input_ids=ids, labels=ids).loss
        if with_reference:
            with torch.no_grad(), leanft.reference_pass(policy):
                policy(input_ids=ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
        policy.zero_grad()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["paca", "lora", "full"])
def test_the_dpo_loss_at_step_zero_is_log_2(model_dir, prefs_file, tmp_path, method):
    run_dir = tmp_path / "run"
    assert main(dpo_args(model_dir, prefs_file, run_dir, f"method={method}", "max_steps=1")) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "loss" in m)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), rel=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preference_accuracy_before"] == 0.5 and summary["mean_margin_before"] == 0.0
    assert summary["dpo_loss_before"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_tiny_run_raises_the_held_out_margin(model_dir, prefs_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(dpo_args(model_dir, prefs_file, run_dir, "max_steps=8", "lr=0.02", "eval_steps=4")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 8
    assert summary["mean_margin_after"] > 0.5 and summary["preference_accuracy_after"] > 0.8
    assert summary["mean_logprob_gap_after"] > summary["mean_logprob_gap_before"]
    assert [point["step"] for point in summary["heldout_curve"]] == [4, 8]
    assert set(load_file(run_dir / "adapter" / "paca_adapter.safetensors"))
    assert (run_dir / "checkpoint-6" / "leanft_complete").is_file() and (run_dir / "loss_curve.png").is_file()
    assert not (run_dir / "README.md").exists()  # no hub model card in the run folder
    assert "preference accuracy 50% ->" in capsys.readouterr().out


class HeadTilesSeen(TrainerCallback):
    """Records TRL's fused-head tile sizes as each training step begins."""

    def __init__(self) -> None:
        self.seen = set()

    def on_step_begin(self, args, state, control, **kwargs):
        from trl.kernels import chunked_logprob
        from trl.trainer import utils

        self.seen.add((chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE))


def test_a_cpu_run_uses_smaller_head_tiles_and_restores_trls_afterwards(model_dir, prefs_file, tmp_path):
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    defaults = (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    tiles = HeadTilesSeen()
    train(load_config(None, dpo_args(model_dir, prefs_file, tmp_path / "run", "max_steps=2")[1:]), callbacks=[tiles])
    assert tiles.seen == {(512, 4096)} != {defaults}
    assert defaults == (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def test_ctrl_c_and_resume_give_the_uninterrupted_dpo_run(model_dir, prefs_file, tmp_path):
    extra = ("lr=0.02", "dropbp.rate=0.5", "dropbp.allocate_at=0.34")
    assert main(dpo_args(model_dir, prefs_file, tmp_path / "straight", *extra)) == 0
    interrupted = load_config(None, dpo_args(model_dir, prefs_file, tmp_path / "resumed", *extra)[1:])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[InterruptAt(4)])
    assert (tmp_path / "resumed" / "checkpoint-4" / "leanft_complete").is_file()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    assert main(dpo_args(model_dir, prefs_file, tmp_path / "resumed", *extra, "resume=true")) == 0
    straight, resumed = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("straight", "resumed"))
    assert resumed["steps"] == 6 and resumed["dropbp_rates"] == straight["dropbp_rates"]
    assert resumed["mean_margin_after"] == pytest.approx(straight["mean_margin_after"], rel=1e-4, abs=1e-5)
    expected = load_file(tmp_path / "straight" / "adapter" / "paca_adapter.safetensors")
    actual = load_file(tmp_path / "resumed" / "adapter" / "paca_adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    leanft.load_paca(trained, tmp_path / "resumed" / "adapter")  # the adapter is a plain PaCA adapter


BAD_RECORDS = [
    ({"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, '"rejected" is empty'),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "must both be strings or both lists"),
    ({"chosen": "a", "rejected": "b"}, 'missing "prompt"'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, '"prompt" is empty'),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share the messages"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "must be the assistant's answer"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_a_bad_record_is_named_by_file_and_line_before_any_model_loads(record, message, tmp_path, capsys, monkeypatch):
    from leanft.run import models

    def never(*_, **__):
        raise AssertionError("the model loaded before the records were checked")

    monkeypatch.setattr(models, "load_model", never)
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps(pair(0)) + "\n\n" + json.dumps(record) + "\n")
    assert main(["train", "objective=dpo", f"data={bad}", f"output_dir={tmp_path / 'out'}"]) == 2
    line = one_line_error(capsys)
    assert "prefs.jsonl:3: " in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_chat_records_with_an_implicit_or_a_given_prompt_render_like_string_records():
    tokenizer = make_tiny_tokenizer()
    user = {"role": "user", "content": "Is 1 a number?"}
    chat = {"chosen": [user, {"role": "assistant", "content": "yes, 1"}],
            "rejected": [user, {"role": "assistant", "content": "no, 4"}]}  # fmt: skip
    given = {"prompt": [user], "chosen": [chat["chosen"][1]], "rejected": [chat["rejected"][1]]}
    expected = tokenize_pairs([normalise(pair(1))], tokenizer, 64)[0]
    for record in (chat, given):
        assert tokenize_pairs([normalise(record)], tokenizer, 64)[0] == expected
    feature = expected[0]
    rendered = tokenizer.decode(feature["prompt_ids"] + feature["chosen_ids"])
    assert rendered == tokenizer.apply_chat_template([user, chat["chosen"][1]], tokenize=False).rstrip("\n")


@pytest.mark.parametrize(("extra", "message"), [
    (["packing=true"], "packing=true"),
    (["streaming=true"], "streaming=true is not supported with objective=dpo"),
    (["data=builtin:dates"], "objective=dpo needs preference data"),
    (["dpo.beta=0"], "dpo.beta must be > 0"),
    (["dpo.loss_type=kto"], "dpo.loss_type must be one of"),
])  # fmt: skip
def test_keys_that_make_no_sense_for_dpo_are_refused_in_one_line(extra, message, prefs_file, tmp_path, capsys):
    assert main(["train", "objective=dpo", f"data={prefs_file}", f"output_dir={tmp_path / 'out'}", *extra]) == 2
    assert message in one_line_error(capsys)
    assert main(["train", "data=builtin:prefs-arith", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "set objective=dpo" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_prefs_arith_is_verifiable_and_its_held_out_split_is_disjoint_and_fixed():
    train_records, held_out = prefs_arith_task(seed=0, n_train=300, n_eval=50)
    assert len(train_records) == 300 and len(held_out) == 50
    assert all(verify_preference(record) for record in train_records + held_out)
    assert not {r["prompt"] for r in train_records} & {r["prompt"] for r in held_out}
    assert prefs_arith_task(seed=0, n_train=10, n_eval=50)[1] == held_out
    assert not verify_preference({**held_out[0], "chosen": held_out[0]["rejected"]})


def test_preference_tuning_defaults_to_a_tenth_of_the_methods_learning_rate_and_paca_to_its_measured_setting(
        prefs_file):
    for method in ("lora", "full", "s2ft"):
        sft = load_config(None, [f"method={method}"])
        dpo = load_config(None, [f"method={method}", "objective=dpo", f"data={prefs_file}"])
        assert dpo.learning_rate() == pytest.approx(sft.learning_rate() / 10) and dpo.rank() == sft.rank()
        assert dpo.resolved().lr == dpo.learning_rate()  # recorded in the run folder as such
    paca = load_config(None, ["objective=dpo", f"data={prefs_file}"])
    assert (paca.learning_rate(), paca.rank()) == (3e-4, 32) and (paca.resolved().lr, paca.resolved().r) == (3e-4, 32)
    assert load_config(None, ["objective=dpo", f"data={prefs_file}", "lr=0.02"]).learning_rate() == 0.02
