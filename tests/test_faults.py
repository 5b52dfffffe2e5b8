"""Fault injection: ``kill -9`` at random points of training and of checkpoint writing, then ``resume=true``.

Every trial must either resume to the bit-identical adapter of an uninterrupted run, have been killed before
its first checkpoint was complete (then resume refuses with one line), or have finished before the kill came
(then resume refuses too, and the finished adapter is the uninterrupted one). The default run makes 3 trials for each
``save_total_limit``; the slow suite makes 20.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

STEPS = 6


def command(model_dir, data_file, run_dir, limit: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "leanft", "train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}",
        f"max_steps={STEPS}", "batch_size=4", "save_steps=1", f"save_total_limit={limit}", "num_eval=4",
        "max_new_tokens=2", "eval_steps=0", *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)


def kill_during(args: list[str], run_dir, step: int, delay: float) -> bool:
    """Start the run, and SIGKILL it ``delay`` seconds after its checkpoint of ``step`` begins to appear.

    Returns False when the run had already finished by then (a kill at the last step can come too late)."""
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run_dir / f"checkpoint-{step}"
    deadline = time.monotonic() + 240
    while process.poll() is None and not target.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        assert process.returncode == 0
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def adapter(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "paca_adapter.safetensors")


def trials(model_dir, data_file, tmp_path, limit: int, count: int, seed: int) -> list[str]:
    reference_dir = tmp_path / "reference"
    done = run(command(model_dir, data_file, reference_dir, limit))
    assert done.returncode == 0, done.stderr[-2000:]
    reference = adapter(reference_dir)
    chooser, outcomes = random.Random(seed), []
    for trial in range(count):
        run_dir = tmp_path / f"trial-{trial}"
        step, delay = chooser.randint(1, STEPS), chooser.uniform(0.0, 0.4)
        killed = kill_during(command(model_dir, data_file, run_dir, limit), run_dir, step, delay)
        resumed = run(command(model_dir, data_file, run_dir, limit, "resume=true"))
        if resumed.returncode == 2 and "holds a finished run" in resumed.stderr:
            assert (run_dir / "summary.json").exists()
            assert all(torch.equal(adapter(run_dir)[key], reference[key]) for key in reference)
            outcomes.append("finished before the kill")
            continue
        assert killed, resumed.stderr[-2000:]
        if resumed.returncode == 2 and "no complete checkpoint" in resumed.stderr:
            assert not (run_dir / "summary.json").exists()
            outcomes.append("before the first checkpoint")
            continue
        assert resumed.returncode == 0, (step, delay, resumed.stderr[-2000:])
        actual = adapter(run_dir)
        assert actual.keys() == reference.keys()
        assert all(torch.equal(actual[key], reference[key]) for key in reference), (step, delay)
        outcomes.append("resumed, bit-identical")
    return outcomes


@pytest.mark.parametrize("limit", [1, 2])
def test_kill_9_anywhere_then_resume_gives_the_same_adapter(model_dir, data_file, tmp_path, limit):
    outcomes = trials(model_dir, data_file, tmp_path, limit, count=3, seed=limit)
    assert "resumed, bit-identical" in outcomes


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2])
def test_kill_9_anywhere_then_resume_many_times(model_dir, data_file, tmp_path, limit):
    outcomes = trials(model_dir, data_file, tmp_path, limit, count=20, seed=100 + limit)
    assert outcomes.count("resumed, bit-identical") >= 10


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1 MiB tmpfs (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not allowed here")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_a_full_disk_while_full_fine_tuning_saves_is_one_line(model_dir, data_file, small_disk):
    from leanft.run.rundir import checkpoint_problem, checkpoints

    run_dir = small_disk / "run"
    args = command(model_dir, data_file, run_dir, 3, "method=full", "bf16=false")
    args[args.index("save_steps=1")] = "save_steps=2"
    error = one_line_error(run(args))
    assert error.startswith("leanft: error:") and ("is full" in error or "no space left" in error)
    assert all(checkpoint_problem(folder) is None for folder in checkpoints(run_dir))  # what was kept is whole


def test_a_merge_onto_a_full_disk_is_one_line_and_leaves_nothing(model_dir, data_file, small_disk, tmp_path):
    run_dir = tmp_path / "run"
    assert run(command(model_dir, data_file, run_dir, 1, "method=full", "bf16=false")).returncode == 0
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # less is left than the merged model needs
    out = small_disk / "merged"
    error = one_line_error(run([sys.executable, "-m", "leanft", "merge", str(run_dir), str(out)]))
    assert "no space left" in error and not out.exists()
    assert not [path for path in small_disk.iterdir() if path.name != "filler"]  # no half-written temporary


def fill(disk) -> None:
    """Leave no free byte on ``disk``."""
    with open(disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        except OSError:
            pass


@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_full_disk_while_a_checkpoint_saves_trainer_state_is_one_line(
    model_dir, data_file, small_disk, monkeypatch, capsys, state_file
):
    """The disk fills up just as the Trainer writes the optimizer, scheduler or RNG state of the second
    checkpoint (torch's own error on a full tmpfs): one line, exit 2, and the first checkpoint stays whole."""
    from leanft.cli import main
    from leanft.run.rundir import checkpoint_problem, checkpoints

    real_save = torch.save

    def save(obj, target, *args, **kwargs):
        if isinstance(target, str | os.PathLike) and str(target).endswith(f"checkpoint-4{os.sep}{state_file}"):
            fill(small_disk)
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = small_disk / "run"
    args = command(model_dir, data_file, run_dir, 3, "bf16=false")[3:]  # the arguments after `-m leanft`
    args[args.index("save_steps=1")] = "save_steps=2"
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("leanft: error:") and "is full" in error, error
    kept = checkpoints(run_dir)
    assert kept == [run_dir / "checkpoint-2"] and checkpoint_problem(kept[0]) is None


@pytest.mark.parametrize("name, extra", [("adapter", ["format=peft-lora"]), ("tuned.gguf", [])])
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(model_dir, data_file, small_disk, tmp_path,
                                                                  name, extra):
    """A peft LoRA adapter folder and a GGUF file (with its Modelfile) on a disk with 48 KiB left."""
    run_dir = tmp_path / "run"
    assert run(command(model_dir, data_file, run_dir, 1, "bf16=false")).returncode == 0  # a PaCA run
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # less is left than the output needs
    out = small_disk / name
    error = one_line_error(run([sys.executable, "-m", "leanft", "export", str(run_dir), str(out), *extra]))
    assert "no space left" in error and not out.exists()
    assert not [path for path in small_disk.iterdir() if path.name != "filler"]  # no half-written temporary


def test_a_full_disk_while_the_final_adapter_saves_is_one_line(model_dir, data_file, small_disk, monkeypatch, capsys):
    """The disk fills up as the run writes its final PaCA adapter (after its last checkpoint): one line, exit 2,
    no half-written adapter folder, and the checkpoint to resume from stays whole."""
    from leanft.cli import main
    from leanft.core import paca
    from leanft.run.rundir import checkpoint_problem, checkpoints

    real_save = paca.save_file

    def save(tensors, target, *args, **kwargs):
        if "checkpoint-" not in str(target):  # the run's final adapter/ (its checkpoints were written before)
            fill(small_disk)
        return real_save(tensors, target, *args, **kwargs)

    monkeypatch.setattr(paca, "save_file", save)
    run_dir = small_disk / "run"
    args = command(model_dir, data_file, run_dir, 1, "bf16=false")[3:]
    args[args.index("save_steps=1")] = f"save_steps={STEPS}"
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("leanft: error:") and "no space left" in error, error
    assert not (run_dir / "adapter").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert [c.name for c in checkpoints(run_dir)] == [f"checkpoint-{STEPS}"]
    assert checkpoint_problem(checkpoints(run_dir)[0]) is None
