"""gradient_fidelity against plain autograd on a copy with the dropped branches detached; `leanft fidelity`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_cli import one_line_error
from test_dropbp import reference_with_detached

import leanft
import leanft.run.models
from leanft.cli import main
from leanft.core.allocate import measuring
from leanft.core.fidelity import accumulated_gradients, gradient_fidelity, split_batch
from leanft.studies.fidelity_study import plot_fidelity

ALMOST_ALWAYS = 1.0 - 1e-7


def tensor_grads(model: torch.nn.Module, batch: dict, weight: float = 1.0) -> list[torch.Tensor]:
    """Plain autograd: ``weight`` times the gradient of every trainable tensor (zeros where unused)."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return [weight * (torch.zeros_like(p) if p.grad is None else p.grad) for p in model.parameters() if p.requires_grad]


def flat_grads(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.cat([grad.flatten() for grad in tensor_grads(model, batch)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


def uneven_batch(rows: int = 4) -> dict:
    """A batch whose rows hold different numbers of answer tokens (so per-micro-batch means are not enough)."""
    batch = tiny_batch(batch=rows)
    batch["labels"][0, :9] = -100
    return batch


def trainable_model() -> torch.nn.Module:
    model = tiny_model("llama")
    model.train()
    leanft.apply_paca(model, r=4, seed=0)
    return model


def test_no_dropping_is_perfect_fidelity(batch):
    model = trainable_model()
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    ctrl.set_rates([0.0] * len(ctrl.branches))
    result = gradient_fidelity(ctrl, batch, samples=2)
    keys = ("mean_cosine", "mean_tensor_cosine", "cosine_of_mean", "norm_ratio_of_mean")
    assert result == pytest.approx(dict.fromkeys(keys, 1.0), abs=1e-5)


def test_micro_batches_without_dropping_sum_to_the_full_gradient():
    model = trainable_model()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    ctrl.set_rates([0.0] * len(ctrl.branches))
    batch = uneven_batch()
    none = [False] * len(ctrl.branches)
    with measuring(ctrl) as params:
        summed = accumulated_gradients(ctrl, batch, params, [none, none])
    for actual, expected in zip(summed, tensor_grads(plain, batch), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
    result = gradient_fidelity(ctrl, batch, samples=2, patterns_per_step=2)
    assert result == pytest.approx(dict.fromkeys(result, 1.0), abs=1e-5)


def test_each_micro_batch_gets_its_own_pattern_like_detached_references():
    model = trainable_model()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=0)
    patterns = [ctrl.sample(step) for step in (0, 1)]
    assert patterns[0] != patterns[1] and not all(patterns[0]) and not all(patterns[1])
    batch = uneven_batch()
    parts = split_batch(batch, 2)
    tokens = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
    expected = [torch.zeros_like(p) for p in plain.parameters() if p.requires_grad]
    for part, pattern, count in zip(parts, patterns, tokens, strict=True):
        micro = tensor_grads(reference_with_detached(plain, ctrl, pattern), part, count / sum(tokens))
        expected = [e + m for e, m in zip(expected, micro, strict=True)]
    full = tensor_grads(plain, batch)
    flat_expected, flat_full = torch.cat([e.flatten() for e in expected]), torch.cat([f.flatten() for f in full])

    result = gradient_fidelity(ctrl, batch, samples=1, patterns_per_step=2)

    assert result["mean_cosine"] == pytest.approx(cosine(flat_expected, flat_full), abs=1e-5)
    assert result["cosine_of_mean"] == pytest.approx(cosine(flat_expected, flat_full), abs=1e-5)
    assert result["norm_ratio_of_mean"] == pytest.approx(float(flat_expected.norm() / flat_full.norm()), rel=1e-4)
    per_tensor = [cosine(e, f) if e.any() else 0.0 for e, f in zip(expected, full, strict=True) if f.any()]
    assert result["mean_tensor_cosine"] == pytest.approx(sum(per_tensor) / len(per_tensor), abs=1e-5)


def test_one_branch_always_dropped_matches_a_detached_reference(batch):
    model = trainable_model()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    dropped = 2  # layer 1's attention: layer 0's gradients lose the paths through it
    pattern = [i == dropped for i in range(len(ctrl.branches))]
    ctrl.set_rates([ALMOST_ALWAYS if p else 0.0 for p in pattern])
    full = flat_grads(reference_with_detached(plain, ctrl, [False] * len(pattern)), batch)
    partial = flat_grads(reference_with_detached(plain, ctrl, pattern), batch)
    expected = float(partial @ full / (partial.norm() * full.norm()))
    assert expected < 0.999  # the dropped branch really changes the gradient

    result = gradient_fidelity(ctrl, batch, samples=3)

    assert result["mean_cosine"] == pytest.approx(expected, abs=1e-5)
    assert result["cosine_of_mean"] == pytest.approx(expected, abs=1e-5)
    assert result["norm_ratio_of_mean"] == pytest.approx(float(partial.norm() / full.norm()), rel=1e-5)


def test_per_tensor_cosine_weights_every_tensor_equally(batch):
    model = trainable_model()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    dropped = 1  # layer 0's MLP: its own P gets no gradient (cosine 0), layer 0's attention loses some paths
    pattern = [i == dropped for i in range(len(ctrl.branches))]
    ctrl.set_rates([ALMOST_ALWAYS if p else 0.0 for p in pattern])
    full = tensor_grads(reference_with_detached(plain, ctrl, [False] * len(pattern)), batch)
    partial = tensor_grads(reference_with_detached(plain, ctrl, pattern), batch)
    by_hand = []
    for p, f in zip(partial, full, strict=True):
        if f.norm() > 0:
            by_hand.append(float((p * f).sum() / (p.norm() * f.norm())) if p.norm() > 0 else 0.0)
    assert 0.0 in by_hand and len(by_hand) == len(full)

    result = gradient_fidelity(ctrl, batch, samples=2)

    assert result["mean_tensor_cosine"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    assert result["mean_tensor_cosine"] < result["mean_cosine"]  # the zeroed small tensors count as much as big ones


def test_more_patterns_per_step_average_out_the_dropping():
    one, four = [], []
    for seed in range(3):
        model = tiny_model("llama", seed=seed)
        leanft.apply_paca(model, r=4, seed=0)
        ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=seed)
        batch = tiny_batch(batch=8, seed=seed)
        one.append(gradient_fidelity(ctrl, batch, samples=8)["mean_cosine"])
        four.append(gradient_fidelity(ctrl, batch, samples=8, patterns_per_step=4)["mean_cosine"])
    assert sum(four) / 3 > sum(one) / 3 + 0.03


def test_leaves_rng_grads_and_step_alone(batch):
    model = trainable_model()
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    model(**batch).loss.backward()
    before_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    step, rng = ctrl.step, torch.get_rng_state()

    gradient_fidelity(ctrl, batch, samples=2)

    assert ctrl.step == step and torch.equal(torch.get_rng_state(), rng)
    after_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(after_grads) == len(before_grads)
    assert all(torch.equal(a, b) for a, b in zip(after_grads, before_grads, strict=True))


def test_zero_samples_is_a_clear_error(batch):
    ctrl = leanft.apply_dropbp(trainable_model(), drop_rate=0.5)
    with pytest.raises(leanft.LeanftError, match="samples"):
        gradient_fidelity(ctrl, batch, samples=0)


@pytest.mark.parametrize("patterns", [0, 3])
def test_more_patterns_than_rows_is_a_clear_error(batch, patterns):
    ctrl = leanft.apply_dropbp(trainable_model(), drop_rate=0.5)
    with pytest.raises(leanft.LeanftError, match="patterns_per_step must be between 1 and the batch's 2 rows"):
        gradient_fidelity(ctrl, batch, samples=1, patterns_per_step=patterns)


def test_bad_fidelity_options_exit_2_with_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(leanft.run.models, "load_model_and_tokenizer", never)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    cases = [
        (["rates=0.5,2"], "rates"),
        (["rates=0.5,,0.25"], "rates"),
        (["rates=half"], "rates"),
        (["patterns=0"], "patterns"),
        (["batch_size=4", "patterns=1,8"], "patterns must be whole numbers from 1 to 4"),
        (["samples=0"], "samples"),
        (["samples=two"], "samples"),
        ([f"output={existing}"], "already exists"),
        (["colour=blue"], "unknown key 'colour'"),
    ]
    for args, message in cases:
        assert main(["fidelity", *args]) == 2, args
        assert message in one_line_error(capsys), args


def test_fidelity_command_prints_the_table_and_writes_json(model_dir, data_file, tmp_path, capsys):
    output = tmp_path / "study" / "fidelity.json"
    args = [f"model={model_dir}", f"data={data_file}", "batch_size=4", "max_seq_len=32", "rates=0.25,0.5"]
    assert main(["fidelity", *args, "patterns=1,2", "samples=2", f"output={output}"]) == 0

    printed = capsys.readouterr().out
    assert "| rate | patterns per step | mean cosine | per-tensor cosine | cosine of mean | norm ratio |" in printed
    assert "2 layers x 32" in printed and printed.count("\n| 0.") == 4
    result = json.loads(output.read_text())
    assert result["layers"] == 2 and result["width"] == 32 and result["parameters"] > 0
    assert result["batch_rows"] == 4 and result["answer_tokens"] > 0 and result["samples"] == 2
    assert [(row["rate"], row["patterns_per_step"]) for row in result["measurements"]] == [
        (0.25, 1),
        (0.25, 2),
        (0.5, 1),
        (0.5, 2),
    ]
    for row in result["measurements"]:
        assert set(row) == {
            "rate",
            "patterns_per_step",
            "mean_cosine",
            "mean_tensor_cosine",
            "cosine_of_mean",
            "norm_ratio_of_mean",
        }
        assert -1.0 <= row["mean_tensor_cosine"] <= 1.0 + 1e-6

    assert main(["fidelity", *args, f"output={output}"]) == 2
    assert "already exists" in one_line_error(capsys)


def test_plot_fidelity_writes_a_png(tmp_path):
    def result(model: str, parameters: int, cosine: float) -> dict:
        rows = [{"rate": 0.5, "patterns_per_step": k, "mean_tensor_cosine": cosine * k**0.1} for k in (1, 4)]
        return {"model": model, "parameters": parameters, "measurements": rows}

    results = [result("small.gguf", 135_000_000, 0.5), result("large.gguf", 1_500_000_000, 0.7)]
    path = plot_fidelity(results, tmp_path / "fidelity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_plot_command_draws_saved_results_and_names_bad_input(tmp_path, capsys):
    rows = [{"rate": 0.5, "patterns_per_step": 1, "mean_tensor_cosine": 0.3}]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"model": "a.gguf", "parameters": 10**8, "measurements": rows}))
    second.write_text(json.dumps({"model": "b.gguf", "parameters": 10**9, "measurements": rows}))
    out = tmp_path / "fidelity.png"
    assert main(["fidelity", f"plot={out}", f"results={first},{second}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for items in ([f"plot={out}", f"results={tmp_path / 'none.json'}"], [f"plot={out}", "rates=0.5"]):
        capsys.readouterr()
        assert main(["fidelity", *items]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
