"""Compressed DDP gradients (PyTorch's comm hooks through accelerate): registered on every rank, exact at full
rank, and the bytes each step sends, on 2 gloo processes. ``python tests/test_comm_hooks.py OUT [MODEL]`` runs
the worker under torchrun (MODEL: a model spec such as ``default``; a tiny Llama when left out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import DDPCommunicationHookType
from conftest import tiny_batch, tiny_model
from test_distributed import WORLD, assert_ok, torchrun

from leanft.cli import main
from leanft.core.comm_hooks import OwnGroupDDPKwargs, powersgd_options, set_comm_hook
from leanft.core.distributed import full_tensor, gather_objects, init_distributed, rank
from leanft.core.errors import LeanftError

STEPS = 4
BUCKET_MB = 0.02  # the tiny Llama's 95 KB of gradients in several DDP buckets, as a real model has
HOOKS = {
    "none": None,
    "powersgd-full": (DDPCommunicationHookType.POWER_SGD, powersgd_options(rank=64, min_compression_rate=0)),
    "powersgd": (DDPCommunicationHookType.POWER_SGD, powersgd_options(rank=4)),
    "fp16": (DDPCommunicationHookType.FP16, {}),  # bf16's hook needs NCCL
}


class SentBytes:
    """Counts the bytes the Python comm hooks pass to ``dist.all_reduce`` (DDP's own reducer is not Python)."""

    def __init__(self) -> None:
        self.total, self.original = 0, dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.total += tensor.numel() * tensor.element_size()
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


def build(spec: str | None) -> torch.nn.Module:
    if spec is None:
        return tiny_model("llama").requires_grad_(True)
    from leanft.run.models import load_model

    return load_model(None if spec == "default" else spec).requires_grad_(True)  # full fine-tuning


def work(out: Path, spec: str | None) -> None:
    """Each hook on the same full fine-tuning run; rank 0 saves parameters, losses and bytes sent per step."""
    init_distributed(timeout_s=300 if spec is None else 3600)  # a real model's steps are slow on 2 cores
    results = {}
    for name, hook in HOOKS.items():
        torch.manual_seed(0)
        model = build(spec)
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)  # several buckets
        if hook is not None:  # what leanft has accelerate do (DistributedDataParallelKwargs(comm_hook=...))
            OwnGroupDDPKwargs(comm_hook=hook[0], comm_state_option=hook[1]).register_comm_hook(ddp)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses, sent = [], []
        vocab = model.config.vocab_size
        for step in range(STEPS):
            batch = tiny_batch(batch=2, length=16, seed=10 * step + rank())
            batch["input_ids"] = batch["input_ids"] % vocab  # tiny ids fit any vocabulary; labels stay as they are
            with SentBytes() as counter:
                loss = ddp(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            sent.append(counter.total)
        plain = sum(p.numel() * p.element_size() for p in model.parameters())  # what DDP all-reduces per step
        results[name] = {
            "losses": gather_objects(losses), "sent": sent, "plain": plain,
            "hook": gather_objects(ddp._get_ddp_logging_data().get("comm_hook")),
            "params": {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()},
        }
    if rank() == 0:
        torch.save(results, out / "hooks.pt")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hooks")
    assert_ok(torchrun(__file__, str(out)))
    return torch.load(out / "hooks.pt")


def test_each_hook_is_registered_on_every_rank(hooks):
    assert hooks["none"]["hook"] == [None] * WORLD
    for name in ("powersgd", "powersgd-full", "fp16"):
        assert len(hooks[name]["hook"]) == WORLD and all(hooks[name]["hook"]), name
        assert len(set(hooks[name]["hook"])) == 1, name


def test_powersgd_at_full_rank_matches_uncompressed_training(hooks):
    plain, full = hooks["none"]["params"], hooks["powersgd-full"]["params"]
    moved = max(float((full[n] - tiny_model("llama").state_dict()[n]).abs().max()) for n in full)
    assert moved > 1e-3  # the weights did train
    for name in plain:
        torch.testing.assert_close(full[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compressed_steps_send_less_and_still_train(hooks):
    plain = hooks["none"]["plain"]
    compressed = hooks["powersgd"]["sent"][-1]  # a step after PowerSGD's start
    assert 0 < compressed <= 0.25 * plain
    assert hooks["fp16"]["sent"][-1] == pytest.approx(plain / 2, rel=0.01)
    for name in ("powersgd", "fp16"):
        assert hooks[name]["losses"][0][-1] < hooks[name]["losses"][0][0], name


def test_the_trainer_asks_accelerate_for_the_hook_and_bad_values_are_refused(capsys, tmp_path):
    class Accelerator:
        ddp_handler = None

    accelerator = Accelerator()
    set_comm_hook(accelerator, "powersgd", rank=8)
    assert accelerator.ddp_handler.comm_hook == DDPCommunicationHookType.POWER_SGD
    assert accelerator.ddp_handler.comm_state_option["matrix_approximation_rank"] == 8
    with pytest.raises(LeanftError, match="ddp_comm_hook must be null \\(none\\) or one of fp16, bf16, powersgd"):
        set_comm_hook(accelerator, "topk")
    refused = [(["ddp_comm_hook=topk"], "ddp_comm_hook must be null (none) or one of"),
               (["ddp_comm_hook=powersgd", "fsdp=true"], "ddp_comm_hook applies to DDP"),
               (["powersgd_rank=0"], "powersgd_rank must be >= 1")]
    if not torch.cuda.is_available():
        refused.append((["ddp_comm_hook=bf16"], "needs CUDA with NCCL"))
    for keys, message in refused:
        assert main(["train", *keys, f"output_dir={tmp_path / 'run'}"]) == 2
        assert message in capsys.readouterr().err


def test_a_two_process_powersgd_run_that_logs_every_step_trains_to_the_end(model_dir, data_file, tmp_path):
    """PowerSGD's chained all-reduces once met the Trainer's loss gather in a different order on each gloo rank
    (a collective size mismatch at a logging step); on its own process group they cannot."""
    run_dir = tmp_path / "run"
    keys = ["method=full", "ddp_comm_hook=powersgd", "max_steps=10", "batch_size=4", "logging_steps=1",
            "num_eval=4", "max_new_tokens=4", "eval_steps=0"]
    assert_ok(torchrun("-m", "leanft", "train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}",
                       *keys))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["heldout_loss_after"] < summary["heldout_loss_before"]


if __name__ == "__main__":
    work(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
