"""DropBP with PaCA / LoRA across 2 CPU processes (gloo): DDP and FSDP2 against single-process references.

The workers are this file run as a script under torchrun (``python -m torch.distributed.run``). One launch
trains every equivalence scenario and leaves what rank 0 gathered in a folder; the tests compare it with
the same training run in this process on the concatenated per-rank batches. ``ddp-paca-accum`` accumulates
2 micro-batches per step under DDP's ``no_sync`` (a pattern each; some drop every branch). Other launches
check failure handling and ``torchrun -m leanft train`` end to end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama, tiny_batch, tiny_model

import leanft
from leanft.core.allocate import allocate_rates
from leanft.core.compiled import compile_branches
from leanft.core.distributed import (
    anchor_graphless_forwards,
    broadcast_from_main,
    check_same_on_all_ranks,
    full_tensor,
    gather_objects,
    init_distributed,
    rank,
    shard_fsdp2,
    use_non_reentrant_checkpointing,
)
from leanft.core.errors import LeanftError

WORLD = 2
STEPS = 5
ALLOCATE_BEFORE_STEP = 2
LR = 0.5
SCENARIOS = ("ddp-paca", "ddp-lora", "fsdp2-paca", "ddp-paca-accum", "fsdp2-paca-accum", "ddp-paca-compile",
             "fsdp2-paca-compile")  # -compile: torch.compile'd branches, against the eager reference
MICRO_BATCHES = {"ddp-paca-accum": 2, "fsdp2-paca-accum": 2}  # per step, else 1
DROP_EVERY_BRANCH = {(1, 1), (3, 0)}  # (step, micro-batch) with more than one micro-batch: a graph-less loss
LAUNCH_TIMEOUT_S = 240
FAILING_RANK = Path(__file__).with_name("failing_rank.py")


# --------------------------------------------------------------------------- the training both sides run


def build(method: str, compiled: bool = False) -> tuple[torch.nn.Module, leanft.DropBP]:
    """Tiny llama with PaCA or peft LoRA, and DropBP at 0.5 (identical on every rank and in the reference)."""
    model = tiny_model("llama")
    if method == "paca":
        leanft.apply_paca(model, r=4, seed=0)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if compiled:
        compile_branches(model, backend="aot_eager")  # traced forward and backward, without the C++ compile
    return model, leanft.apply_dropbp(model, drop_rate=0.5, seed=0)


def rank_batch(step: int, micro: int, index: int) -> dict[str, torch.Tensor]:
    """Rank ``index``'s micro-batch ``micro`` at ``step`` (equal label counts: mean losses average exactly)."""
    return tiny_batch(batch=2, length=12, seed=100 * step + 10 * micro + index)


def run_steps(model, ctrl, forward, batch_at, micro: int = 1, no_sync=contextlib.nullcontext,
              anchored: bool = False) -> tuple[list, list]:  # fmt: skip
    """SGD steps of ``micro`` micro-batches (``no_sync`` around all but the last), allocation once on a shared batch;
    ``anchored``: graphless forwards anchored for DDP, as leanft's DropBP callback does.

    Returns the pattern of every micro-batch and, per step, the trainable parameters the optimizer saw without a
    gradient.
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    if anchored:
        anchor_graphless_forwards(model, optimizer)
    patterns, gradless = [], []
    for step in range(STEPS):
        if step == ALLOCATE_BEFORE_STEP:
            ctrl.set_rates(broadcast_from_main(allocate_rates(ctrl, tiny_batch(batch=2, length=12, seed=7))))
        for index in range(micro):
            drop_all = micro > 1 and (step, index) in DROP_EVERY_BRANCH
            forced = ctrl.forced([True] * len(ctrl.branches)) if drop_all else contextlib.nullcontext()
            with no_sync() if index < micro - 1 else contextlib.nullcontext(), forced:
                forward(**batch_at(step, index)).loss.backward()
            patterns.append(list(ctrl.dropped))
        optimizer.step()
        gradless.append(sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None))
        optimizer.zero_grad()
    return patterns, gradless


def trained(model) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters."""
    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- worker side (under torchrun)


def work_equivalence(out: Path) -> None:
    """Every scenario in one process group; rank 0 saves patterns, rates and parameters per scenario."""
    init_distributed(timeout_s=60)
    for scenario in SCENARIOS:
        engine, method = scenario.split("-")[:2]
        model, ctrl = build(method, compiled=scenario.endswith("-compile"))
        if engine == "fsdp2":
            forward = shard_fsdp2(model)

            @contextlib.contextmanager
            def no_sync(sharded=forward):  # as the Trainer defers FSDP2's reduce-scatter under accumulation
                sharded.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    sharded.set_requires_gradient_sync(True)

        else:
            forward = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            no_sync = forward.no_sync
        micro = MICRO_BATCHES.get(scenario, 1)
        batch_at = functools.partial(rank_batch, index=rank())
        patterns, gradless = run_steps(model, ctrl, forward, batch_at, micro, no_sync, anchored=engine != "fsdp2")
        result = {"patterns": gather_objects(patterns), "rates": gather_objects(ctrl.rates), "params": trained(model)}
        result["gradless"] = gather_objects(gradless)
        result["frozen"] = {name: full_tensor(m.weight.detach()) for name, m in leanft.paca_modules(model).items()}
        if method == "paca":
            leanft.save_paca(model, out / scenario / "adapter")  # every rank; rank 0 writes
        if rank() == 0:
            torch.save(result, out / f"{scenario}.pt")


# --------------------------------------------------------------------------- test side


def torchrun(*args: str, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Launch ``args`` on 2 local processes with torchrun; output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Folder with what rank 0 wrote for every equivalence scenario."""
    out = tmp_path_factory.mktemp("distributed")
    assert_ok(torchrun(__file__, str(out)))
    return out


def reference(method: str, tmp_path: Path, micro: int = 1) -> tuple[dict, list, list[float], list, Path]:
    """(parameters, patterns, rates, gradless, adapter folder) of one process on the concatenated per-rank batches."""
    model, ctrl = build(method)

    def concatenated(step: int, micro: int) -> dict[str, torch.Tensor]:
        batches = [rank_batch(step, micro, index) for index in range(WORLD)]
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}

    patterns, gradless = run_steps(model, ctrl, model, concatenated, micro)
    adapter = leanft.save_paca(model, tmp_path / "reference") if method == "paca" else tmp_path
    return trained(model), patterns, ctrl.rates, gradless, adapter


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_single_process_run_with_identical_patterns_on_every_rank(launched, scenario, tmp_path):
    got = torch.load(launched / f"{scenario}.pt")
    params, patterns, rates, gradless, _ = reference(scenario.split("-")[1], tmp_path, MICRO_BATCHES.get(scenario, 1))
    assert got["patterns"] == [patterns] * WORLD  # every rank, every micro-batch: the reference's pattern
    assert any(any(p) for p in patterns) and not all(all(p) for p in patterns)
    assert got["gradless"] == [gradless] * WORLD and any(gradless)  # dropped all step long: no gradient, as here
    assert got["rates"] == [rates] * WORLD and rates != [0.5] * len(rates)  # allocated, the same everywhere
    assert got["params"].keys() == params.keys()
    for name, value in params.items():
        torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_keeps_the_original_columns_and_save_paca_writes_the_full_adapter_once(launched, tmp_path):
    from safetensors.torch import load_file

    frozen = torch.load(launched / "fsdp2-paca.pt")["frozen"]  # gathered after training: still the originals
    originals = {name: m.weight.detach() for name, m in leanft.paca_modules(build("paca")[0]).items()}
    assert frozen.keys() == originals.keys()
    for name, weight in originals.items():
        assert torch.equal(frozen[name], weight), name
    folder = launched / "fsdp2-paca" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["paca_adapter.safetensors", "paca_config.json"]
    *_, expected = reference("paca", tmp_path)
    got, want = load_file(folder / "paca_adapter.safetensors"), load_file(expected / "paca_adapter.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_killed_rank_fails_the_torchrun_launch_within_bounded_time():
    started = time.monotonic()
    result = torchrun(str(FAILING_RANK), "kill", "60", timeout=90)
    assert result.returncode != 0
    assert time.monotonic() - started < 60, "the launch took too long to fail"


def test_a_stuck_rank_makes_the_others_fail_after_the_timeout_without_a_launcher():
    """No torchrun watching: rank 0's collective must give up on its own (init_distributed's timeout)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD)}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(FAILING_RANK), "hang", "3"],
            env={**env, "RANK": str(index), "LOCAL_RANK": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(WORLD)
    ]
    try:
        started = time.monotonic()
        output, _ = ranks[0].communicate(timeout=90)
        assert ranks[0].returncode != 0 and time.monotonic() - started < 60
        assert "timed out" in output.lower() or "timeout" in output.lower(), output[-2000:]
    finally:
        for process in ranks:
            process.kill()
            process.wait()


def test_check_same_on_all_ranks_is_a_noop_in_one_process():
    check_same_on_all_ranks({"rates": [0.1]}, "rates")
    assert gather_objects(3) == [3]
    with pytest.raises(LeanftError, match="distributed launch"):
        shard_fsdp2(tiny_model("llama"))


def test_reentrant_checkpointing_is_switched_to_non_reentrant(batch):
    model = tiny_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert use_non_reentrant_checkpointing(model)
    assert not use_non_reentrant_checkpointing(model)  # already switched
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def write_tiny_run_inputs(folder: Path) -> tuple[Path, Path]:
    """A tiny llama + tokenizer saved with save_pretrained, and a small JSONL data set."""
    save_tiny_llama(folder / "model")
    records = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(24)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "model", folder / "data.jsonl"


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_leanft_train_writes_once_with_the_same_rates(engine, tmp_path):
    model, data = write_tiny_run_inputs(tmp_path)
    run_dir = tmp_path / "run"
    result = torchrun(
        "-m", "leanft", "train", f"model={model}", f"data={data}", f"output_dir={run_dir}", f"fsdp={engine == 'fsdp'}",
        "max_steps=4", "batch_size=2", "save_steps=2", "logging_steps=1", "max_seq_len=64", "num_eval=2",
        "max_new_tokens=2", "dropbp.rate=0.5", "dropbp.allocate_at=0.25", "dropbp.allocation_samples=2",
        "dropbp.patterns_per_step=2",  # every checkpoint checks that the ranks drew the same micro-batch patterns
    )  # fmt: skip
    assert_ok(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.stdout.count("run folder:") == 1  # the summary is printed once
    assert (result.stdout + result.stderr).count("DropBP allocation at step 1") == 1  # logged once
    assert summary["steps"] == 4 and summary["dropbp_rates"] != [0.5] * 4
    for step in (2, 4):
        checkpoint = run_dir / f"checkpoint-{step}"
        assert {"paca_adapter.safetensors", "leanft_complete"} <= {p.name for p in checkpoint.iterdir()}
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        dropbp = state["stateful_callbacks"]["DropBPCallback"]["attributes"]["dropbp"]
        assert dropbp["rates"] == summary["dropbp_rates"] and dropbp["step"] == 2 * step  # a pattern per micro-batch
        assert state["epoch"] == pytest.approx(step / math.ceil(23 / WORLD / 2))  # each rank: its shard of the data
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".")]  # no temporary leftovers
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # logged once per step, not once per rank


if __name__ == "__main__":
    work_equivalence(Path(sys.argv[1]))
