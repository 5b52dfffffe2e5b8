"""The benchmark's own logic: ratios, the DropBP cost model, the length search, peaks measured in fresh processes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanft.core.errors import LeanftError
from leanft.studies import bench, bench_report
from leanft.studies.bench_options import BenchPlan, parse_bench_options, parse_bytes
from leanft.studies.bench_report import Method, build_methods, render_table, summarize
from leanft.studies.bench_worker import current_bytes, peak_bytes, reset_peak

MIB = bench_report.MIB
D = "+dropbp-uniform:rate=0.5"  # the uniform-DropBP rows' key suffix


def steps(*seconds: float, dropped: float = 0.0) -> list[dict]:
    return [{"seconds": s, "dropped": dropped} for s in seconds]


def test_methods_keys_labels_and_order():
    methods = build_methods(["lora", "paca"], [0.5])
    assert [m.key for m in methods] == ["lora", "paca", f"lora{D}", f"paca{D}", "lora+floor", "paca+floor"]
    assert methods[0].label == "peft LoRA (baseline)" and methods[3].label == "PaCA + DropBP 0.5"
    assert [m.uses_dropbp for m in methods] == [False, False, True, True, True, True]
    assert build_methods(["full"], []) == [Method("full")]
    assert bench_report.parse_method_keys("paca, lora", methods) == [Method("paca"), Method("lora")]
    assert bench_report.parse_method_keys("off", methods) == []
    with pytest.raises(ValueError, match="unknown method"):
        bench_report.parse_method_keys("paca+dropbp-uniform:rate=0.3", methods)


def test_ratios_are_medians_of_per_round_ratios():
    # round 2 ran under load for both methods: its ratio is still 0.5
    assert bench_report.paired_ratio([2.0, 8.0, 2.5], [4.0, 16.0, 4.0]) == pytest.approx(0.5)
    assert bench_report.paired_ratio([], []) is None
    assert bench_report.ratio(3.0, 4.0) == 0.75
    assert bench_report.ratio(None, 4.0) is None and bench_report.ratio(3.0, 0.0) is None


def test_cost_model_interpolates_between_no_drop_and_floor():
    assert bench_report.interpolated_time(10.0, 2.0, 0.0) == 10.0
    assert bench_report.interpolated_time(10.0, 2.0, 1.0) == 2.0
    assert bench_report.interpolated_time(10.0, 2.0, 0.25) == 8.0
    on_line = [{"seconds": 8.0, "dropped": 0.25}, {"seconds": 4.0, "dropped": 0.75}]
    assert bench_report.interpolation_ratio(on_line, steps(10.0, 10.0), steps(2.0, 2.0)) == pytest.approx(1.0)
    slow = [{"seconds": 6.6, "dropped": 0.5}]
    assert bench_report.interpolation_ratio(slow, steps(10.0), steps(2.0)) == pytest.approx(1.1)


def fake_measurements():
    methods = build_methods(["lora", "paca"], [0.5])
    timing = {
        "lora": steps(10.0, 20.0, 10.0),
        "paca": steps(6.0, 12.0, 7.0),
        f"lora{D}": steps(6.0, 12.0, 6.0, dropped=0.5),
        f"paca{D}": steps(4.0, 8.0, 4.0, dropped=0.5),
        "lora+floor": steps(2.0, 4.0, 2.0, dropped=1.0),
        "paca+floor": steps(2.0, 4.0, 2.0, dropped=1.0),
    }
    memory = {
        key: {"peak": peak * MIB, "train_peak": peak * MIB // 2, "saved": 10 * MIB, "dropped": 0.5}
        for key, peak in zip([m.key for m in methods], [1000, 800, 900, 700, 600, 500], strict=True)
    }
    max_len = {"lora": {"max_len": 256}, f"paca{D}": {"max_len": 416}}
    return methods, timing, memory, max_len


def test_summary_rows_against_lora():
    rows = {row["key"]: row for row in summarize(*fake_measurements(), tokens_per_step=1000)}
    assert rows["lora"]["time_ratio"] == 1.0 and rows["lora"]["step_s"] == 10.0
    assert rows["paca"]["time_ratio"] == pytest.approx(0.6) and rows["paca"]["tokens_per_s"] == pytest.approx(1000 / 7)
    assert rows[f"paca{D}"]["time_ratio"] == pytest.approx(0.4)
    assert rows[f"lora{D}"]["vs_interp"] == pytest.approx(1.0)  # 6 s = halfway between 10 and 2
    assert rows[f"paca{D}"]["vs_interp"] == pytest.approx(4.0 / 4.0)
    assert rows["paca"]["vs_interp"] is None and rows["paca+floor"]["vs_interp"] is None
    assert rows[f"paca{D}"]["peak_ratio"] == pytest.approx(0.7)
    assert rows[f"paca{D}"]["len_ratio"] == pytest.approx(416 / 256)
    assert rows["paca"]["max_len"] is None and rows["paca"]["len_ratio"] is None


def test_table_has_a_row_per_method_and_dashes_for_missing_figures():
    rows = summarize(*fake_measurements(), tokens_per_step=1000)
    rows[1]["peak"] = None
    lines = render_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["method", "step (s)", "tokens/s", "time × LoRA"] and "len × LoRA" in header
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["peft LoRA (baseline)"][1:4] == ["10.000", "100", "1.00x"]
    assert cells["PaCA + DropBP 0.5"][header.index("len × LoRA")] == "1.62x"
    assert cells["PaCA + DropBP 0.5"][header.index("dropped")] == "0.50"
    assert cells["PaCA"][header.index("peak (MiB)")] == "–" and cells["PaCA"][header.index("dropped")] == "–"
    assert cells["PaCA floor (all dropped)"][header.index("vs interp.")] == "–"


@pytest.mark.parametrize("limit", [0, 7, 8, 100, 257, 1000, 4095, 4096, 5000])
@pytest.mark.parametrize("guess", [1, 256, 3000, 10_000])
def test_length_search_finds_the_largest_fitting_multiple(limit, guess):
    calls = []

    def fits(length: int) -> bool:
        calls.append(length)
        return length <= limit

    found, probes = bench.max_fitting_length(fits, guess=guess, step=8, cap=4096)
    assert found == min(limit // 8 * 8, 4096)
    assert len(calls) == len(set(calls)) == len(probes)  # never probes a length twice
    assert all(length % 8 == 0 and 8 <= length <= 4096 for length in calls)
    assert len(calls) <= 2 * math.ceil(math.log2(4096 / 8)) + 2


def test_length_search_with_a_good_guess_needs_few_probes():
    found, probes = bench.max_fitting_length(lambda n: n <= 500, guess=480, step=32, cap=8192)
    assert found == 480 and len(probes) <= 4


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 1024**3
    assert parse_bytes("1500MiB") == 1500 * MIB
    assert parse_bytes("3e9") == 3_000_000_000
    for bad in ("lots", "2XB", "0GB", "1.2.3GB"):
        with pytest.raises(LeanftError, match="mem_budget"):
            parse_bytes(bad)


def test_peak_window_sees_an_allocation_and_resets():
    reset_peak("cpu")
    before = current_bytes("cpu")
    block = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    del block
    assert peak_bytes("cpu") >= before + 60 * MIB
    reset_peak("cpu")
    assert peak_bytes("cpu") < before + 32 * MIB


def tiny_args(**overrides) -> BenchPlan:
    return parse_bench_options(["quick=true", "device=cpu", *(f"{key}={value}" for key, value in overrides.items())])


def test_peaks_are_measured_per_fresh_process_and_grow_with_the_batch():
    context = bench.worker_context()
    big, one = tiny_args(batch_size=16, chunked_loss="false"), tiny_args(batch_size=1, chunked_loss="false")
    large = bench.measure_memory(context, big, Method("lora"), seq_len=128)
    small = bench.measure_memory(context, one, Method("lora"), seq_len=128)
    # logits alone are 16 x 128 x 4096 floats = 32 MiB; a shared process would report the same peak twice
    assert large["train_peak"] > small["train_peak"] + 16 * MIB
    assert large["peak"] > small["peak"] + 16 * MIB
    for result in (large, small):
        assert 0 < result["train_peak"] < result["peak"] < result["process_peak"]
        assert result["saved"] > 0 and result["setup"] > 0
    dropped = bench.measure_memory(context, big, Method("lora", floor=True), seq_len=128)
    assert dropped["saved"] == 0 and dropped["dropped"] == 1.0


def test_quick_run_end_to_end(tmp_path, capsys):
    plan = parse_bench_options([
        "quick=true", "device=cpu", "variants=lora,paca", "rates=0.5", "rounds=2", f"max_len_methods=paca{D}",
        "len_step=64", f"out={tmp_path}", "bf16=true",
    ])
    lines = []
    assert bench.run_bench(plan, progress=lines.append) == 0
    table = capsys.readouterr().out
    assert "| PaCA + DropBP 0.5 |" in table and "issue" not in table.lower()
    assert "time × LoRA fp32" in table and "float32 (transformers' default)" in table
    assert any(line.startswith("[memory 7/7] PaCA floor") for line in lines)
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {"lora:bf16=false", "lora", "paca", f"lora{D}", f"paca{D}", "lora+floor", "paca+floor"}
    assert all(len(report["timing"][key]) == 2 for key in rows)
    assert rows["lora"]["time_ratio"] == 1.0 and rows["paca+floor"]["dropped"] == 1.0
    assert rows["lora:bf16=false"]["time_vs_peer"] == 1.0 and rows["paca"]["time_vs_peer"] > 0
    assert rows["lora:bf16=false"]["peak"] > 0 and rows["paca"]["peak_vs_peer"] > 0
    assert rows[f"paca{D}"]["max_len"] > 0 and rows["lora"]["max_len"] is None
    assert (tmp_path / "bench_time_memory.png").stat().st_size > 0 and (tmp_path / "bench_throughput.png").exists()


def test_the_bench_dtype_follows_the_hardware_as_train_does_and_the_fp32_peer_joins_a_16_bit_bench():
    from leanft.core.precision import bf16_supported

    plan = parse_bench_options(["quick=true", "device=cpu", "variants=lora,paca"])
    assert plan.dtype == ("bfloat16" if bf16_supported("cpu") else "float32")
    assert [m.key for m in parse_bench_options(["device=cpu", "bf16=true"]).methods][:2] == [
        "lora:bf16=false", "lora"]
    assert "lora:bf16=false" not in [m.key for m in parse_bench_options(["device=cpu", "bf16=false"]).methods]
    assert "lora:bf16=false" not in [m.key for m in parse_bench_options(["bf16=true", "peer=false"]).methods]


def test_compile_reaches_every_worker_case():
    assert parse_bench_options(["quick=true", "compile=true"]).case.config.compile is True
    assert parse_bench_options(["quick=true"]).case.config.compile is False


def test_the_length_search_can_be_turned_off():
    assert parse_bench_options(["quick=true", "max_len_methods=off"]).max_len_methods == []
    assert parse_bench_options(["quick=true"]).max_len_methods  # the default searches


def test_other_optimizers_add_rows_and_their_state_memory_is_measured(tmp_path, capsys):
    methods = build_methods(["full", "full:optimizer=apollo"], [0.5])
    assert [m.key for m in methods] == [
        "full", "full:optimizer=apollo", f"full{D}", "full+dropbp-uniform:optimizer=apollo:rate=0.5",
        "full+floor", "full+floor:optimizer=apollo"]
    assert methods[3].label == "full FT + APOLLO + DropBP 0.5" and methods[3].worker == "full:optimizer=apollo"
    with pytest.raises(LeanftError, match="optimizer must be one of"):
        parse_bench_options(["quick=true", "variants=full:optimizer=sgd"])
    plan = parse_bench_options([
        "quick=true", "device=cpu", "variants=full,s2ft,full:optimizer=apollo,s2ft:optimizer=apollo", "rates=0.5",
        "rounds=1",
        "max_len_methods=off", f"out={tmp_path}", "plots=false",
    ])
    assert bench.run_bench(plan, progress=lambda line: None) == 0
    assert "optimizer state (MiB)" in capsys.readouterr().out
    rows = {row["key"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    apollo_dropbp = "full+dropbp-uniform:optimizer=apollo:rate=0.5"
    assert {"s2ft", "full:optimizer=apollo", apollo_dropbp, "s2ft:optimizer=apollo"} <= set(rows)
    # AdamW keeps two fp32 moments of every weight; APOLLO keeps them only in a rank-128 projection
    adamw, apollo = rows["full"]["optimizer_state"], rows["full:optimizer=apollo"]["optimizer_state"]
    assert 0 < apollo < 0.9 * adamw
    assert rows[apollo_dropbp]["step_s"] > 0 and rows["s2ft"]["optimizer_state"] < 0.1 * adamw


def test_a_bench_on_real_data_times_the_same_examples_padded_and_padding_free(tmp_path, capsys, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat: " + "word " * (1 + 7 * (i % 5)), "output": "ok"})
                            + "\n" for i in range(24)))
    plan = parse_bench_options([
        f"model={model_dir}", f"data={data}", f"eval_data={data}", "device=cpu", "threads=1", "batch_size=4",
        "max_seq_len=64", "variants=paca:padding_free=false,paca,lora", "rates=", "rounds=3", "untimed_steps=1",
        "max_len_methods=off", f"out={tmp_path / 'out'}", "plots=false", "bf16=false",
    ])
    assert bench.run_bench(plan, progress=lambda line: None) == 0
    table = capsys.readouterr().out
    assert "tokens/s × first row" in table and f"examples of {data}" in table
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    padded, free = report["timing"]["paca:padding_free=false"], report["timing"]["paca"]
    assert [step["tokens"] for step in padded] == [step["tokens"] for step in free]  # the same examples per round
    assert len({step["tokens"] for step in free}) > 1  # each round its own batch of the data
    assert all(step["computed"] == step["tokens"] for step in free)
    assert all(step["computed"] >= step["tokens"] for step in padded) and rows["paca:padding_free=false"]["padding"] > 0
    assert rows["paca"]["padding"] == 0 and rows["paca:padding_free=false"]["speed_vs_first"] == 1.0
    assert rows["lora"]["speed_vs_first"] > 0 and rows["lora"]["tokens_per_s"] > 0


def test_a_bench_on_real_data_needs_a_model_with_a_tokenizer(data_file):
    with pytest.raises(LeanftError, match="needs a model with a tokenizer"):
        parse_bench_options(["quick=true", f"data={data_file}"])
