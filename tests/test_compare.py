"""`leanft compare` plumbing on a tiny model: time-to-quality, curves, table, JSON, PNG, bad input."""

from __future__ import annotations

import json
import math

import pytest

from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.run.config import load_config
from leanft.studies.compare import parse_compare_args, run_compare, variant_config
from leanft.studies.compare_report import render_table, time_to_quality

TINY = ["max_steps=4", "batch_size=4", "num_eval=4", "max_new_tokens=4", "save_steps=50", "dropbp.allocate_at=0.5"]


def curve(*points):
    return [{"step": i, "time_s": t, "heldout_loss": loss} for i, (t, loss) in enumerate(points)]


def test_time_to_quality_interpolates_the_first_crossing():
    points = curve((0.0, 2.0), (10.0, 1.5), (20.0, 0.5), (30.0, 0.4), (40.0, 0.9))
    assert time_to_quality(points, 1.0) == pytest.approx(15.0)  # halfway between 1.5 @ 10 s and 0.5 @ 20 s
    assert time_to_quality(points, 0.5) == pytest.approx(20.0)
    assert time_to_quality(points, 2.0) == 0.0
    assert time_to_quality(points, 0.3) is None


def test_variants_differ_only_in_method_and_dropbp(tmp_path):
    base = load_config(None, ["lr=3e-3", "max_steps=7", "dropbp.rate=0.25"])
    uniform = variant_config(base, "paca+dropbp-uniform", tmp_path, eval_every=2)
    allocated = variant_config(base, "lora+dropbp", tmp_path, eval_every=2)
    plain = variant_config(base, "lora", tmp_path, eval_every=2)
    assert (uniform.method, uniform.dropbp.rate, uniform.dropbp.allocate_at) == ("paca", 0.25, None)
    assert (allocated.method, allocated.dropbp.rate, allocated.dropbp.allocate_at) == ("lora", 0.25, 0.1)
    assert plain.dropbp.rate == 0.0
    assert {c.lr for c in (uniform, allocated, plain)} == {3e-3} and plain.max_steps == 7
    assert uniform.output_dir == str(tmp_path / "paca+dropbp-uniform") and uniform.eval_steps == 2


def test_a_variant_sets_its_own_dropbp_keys_after_colons(tmp_path):
    base = load_config(None, ["dropbp.rate=0.25"])
    name = "paca+dropbp-uniform:warmup=0.2:patterns_per_step=4:rate=0.5"
    config = variant_config(base, name, tmp_path, eval_every=2)
    assert (config.method, config.dropbp.warmup, config.dropbp.patterns_per_step) == ("paca", 0.2, 4)
    assert config.dropbp.rate == 0.5 and config.dropbp.allocate_at is None and base.dropbp.warmup == 0.0
    assert variant_config(base, "paca:lr=0.01", tmp_path, eval_every=2).lr == 0.01
    fp32 = variant_config(base, "lora:bf16=false:compile=true", tmp_path, eval_every=2)
    assert (fp32.method, fp32.bf16, fp32.compile) == ("lora", "false", True) and base.bf16 == "auto"
    with pytest.raises(LeanftError, match="without DropBP"):
        variant_config(base, "paca:warmup=0.2", tmp_path, eval_every=2)
    with pytest.raises(LeanftError, match="patterns_per_step"):
        variant_config(base, "paca+dropbp:patterns_per_step=3", tmp_path, eval_every=2)


def test_dropbp_variants_run_at_the_study_rate_when_train_leaves_dropbp_off(tmp_path):
    base = load_config(None, [])
    assert base.dropbp.rate == 0.0  # leanft train: DropBP is opt-in
    assert variant_config(base, "paca+dropbp", tmp_path, eval_every=2).dropbp.rate == 0.5
    assert variant_config(base, "paca", tmp_path, eval_every=2).dropbp.rate == 0.0


def test_compare_trains_each_variant_and_reports_time_to_quality(model_dir, data_file, tmp_path, capsys):
    study = tmp_path / "study"
    variants = "variants=lora,paca+dropbp,paca+dropbp-uniform"
    items = [f"model={model_dir}", f"data={data_file}", f"output_dir={study}", variants, "eval_every=2", *TINY]
    result = run_compare(items)

    rows = {row["variant"]: row for row in result["variants"]}
    assert list(rows) == ["lora", "paca+dropbp", "paca+dropbp-uniform"] and result["baseline"] == "lora"
    for name, row in rows.items():
        assert [p["step"] for p in row["curve"]] == [0, 2, 4]
        times = [p["time_s"] for p in row["curve"]]
        assert times[0] == 0.0 and times == sorted(times) and row["train_time_s"] == times[-1] > 0
        assert row["curve"][0]["heldout_loss"] == pytest.approx(result["heldout_loss_before"])
        summary = json.loads((study / name / "summary.json").read_text())
        assert row["final_heldout_loss"] == pytest.approx(summary["heldout_loss_after"], rel=1e-5)
        assert row["time_to_baseline_loss_s"] == time_to_quality(row["curve"], rows["lora"]["final_heldout_loss"])
    assert rows["lora"]["time_to_quality_ratio"] == 1.0 or rows["lora"]["time_to_baseline_loss_s"] == 0.0
    assert rows["paca+dropbp"]["dropbp_sensitivities"] is not None
    assert rows["paca+dropbp-uniform"]["dropbp_rates"] == [0.5] * 4
    assert rows["lora"]["dropbp_rates"] is None
    first = json.loads((study / "lora" / "baseline.json").read_text())
    assert set(first) == {"loss", "perplexity", "accuracy"}
    assert all(json.loads((study / n / "baseline.json").read_text()) == first for n in rows)  # evaluated once

    on_disk = json.loads((study / "compare.json").read_text())
    assert on_disk["variants"][1]["curve"] == result["variants"][1]["curve"]
    assert (study / "compare.md").read_text().strip() == render_table(result["variants"], "lora")
    assert (study / "compare_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (study / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    capsys.readouterr()  # the final held-out loss (taken from the curve) equals a fresh evaluation of the run
    assert main(["eval", str(study / "paca+dropbp")]) == 0
    fresh = json.loads(capsys.readouterr().out)["loss"]
    assert fresh == pytest.approx(rows["paca+dropbp"]["final_heldout_loss"], rel=1e-5)


def test_a_budgeted_study_sets_each_variants_steps_from_its_probe(model_dir, data_file, tmp_path):
    study = tmp_path / "study"
    items = [f"model={model_dir}", f"data={data_file}", f"output_dir={study}", "variants=lora,paca", "eval_every=5",
             "budget_s=0.6", "logging_steps=1", *TINY, "max_steps=1000"]  # the budget, not max_steps, sets the steps
    result = run_compare(items)
    assert result["settings"]["budget_s"] == 0.6
    for row in result["variants"]:
        assert row["probe_s_per_step"] > 0 and (study / "probes" / row["variant"] / "summary.json").is_file()
        assert row["steps"] == max(1, int(0.6 / row["probe_s_per_step"])) < 1000
        metrics = [json.loads(line) for line in (study / row["variant"] / "metrics.jsonl").read_text().splitlines()]
        rates = [m["learning_rate"] for m in metrics if "learning_rate" in m]
        steps, warmup = row["steps"], round(0.05 * row["steps"])  # the cosine's length is the budgeted steps
        last = 0.5 * (1 + math.cos(math.pi * (steps - 1 - warmup) / (steps - warmup))) if steps > 1 + warmup else None
        assert len(rates) == steps and (last is None or rates[-1] == pytest.approx(row["lr"] * last))
        assert row["curve"][-1]["step"] == row["steps"]


def test_table_has_a_row_per_variant_and_dashes_where_not_reached():
    rows = [
        {"variant": v, "lr": 1e-3, "steps": 4, "train_time_s": 8.0, "final_heldout_loss": 0.5, "accuracy": 0.25,
         "time_to_baseline_loss_s": t, "time_to_quality_ratio": r}
        for v, t, r in (("lora", 8.0, 1.0), ("paca", None, None))
    ]
    lines = render_table(rows, "lora").splitlines()
    assert len(lines) == 4 and "time to lora's final loss" in lines[0]
    assert lines[2].split("|")[1].strip() == "lora" and "1.00x" in lines[2] and "25.0%" in lines[2]
    assert lines[3].rstrip(" |").endswith("–")


@pytest.mark.parametrize(
    "items, message",
    [
        (["variants=lora,qlora"], "unknown variant"),
        (["variants=lora,lora"], "twice"),
        (["eval_every=0"], "eval_every"),
        (["budget_s=0"], "budget_s"),
        (["dropbp.allocate_at=null", "variants=lora,paca+dropbp"], "allocate_at"),
    ],
)
def test_bad_compare_input_is_one_clear_error(items, message, tmp_path, capsys):
    assert main(["compare", f"output_dir={tmp_path / 'study'}", *items]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "study").exists()


def test_a_finished_study_is_not_overwritten(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "compare.json").write_text("{}")
    assert main(["compare", f"output_dir={study}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (study / "compare.json").read_text() == "{}"


def test_parse_keeps_train_keys_for_the_shared_config():
    options, path, overrides = parse_compare_args(["cfg.yaml", "variants= lora , paca", "lr=1e-3", "eval_every=3"])
    assert (options.variants, options.eval_every, path, overrides) == ("lora,paca", 3, "cfg.yaml", ["lr=1e-3"])
    with pytest.raises(LeanftError):
        parse_compare_args(["variants="])


def test_turns_go_round_in_order_and_skip_finished_processes():
    import multiprocessing
    import threading

    from leanft.studies.interleave import Turns

    turns, taken, steps = Turns(multiprocessing.get_context("spawn"), 3), [], {0: 3, 1: 1, 2: 2}

    def worker(index):
        turns.wait(index)
        for step in range(steps[index]):
            if step:
                turns.pass_on(index)
                turns.wait(index)
            taken.append((index, step))
        turns.finish(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (2, 0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert taken == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]  # one step each in turn; 1 is done after one


def test_interleaved_variants_train_as_they_do_one_after_another(model_dir, data_file, tmp_path):
    import time

    shared = [f"model={model_dir}", f"data={data_file}", "variants=lora,paca", "eval_every=2", *TINY]
    alone = run_compare([*shared, f"output_dir={tmp_path / 'alone'}"])
    began = time.perf_counter()
    turns = run_compare([*shared, f"output_dir={tmp_path / 'turns'}", "interleave=true"])
    wall = time.perf_counter() - began
    assert turns["settings"]["interleave"] is True
    for one, other in zip(alone["variants"], turns["variants"], strict=True):
        assert [p["heldout_loss"] for p in one["curve"]] == pytest.approx([p["heldout_loss"] for p in other["curve"]])
    assert sum(row["train_time_s"] for row in turns["variants"]) < wall  # waiting for a turn is not training time
    baseline = json.loads((tmp_path / "turns" / "lora" / "baseline.json").read_text())
    assert json.loads((tmp_path / "turns" / "paca" / "baseline.json").read_text()) == baseline


def test_an_interleaved_budgeted_study_probes_each_variant_first(model_dir, data_file, tmp_path):
    study = tmp_path / "study"
    items = [f"model={model_dir}", f"data={data_file}", f"output_dir={study}", "variants=lora,paca", "eval_every=5",
             "budget_s=0.6", "interleave=true", *TINY, "max_steps=1000"]
    result = run_compare(items)
    assert result["settings"]["interleave"] is True
    for row in result["variants"]:
        assert (study / "probes" / row["variant"] / "summary.json").is_file()
        assert row["probe_s_per_step"] > 0 and row["steps"] == max(1, int(0.6 / row["probe_s_per_step"])) < 1000
        assert row["curve"][-1]["step"] == row["steps"]
