"""End-to-end `leanft` commands on a tiny random model and tiny data: artifacts, resume, merge, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from leanft.cli import main
from leanft.run.config import load_config
from leanft.run.rundir import load_run
from leanft.run.train import train

TINY_ARGS = ["max_steps=6", "batch_size=4", "save_steps=3", "num_eval=4", "max_new_tokens=6", "logging_steps=1"]


def run_args(model_dir, data_file, run_dir, *extra):
    return ["train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}", *TINY_ARGS, *extra]


def test_train_writes_every_artifact(model_dir, data_file, tmp_path):
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "dropbp.rate=0.5", "dropbp.allocate_at=0.34")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["steps"] == 6 and summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["dropbp_rates"] and summary["dropbp_rates"] != [0.5] * 4  # allocation ran at step 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(load_file(run_dir / "adapter" / "paca_adapter.safetensors"))
    assert (run_dir / "checkpoint-6" / "leanft_complete").is_file()
    assert load_config(run_dir / "run_config.yaml").method == "paca"


class InterruptAt(TrainerCallback):
    """Sends this process SIGINT while optimizer step ``step`` runs, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            signal.raise_signal(signal.SIGINT)


RESUMED_DROPBP = {
    "allocated": ("dropbp.rate=0.5", "dropbp.allocate_at=0.34"),
    "bf16": ("bf16=true", "dropbp.rate=0.5", "dropbp.allocate_at=0.34"),  # a bf16 base, fp32 columns
    "apollo": ("optimizer=apollo-mini", "dropbp.rate=0.5", "dropbp.allocate_at=0.34"),  # its projection resumes too
    # interrupted inside the schedule's dropping phase, patterns per micro-batch, the authors' sampler and rule
    "scheduled": (
        "dropbp.rate=0.5", "dropbp.allocate_at=0.34", "dropbp.warmup=0.34", "dropbp.cooldown=0.17",
        "dropbp.patterns_per_step=2", "dropbp.sampler=topup", "dropbp.allocation=official",
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(RESUMED_DROPBP))
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(model_dir, data_file, tmp_path, variant):
    extra = RESUMED_DROPBP[variant]
    assert main(run_args(model_dir, data_file, tmp_path / "straight", *extra)) == 0
    interrupted = load_config(None, run_args(model_dir, data_file, tmp_path / "resumed", *extra)[1:])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[InterruptAt(4)])
    assert (tmp_path / "resumed" / "checkpoint-4" / "leanft_complete").is_file()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    assert main(run_args(model_dir, data_file, tmp_path / "resumed", *extra, "resume=true")) == 0

    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["dropbp_rates"] == straight["dropbp_rates"] and resumed["steps"] == 6
    assert resumed["dropbp_skipped_share"] == pytest.approx(straight["dropbp_skipped_share"])
    assert 0 < straight["dropbp_skipped_share"] < 1
    expected = load_file(tmp_path / "straight" / "adapter" / "paca_adapter.safetensors")
    actual = load_file(tmp_path / "resumed" / "adapter" / "paca_adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["paca", "lora", "s2ft"])
def test_merge_output_loads_in_plain_transformers_with_the_same_logits(model_dir, data_file, tmp_path, method):
    run_dir = tmp_path / "run"
    keys = (f"method={method}", "lr=0.01", "dropbp.rate=0.25", "bf16=false")  # bf16 merge: test_precision
    assert main(run_args(model_dir, data_file, run_dir, *keys)) == 0
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    tuned, _, _ = load_run(run_dir)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        expected = tuned.eval()(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, expected)


def test_eval_and_generate_on_a_run(model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2", "method=full")) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss"] > 0 and report["perplexity"] > 1 and 0.0 <= report["accuracy"] <= 1.0
    assert main(["generate", str(run_dir), "Add one to 3.", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "num_eval=1"]) == 0  # evaluation keys apply to the saved config
    assert json.loads(capsys.readouterr().out)["num_eval"] == 1
    assert main(["eval", str(run_dir), "method=lora"]) == 2  # keys that fix the trained model do not
    assert "method of a trained run cannot change" in one_line_error(capsys)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanft: error: "), err
    return err[0]


def test_bad_inputs_exit_2_with_one_line(model_dir, data_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        ([f"model={tmp_path / 'missing'}", f"data={data_file}"], "not found"),
        ([f"model={model_dir}", f"data={tmp_path / 'missing.jsonl'}"], "does not exist"),
        ([f"model={model_dir}", f"data={bad}"], "bad.jsonl:2"),
        ([f"model={model_dir}", f"data={empty}"], "no examples"),
        ([f"model={model_dir}", "colour=blue"], "unknown key 'colour'"),
        ([f"model={model_dir}", "dropbp.rate=1.5"], "dropbp.rate"),
        ([f"model={model_dir}", "method=s2ft", "s2ft.ffn=0"], "method=s2ft trains nothing"),
        ([f"model={model_dir}", "s2ft.heads=2"], "s2ft.ffn and s2ft.heads must be in [0, 1]"),
        ([f"model={model_dir}", "lora.rank=2"], "unknown key 'lora.rank'"),
    ]
    for args, message in cases:
        assert main(["train", *args, f"output_dir={tmp_path / 'out'}"]) == 2, args
        assert message in one_line_error(capsys)


def test_a_finished_run_is_never_overwritten_without_overwrite(model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2")) == 0
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2")) == 2
    assert "overwrite=true" in one_line_error(capsys)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    for extra in ([], ["overwrite=true"]):  # merging a run into its own folder would replace the run
        assert main(["merge", str(run_dir), str(run_dir), *extra]) == 2
        assert "overlaps the run folder" in one_line_error(capsys)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2", "overwrite=true")) == 0


BAD_STUDY_OPTIONS = [
    (["bench", "max_len_methods=bogus"], "max_len_methods"),
    (["bench", "mem_budget=2XB"], "mem_budget"),
    (["bench", "variants=bogus"], "unknown variant"),
    (["bench", "bases=lora"], "bench's bases= is now variants="),
    (["bench", "variants=lora,paca+dropbp"], "use paca+dropbp-uniform"),
    (["bench", "variants=paca+dropbp-uniform:patterns_per_step=2"], "take only a rate="),
    (["bench", "rates=2"], "rates must be"),
    (["bench", "rounds=-1"], "rounds must be"),
    (["bench", "batch_size=0"], "batch_size must be"),
    (["bench", "batch=4"], "bench's batch= is now batch_size="),
    (["bench", "bf16=int8"], "bf16 must be"),
    (["bench", "device=tpu"], "device must be"),
    (["bench", "quick=maybe"], "quick="),
    (["bench", "colour=blue"], "unknown key 'colour': see `leanft train --help`"),
    (["bench", "--quick"], "takes key=value options, e.g. quick=..."),
    (["bench", "variants=full:optimizer=lion"], "optimizer must be one of adamw, apollo, apollo-mini"),
    (["bench", "variants=s2ft,bogus"], "unknown variant"),
    (["compare", "variants=bogus"], "unknown variant"),
    (["compare", "variants=lora,lora"], "twice"),
    (["compare", "eval_every=0"], "eval_every must be"),
    (["compare", "eval_every=often"], "eval_every="),
    (["compare", "variants=lora:lr=x"], "lr="),
    (["compare", "variants=lora:warmup=0.2"], "without DropBP"),
    (["compare", "variants=lora,full:optimizer=lion"], "optimizer must be one of"),
    (["compare", "variants=lora,s2ft:ffn=0"], "method=s2ft trains nothing"),
    (["compare", "colour=blue"], "unknown key 'colour': see `leanft train --help`"),
]


@pytest.mark.parametrize(("args", "message"), BAD_STUDY_OPTIONS)
def test_bad_bench_and_compare_options_are_refused_before_any_work(args, message, monkeypatch, tmp_path, capsys):
    import time

    from leanft.run import models
    from leanft.studies import bench

    def never(*_, **__):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(models, "load_model", never)
    monkeypatch.setattr(bench, "Worker", never)
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - started < 2.0
    assert message in one_line_error(capsys)
    assert not any(tmp_path.iterdir())  # nothing written


def test_report_to_tensorboard_logs_leanfts_metrics(model_dir, data_file, tmp_path, capsys):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "report_to=tensorboard", "dropbp.rate=0.5")) == 0
    events = sorted((run_dir / "runs").rglob("events.out.tfevents.*"))
    assert events
    reader = accumulator.EventAccumulator(str(events[0].parent))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_s", "train/dropbp_skipped_share", "train/dropbp_mean_rate"} <= tags
    shares = [event.value for event in reader.Scalars("train/dropbp_skipped_share")]
    assert len(shares) == 6 and 0 < shares[-1] < 1
    capsys.readouterr()
    assert main(run_args(model_dir, data_file, tmp_path / "other", "report_to=mlflow")) == 2
    assert "report_to must be null (none) or one of" in one_line_error(capsys)


def test_help_and_bad_options_answer_without_importing_torch_transformers_or_peft():
    code = (
        "import sys\nfrom leanft.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['export', '--help'], ['bench', '--help'],\n"
        "             ['compare', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "codes = [main(['train', 'method=nope']), main(['train', 'max_steps=abc']), main(['train', '--foo']),\n"
        "         main(['export', 'run', 'out', 'format=onnx']), main(['merge', 'run', 'out', '--dtype', 'bf16'])]\n"
        "print(codes, [name for name in ('torch', 'transformers', 'peft') if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2, 2] []", result.stderr[-2000:]
    assert "method must be one of" in result.stderr and "max_steps" in result.stderr
    assert "uniform_rank" in result.stdout and "format must be one of" in result.stderr  # export's keys, checked
    assert "untimed_steps" in result.stdout and "budget_s" in result.stdout  # bench's and compare's keys
    assert "dtype=bf16" in result.stderr  # merge's old flag, answered with the new spelling
