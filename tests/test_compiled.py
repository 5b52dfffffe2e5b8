"""Compiled branches: a bounded number of graphs whatever DropBP draws, and the eager model's numbers."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_cli import run_args

import leanft
from leanft.cli import main
from leanft.core.compiled import compile_branches, uncompile_branches
from leanft.core.errors import LeanftError


def counting_backend(counter: Counter):
    """A torch.compile backend that runs graphs as traced (through AOTAutograd) and counts them."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(graph, example_inputs):
        counter["graphs"] += 1
        return graph.forward

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def paca_with_dropbp(model, backend=None, rate: float = 0.5):
    model = leanft.apply_paca(model, r=4)
    if backend is not None:
        assert compile_branches(model, backend=backend) == 4  # 2 blocks x (attention, MLP)
    return model, leanft.apply_dropbp(model, rate, seed=0)


def test_random_patterns_over_50_steps_compile_a_bounded_number_of_graphs():
    torch._dynamo.reset()
    counter = Counter()
    model, controller = paca_with_dropbp(tiny_model("llama"), counting_backend(counter))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    counts, patterns = {}, set()
    for step in range(50):
        loss = model(**tiny_batch(seed=step % 3, length=10 + step % 4)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        patterns.add(tuple(controller.dropped))
        counts[step] = counter["graphs"]
    assert len(patterns) > 8  # many patterns drawn ...
    assert counts[49] == counts[20] and counts[49] <= 32  # ... and no graph compiled after the first steps


def test_compiled_branches_give_the_eager_loss_and_gradients_under_the_same_pattern():
    torch._dynamo.reset()
    eager, eager_ctrl = paca_with_dropbp(tiny_model("llama"))
    compiled, compiled_ctrl = paca_with_dropbp(copy.deepcopy(tiny_model("llama")), counting_backend(Counter()))
    compiled.load_state_dict(eager.state_dict())
    pattern = [True, False, False, True]
    for model, ctrl in ((eager, eager_ctrl), (compiled, compiled_ctrl)):
        with ctrl.forced(pattern):
            model(**tiny_batch()).loss.backward()
    wanted = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    actual = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
    assert actual.keys() == wanted.keys() and len(wanted) < len(list(leanft.paca_modules(eager)))  # some dropped
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_with_compiled_branches_keeps_the_gradients():
    torch._dynamo.reset()
    reference = leanft.apply_paca(tiny_model("llama"), r=4)
    model = copy.deepcopy(reference)
    compile_branches(model, backend=counting_backend(Counter()))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference(**tiny_batch()).loss.backward()
    model(**tiny_batch()).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiling_after_dropbp_is_refused_and_uncompiling_restores_eager():
    model, controller = paca_with_dropbp(tiny_model("llama"))
    with pytest.raises(LeanftError, match="before apply_dropbp"):
        compile_branches(model)
    controller.remove()
    compile_branches(model, backend="eager")
    again = leanft.apply_dropbp(model, 0.5)
    with pytest.raises(LeanftError, match="remove DropBP first"):  # the patches come off in reverse order
        uncompile_branches(model)
    again.remove()
    uncompile_branches(model)
    assert not any("_leanft_compiled_forward" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())


def test_a_compiled_run_trains_and_saves(model_dir, data_file, tmp_path):
    torch._dynamo.reset()
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "compile=true", "dropbp.rate=0.5", "max_steps=3")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["heldout_loss_after"] < summary["heldout_loss_before"]
