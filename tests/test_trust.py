"""Runs a user can trust: resume with the saved config, damaged checkpoints, one run per folder, bad input."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_cli import TINY_ARGS, one_line_error, run_args

import leanft
from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.run.files import LOCK_FILE
from leanft.run.rundir import RunFolderLock, checkpoint_problem


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes (and every folder), to compare before and after a command."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def adapter(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "paca_adapter.safetensors")


def assert_same_adapter(run_dir, reference_dir) -> None:
    expected, actual = adapter(reference_dir), adapter(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture(scope="module")
def straight(model_dir, data_file, tmp_path_factory):
    """An uninterrupted 6-step run: the reference every resumed run must match bit for bit."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert main(run_args(model_dir, data_file, run_dir, "save_total_limit=3")) == 0
    return run_dir


@pytest.fixture(scope="module")
def unfinished(model_dir, data_file, straight, tmp_path_factory):
    """The straight run as if killed after its step-3 checkpoint: no summary, no adapter, checkpoint-6 gone."""
    run_dir = tmp_path_factory.mktemp("unfinished") / "run"
    shutil.copytree(straight, run_dir)
    for name in ("summary.json", "adapter", "checkpoint-6", "loss_curve.png"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run_dir


def test_resume_uses_the_saved_config_and_may_change_only_safe_keys(model_dir, data_file, straight, unfinished,
                                                                    tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir)
    before = snapshot(run_dir)
    for key in ("r=4", "method=lora", "batch_size=2", "lr=0.5", "dropbp.rate=0.5", f"data={model_dir}/x.jsonl"):
        assert main(["train", f"output_dir={run_dir}", "resume=true", key]) == 2, key
        assert f"but {key.split('=')[0]} differs" in one_line_error(capsys), key
        assert snapshot(run_dir) == before, key  # a failed resume changes nothing
    # only the folder and resume=true: every other key comes from the saved config
    assert main(["train", f"output_dir={run_dir}", "resume=true", "save_steps=3"]) == 0
    assert_same_adapter(run_dir, straight)
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step logged once
    capsys.readouterr()
    assert main(["train", f"output_dir={run_dir}", "resume=true"]) == 2  # finished: nothing to resume
    assert "finished run" in one_line_error(capsys)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog, damage):
    """Each file of the newest checkpoint in turn, truncated or deleted: resume from the older one, same result."""
    files = sorted(p.name for p in (straight / "checkpoint-6").iterdir() if p.is_file())
    assert len(files) >= 5 and "leanft_complete" in files
    for name in files:
        run_dir = tmp_path / f"{damage}-{name}"
        shutil.copytree(straight, run_dir)
        for finished in ("summary.json", "adapter"):
            path = run_dir / finished
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        target = run_dir / "checkpoint-6" / name
        if damage == "delete":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 2)])
        assert checkpoint_problem(run_dir / "checkpoint-6") is not None, name
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["train", f"output_dir={run_dir}", "resume=true"]) == 0, name
        assert "skipping checkpoint-6" in caplog.text and "resuming from" in caplog.text, name
        assert_same_adapter(run_dir, straight)


def test_one_run_per_folder_and_the_lock_dies_with_its_process(model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    with RunFolderLock(run_dir, auto_named=False):
        assert main(run_args(model_dir, data_file, run_dir)) == 2
        assert "in use by another leanft run" in one_line_error(capsys)
        handle = (run_dir / LOCK_FILE).open("a")  # what a second process sees: the lock is held
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.close()
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2")) == 0  # released: the folder is usable
    assert not (run_dir / LOCK_FILE).exists()


def test_auto_named_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = tmp_path / "runs" / "20260101-000000-paca"
    with RunFolderLock(name, auto_named=True) as first, RunFolderLock(name, auto_named=True) as second:
        assert first != second and first.is_dir() and second.is_dir()


def test_a_failed_start_leaves_no_folder_behind(model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "new"
    assert main(run_args(model_dir, data_file, run_dir, "target_modules=no_such_layer")) == 2
    assert "matched no linear layer" in one_line_error(capsys)
    assert not run_dir.exists()


def bad_train_inputs(tmp_path, model_dir, data_file) -> list[tuple[list[str], str]]:
    """(arguments of ``leanft train``, a phrase of the expected error), each refused before anything is written."""
    files = {
        "broken.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        "empty.jsonl": "\n",
        "no_output.jsonl": '{"instruction": "a"}\n',
        "list.jsonl": "[1, 2]\n",
        "broken.yaml": "r: [1,\n",
        "list.yaml": "- r\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    (tmp_path / "latin1.yaml").write_bytes("r: 8 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "no_config").mkdir()
    data = f"data={data_file}"
    return [
        ([f"model={tmp_path / 'missing'}", data], "not found"),
        ([f"model={tmp_path / 'no_config'}", data], "no config.json"),
        (["model=bad/id/with/slashes", data], "not found"),
        ([f"data={tmp_path / 'missing.jsonl'}"], "does not exist"),
        ([f"data={tmp_path / 'broken.jsonl'}"], "broken.jsonl:2"),
        ([f"data={tmp_path / 'empty.jsonl'}"], "no examples"),
        ([f"data={tmp_path / 'no_output.jsonl'}"], "no_output.jsonl:1"),
        ([f"data={tmp_path / 'list.jsonl'}"], "list.jsonl:1"),
        ([f"data={tmp_path / 'latin1.jsonl'}"], "not UTF-8"),
        ([data, f"eval_data={tmp_path / 'missing.jsonl'}"], "does not exist"),
        (["data=builtin:nope"], "builtin"),
        ([data, "colour=blue"], "unknown key 'colour'"),
        ([data, "dropbp.nonsense=1"], "unknown key 'dropbp.nonsense'"),
        ([data, "dropbp=3"], "is a group"),
        ([data, "dropbp.rate=1.5"], "dropbp.rate"),
        ([data, "dropbp.rate=-0.1"], "dropbp.rate"),
        ([data, "dropbp.rate=lots"], "dropbp.rate"),
        ([data, "dropbp.allocation=foo"], "allocation"),
        ([data, "dropbp.sampler=foo"], "sampler"),
        ([data, "dropbp.rate=0.5", "dropbp.warmup=0.7", "dropbp.cooldown=0.5"], "warmup"),
        ([data, "batch_size=3", "dropbp.rate=0.5", "dropbp.patterns_per_step=2"], "patterns_per_step"),
        ([data, "method=bogus"], "method must be one of"),
        ([data, "r=0"], "r must be >= 1"),
        ([data, "r=two"], "r="),
        ([data, "r=4096"], "exceeds the input width"),
        ([data, "target_modules=no_such_layer"], "matched no linear layer"),
        ([data, "lr=-1"], "lr must be > 0"),
        ([data, "lr=abc"], "lr="),
        ([data, "lr_scheduler=foo"], "lr_scheduler must be one of"),
        ([data, "warmup_ratio=1.5"], "warmup_ratio"),
        ([data, "weight_decay=-1"], "weight_decay"),
        ([data, "max_steps=0"], "max_steps must be >= 1"),
        ([data, "batch_size=0"], "batch_size must be >= 1"),
        ([data, "max_seq_len=0"], "max_seq_len must be >= 1"),
        ([data, "save_steps=0"], "save_steps must be >= 1"),
        ([data, "save_total_limit=0"], "save_total_limit must be >= 1"),
        ([data, "eval_steps=-1"], "eval_steps"),
        ([data, "num_eval=0"], "num_eval must be >= 1"),
        ([data, "quantize=8bit"], "quantize must be"),
        ([data, "quantize=4bit", "method=full"], "method=paca"),
        ([data, "bf16=maybe"], "bf16 must be"),
        ([data, "fsdp=true", "resume=true"], "fsdp"),
        ([data, "resume=true"], "no complete checkpoint"),
        (["broken.yaml", data], "not valid UTF-8 YAML"),
        (["list.yaml", data], "mapping"),
        (["latin1.yaml", data], "not valid UTF-8 YAML"),
        (["missing.yaml", data], "does not exist"),
        ([data, "=3"], "expected key=value"),
    ]


def test_bad_train_inputs_exit_2_with_one_line_and_write_nothing(model_dir, data_file, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = bad_train_inputs(tmp_path, model_dir, data_file)
    assert len(cases) >= 40
    for args, message in cases:
        out = tmp_path / "out"
        path, keys = (args[:1], args[1:]) if "=" not in args[0] else ([], args)
        assert main(["train", *path, f"model={model_dir}", *TINY_ARGS, *keys, f"output_dir={out}"]) == 2, args
        assert message in one_line_error(capsys), args
        assert not out.exists(), args  # nothing was written
        assert not (tmp_path / "runs").exists(), args


def test_bad_inputs_against_an_existing_run_change_nothing(model_dir, data_file, straight, unfinished, tmp_path,
                                                           capsys):
    finished = tmp_path / "finished"
    shutil.copytree(straight, finished)
    stopped = tmp_path / "stopped"
    shutil.copytree(unfinished, stopped)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (run_args(model_dir, data_file, finished), "finished run"),
        (run_args(model_dir, data_file, stopped), "not empty"),
        (run_args(model_dir, data_file, a_file), "is a file"),
        (["train", f"output_dir={stopped}", "resume=true", "seed=1"], "seed differs"),
        (["train", "resume=true"], "needs output_dir"),
        (["merge", str(finished), str(finished), "overwrite=true"], "overlaps the run folder"),
        (["merge", str(finished), str(finished / "adapter"), "overwrite=true"], "overlaps the run folder"),
        (["merge", str(stopped), str(tmp_path / "merged")], "not a finished leanft run"),
        (["eval", str(finished), "r=4"], "cannot change"),
        (["eval", str(finished), "s2ft.ffn=0.5"], "s2ft.ffn of a trained run cannot change"),
        (["eval", str(finished), "lora.alpha=4"], "lora.alpha of a trained run cannot change"),
        (["eval", str(tmp_path)], "not a leanft run folder"),
    ]
    before = {folder: snapshot(folder) for folder in (finished, stopped)}
    for args, message in cases:
        assert main(args) == 2, args
        assert message in one_line_error(capsys), args
        assert {folder: snapshot(folder) for folder in before} == before, args
    assert a_file.read_text() == "x" and not (tmp_path / "merged").exists()


def test_library_calls_with_bad_input_leave_the_model_as_it_was(tmp_path):
    def state(model) -> dict:
        return {k: v.clone() for k, v in model.state_dict().items()}

    model = tiny_model()
    original, kinds = state(model), [type(m) for m in model.modules()]
    calls = [
        (lambda: leanft.apply_paca(model, r=0), "r must be"),
        (lambda: leanft.apply_paca(model, r=4, target_modules="nothing"), "matched no"),
        (lambda: leanft.apply_paca(model, r=10_000), "exceeds"),
        (lambda: leanft.apply_dropbp(model, drop_rate=1.5), "drop_rate"),
        (lambda: leanft.save_paca(model, tmp_path / "a"), "no PaCA layers"),
        (lambda: leanft.load_paca(model, tmp_path / "missing"), "holds no"),
    ]
    for call, message in calls:
        with pytest.raises(LeanftError, match=message):
            call()
        assert [type(m) for m in model.modules()] == kinds
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    other = leanft.apply_paca(tiny_model(), r=2)
    leanft.save_paca(other, tmp_path / "r2")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    saved = tmp_path / "r2" / "paca_adapter.safetensors"
    tensors = load_file(saved)
    first = next(key for key in tensors if key.endswith("paca_weight"))
    tensors[first] = torch.zeros(tensors[first].shape[0], tensors[first].shape[1] + 1)
    save_file(tensors, str(saved))
    with pytest.raises(LeanftError, match="does not fit"):
        leanft.load_paca(model, tmp_path / "r2")  # a misfit found after applying PaCA: undone again
    assert [type(m) for m in model.modules()] == kinds
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    controller = leanft.apply_dropbp(model, drop_rate=0.5)
    with pytest.raises(LeanftError, match="already has DropBP"):
        leanft.apply_dropbp(model, drop_rate=0.5)
    controller.remove()
    leanft.apply_dropbp(model, drop_rate=0.5).remove()  # removed: attachable again


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_intact(model_dir, data_file, tmp_path, capsys):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs is not allowed here")
    try:
        run_dir = disk / "run"
        args = run_args(model_dir, data_file, run_dir, "save_steps=1", "save_total_limit=1", "eval_steps=0", "r=8")
        assert main(args) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("leanft: error: the disk holding") and "is full" in error
        assert "checkpoint-1 is intact" in error
        assert checkpoint_problem(run_dir / "checkpoint-1") is None
        assert not (run_dir / "checkpoint-2").exists()
        moved = tmp_path / "moved"
        shutil.copytree(run_dir, moved)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    assert main(["train", f"output_dir={moved}", "resume=true"]) == 0  # with space again, it resumes


def test_outputs_are_created_with_the_users_umask(straight):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for path in (straight / "summary.json", straight / "run_config.yaml", straight / "adapter" / "paca_config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE((straight / "adapter").stat().st_mode) == 0o777 & ~mask


def test_ctrl_c_before_training_says_nothing_was_saved(monkeypatch, capsys):
    from leanft.run import train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    assert main(["train", "max_steps=1"]) == 130
    assert capsys.readouterr().err.strip() == "leanft: interrupted (nothing was saved)"
