"""``leanft export``: PaCA / S2FT as an exact peft LoRA adapter (three architectures, one of them GPT-2's Conv1D),
a LoRA run's adapter as trained, format=hf as ``leanft merge``, and bad input refused in one line before any load
(``tests/test_cli.py`` checks that its help and bad options answer without importing torch)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_batch, tiny_model
from safetensors.torch import load_file, save_file
from test_cli import one_line_error, run_args
from transformers import AutoModelForCausalLM

import leanft
from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.core.paca_lora import lora_factors
from leanft.run.peft_adapter import paca_lora_form, write_adapter

EXACT = 1e-4  # max abs logit difference allowed between the adapter on the base and the merged model (fp32)


def train_a_little(model: torch.nn.Module, steps: int = 3, lr: float = 0.05) -> torch.nn.Module:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = tiny_batch(seed=9)
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def assert_adapter_is_exact(model, base, reload_base, folder, uniform_rank: bool = False) -> dict:
    """Write ``model``'s PaCA layers as a peft adapter into ``folder``; peft's model on a fresh base (and peft's own
    merge of it) must give the logits of leanft's merged model. Returns the written adapter config."""
    config, tensors = paca_lora_form(model, uniform_rank=uniform_rank)
    folder.mkdir()
    write_adapter(folder, config, tensors, torch.float32)
    expected = logits(leanft.merge_paca(copy.deepcopy(model)))
    assert not torch.allclose(logits(base), expected, atol=1e-3)  # the update is not nothing
    loaded = peft.PeftModel.from_pretrained(reload_base(), str(folder))
    assert (logits(loaded) - expected).abs().max() <= EXACT
    assert (logits(loaded.merge_and_unload()) - expected).abs().max() <= EXACT  # fan_in_fan_out right for Conv1D
    return json.loads((folder / "adapter_config.json").read_text())


def test_lora_factors_are_the_column_update_and_padding_changes_nothing():
    index = torch.tensor([1, 4])
    trained, original = torch.randn(3, 2), torch.randn(3, 2)
    a, b = lora_factors(index, trained, original, in_features=6)
    expected = torch.zeros(3, 6)
    expected[:, index] = trained - original
    assert torch.equal(b @ a, expected) and torch.equal(a.sum(1), torch.ones(2))
    padded_a, padded_b = lora_factors(index, trained, original, in_features=6, rank=5)
    assert padded_a.shape == (5, 6) and padded_b.shape == (3, 5) and torch.equal(padded_b @ padded_a, expected)
    with pytest.raises(LeanftError, match="rank 1 is below the 2 trained columns"):
        lora_factors(index, trained, original, in_features=6, rank=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_paca_as_a_peft_adapter_gives_the_merged_logits(arch, tmp_path):
    model = train_a_little(leanft.apply_paca(tiny_model(arch), r=4, seed=1))
    config = assert_adapter_is_exact(model, tiny_model(arch), lambda: tiny_model(arch), tmp_path / "adapter")
    assert config["r"] == config["lora_alpha"] == 4 and not config["rank_pattern"]
    assert sorted(config["target_modules"]) == sorted(leanft.paca_modules(model))  # exact names
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = next(iter(leanft.paca_modules(model)))
    assert keys[f"base_model.model.{name}.lora_A.weight"].shape[0] == 4


S2FT_SHARES = {"llama": (0.3, 0.5), "gpt2": (0.3, 0.5), "phi3": (0.3, 0.5)}  # (ffn, heads)


@pytest.mark.parametrize("arch", sorted(S2FT_SHARES))
@pytest.mark.parametrize("uniform_rank", [False, True])
def test_s2ft_with_per_layer_counts_as_a_peft_adapter_gives_the_merged_logits(arch, uniform_rank, tmp_path):
    ffn, heads = S2FT_SHARES[arch]
    model = train_a_little(leanft.apply_s2ft(tiny_model(arch), ffn=ffn, heads=heads, seed=2), lr=0.5)
    counts = {name: layer.r for name, layer in leanft.paca_modules(model).items()}
    assert len(set(counts.values())) > 1  # layers train different numbers of columns
    config = assert_adapter_is_exact(model, tiny_model(arch), lambda: tiny_model(arch), tmp_path / "adapter",
                                     uniform_rank=uniform_rank)
    assert sorted(config["target_modules"]) == sorted(counts)  # the layers without a column are left out
    top = max(counts.values())
    assert config["r"] == config["lora_alpha"] == top
    if uniform_rank:
        assert not config["rank_pattern"] and not config["alpha_pattern"]
    else:
        expected = {name: count for name, count in counts.items() if count != top}
        assert config["rank_pattern"] == config["alpha_pattern"] == expected and expected


def test_a_trained_bias_is_refused_in_one_line():
    model = leanft.apply_paca(tiny_model("opt"), r=2, train_bias=True)
    with pytest.raises(LeanftError, match="trains its bias, which a LoRA adapter cannot hold"):
        paca_lora_form(model)
    with pytest.raises(LeanftError, match="no PaCA layers"):
        paca_lora_form(tiny_model("llama"))


def test_qpaca_as_a_peft_adapter_on_the_4bit_base_gives_the_trained_logits(tmp_path, one_thread):
    pytest.importorskip("bitsandbytes")
    from test_quant import quantized_pair

    from leanft.core.quant import keep_4bit_layout

    quantized, reference = quantized_pair("llama", tmp_path / "base")
    model = train_a_little(leanft.apply_paca(quantized, r=4, seed=1), lr=0.5)
    expected = logits(model)
    assert not torch.allclose(logits(reference), expected, atol=1e-3)
    config, tensors = paca_lora_form(model)
    write_adapter(tmp_path / "adapter", config, tensors, torch.float32)
    base = keep_4bit_layout(quantized_pair("llama", tmp_path / "again")[0])
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert (logits(loaded) - expected).abs().max() <= EXACT


# --------------------------------------------------------------------------- the command line

QUICK = ("max_steps=2", "lr=0.02", "bf16=false", "num_eval=2", "max_new_tokens=2")


@pytest.fixture(scope="module")
def runs(model_dir, data_file, tmp_path_factory):
    """A finished tiny run per method, trained on first use."""
    done = {}

    def run(method: str):
        if method not in done:
            folder = tmp_path_factory.mktemp(f"run-{method}") / "run"
            assert main(run_args(model_dir, data_file, folder, f"method={method}", *QUICK)) == 0
            done[method] = folder
        return done[method]

    return run


@pytest.mark.parametrize("method", ["paca", "s2ft", "lora"])
def test_export_peft_lora_loads_in_peft_with_the_merged_models_logits(method, runs, model_dir, tmp_path, capsys):
    run_dir = runs(method)
    assert main(["export", str(run_dir), str(tmp_path / "adapter"), "format=peft-lora"]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0  # format=hf, the default
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "adapter"))
    expected = logits(merged)
    assert (logits(loaded) - expected).abs().max() <= EXACT
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(model_dir)), expected, atol=1e-3)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(model_dir)


def test_export_format_hf_writes_what_merge_writes(runs, tmp_path):
    run_dir = runs("paca")
    assert main(["export", str(run_dir), str(tmp_path / "exported"), "format=hf", "dtype=bfloat16"]) == 0
    assert main(["merge", str(run_dir), str(tmp_path / "merged"), "dtype=bfloat16"]) == 0
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "exported").iterdir()) and "model.safetensors" in names
    exported, merged = (load_file(tmp_path / name / "model.safetensors") for name in ("exported", "merged"))
    assert exported.keys() == merged.keys() and all(torch.equal(exported[k], merged[k]) for k in merged)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}


def test_export_peft_lora_in_bfloat16_and_the_overwrite_rule(runs, tmp_path, capsys):
    run_dir, out = runs("paca"), tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), str(out), "format=peft-lora"]) == 2
    assert "not empty: pass overwrite=true" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(run_dir), str(out), "format=peft-lora", "dtype=bfloat16", "overwrite=true"]) == 0
    assert not (out / "keep.txt").exists()
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_export_gguf_loads_in_transformers_with_the_merged_models_logits(runs, model_dir, tmp_path, capsys):
    """OUT.gguf picks format=gguf: the file, loaded back by transformers' GGUF loader, gives the merged model's
    logits to f16 rounding, and an Ollama Modelfile names it; the overwrite rule holds for both files."""
    run_dir, out = runs("paca"), tmp_path / "gguf" / "tuned.gguf"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "GGUF file (f16)" in capsys.readouterr().out
    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
    expected = logits(merged)
    assert (logits(loaded) - expected).abs().max() <= 2e-3 * expected.abs().max()
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(model_dir)), expected, atol=1e-3)
    assert "FROM ./tuned.gguf" in (out.parent / "Modelfile").read_text()
    before = out.read_bytes()
    capsys.readouterr()  # the GGUF loader's progress bars
    assert main(["export", str(run_dir), str(out), "type=q8_0"]) == 2
    assert "exists: pass overwrite=true" in one_line_error(capsys) and out.read_bytes() == before
    assert main(["export", str(run_dir), str(out), "type=q8_0", "overwrite=true"]) == 0
    assert out.stat().st_size < len(before)  # 8-bit blocks instead of 16-bit values
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_gguf_agreement_script_compares_a_runs_exports_with_its_merged_model(runs, capsys):
    """``scripts/gguf_agreement.py`` (the README's check of an exported run) runs on a run folder."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gguf_agreement.py"
    spec = importlib.util.spec_from_file_location("gguf_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(runs("paca")), "f16", "q8_0", "--prompts", "2"]) == 0
    merged, f16, q8_0 = (json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert merged["prompts"] == f16["prompts"] == 2 and f16["same_answer"] == 2
    assert f16["max_logit_diff"] < 1e-3 and q8_0["max_logit_diff"] > 1e-6  # f16 is the rounded model, q8_0 is not


def test_bad_export_input_is_one_line_and_nothing_loads_or_is_written(runs, tmp_path, capsys, monkeypatch):
    from leanft.run import models

    paca_run, full_run = runs("paca"), runs("full")
    biased = tmp_path / "biased"  # a PaCA run whose adapter trains a bias (leanft.apply_paca(train_bias=True))
    shutil.copytree(paca_run, biased)
    tensors = load_file(biased / "adapter" / "paca_adapter.safetensors")
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(32)
    save_file(tensors, biased / "adapter" / "paca_adapter.safetensors")

    def never(*_, **__):
        raise AssertionError("a model loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", never)
    out, a_file = tmp_path / "out", tmp_path / "a_file"
    a_file.write_text("x")
    capsys.readouterr()  # what training the runs printed
    cases = [
        (["export", str(paca_run), str(out), "format=onnx"], "format must be one of hf, peft-lora"),
        (["export", str(paca_run), str(out), "dtype=int8"], "dtype must be one of"),
        (["export", str(paca_run), str(out), "colour=blue"], "unknown key 'colour': see `leanft export --help`"),
        (["export", str(full_run), str(out), "format=peft-lora"], "method=full run has no adapter form"),
        (["export", str(biased), str(out), "format=peft-lora"], "trains the bias of model.layers.0.mlp.down_proj"),
        (["export", str(paca_run), str(paca_run / "adapter"), "overwrite=true"], "overlaps the run folder"),
        (["export", str(paca_run), str(a_file)], "is a file"),
        (["export", str(biased / "adapter"), str(out)], "not a finished leanft run"),
        (["export", str(paca_run), str(out), "--overwrite"], "run leanft export RUN OUT overwrite=true"),
        (["merge", str(paca_run), str(out), "--overwrite"], "run leanft merge RUN OUT overwrite=true"),
        (["merge", str(paca_run), str(out), "--dtype", "bfloat16"], "run leanft merge RUN OUT dtype=bfloat16"),
        (["merge", str(paca_run), str(out), "--dtype=float16"], "dtype=float16"),
        (["merge", str(paca_run), str(out), "format=peft-lora"], "leanft export RUN OUT format=peft-lora"),
        (["export", str(paca_run), str(out / "m.gguf"), "type=q2_k"], "type must be one of f16, bf16, q8_0, q4_0"),
        (["export", str(paca_run), str(out / "m.gguf"), "dtype=bfloat16"], "not dtype=: drop dtype=bfloat16"),
        (["export", str(paca_run), str(tmp_path), "format=gguf"], "is a folder: pass a file name"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in one_line_error(capsys), args
        assert not out.exists() and a_file.read_text() == "x", args


@pytest.mark.slow
@pytest.mark.parametrize("method", ["paca", "s2ft"])
def test_the_adapter_of_the_default_model_is_its_merged_model(method, tmp_path):
    """On the real 30-layer model peft's merge of the adapter is leanft's merged model bit for bit; unmerged, the
    logits differ by the fp32 rounding of LoRA's extra addition, as peft's own unmerged and merged forms do."""
    from leanft.run.models import default_model_path

    def base():
        return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)

    model = base()
    if method == "paca":
        leanft.apply_paca(model, r=32, seed=0)
    else:
        leanft.apply_s2ft(model, ffn=0.05, heads=0.05, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # columns moved as far as a trained run moves them (about 1% of their size)
        for layer in leanft.paca_modules(model).values():
            noise = torch.randn(layer.paca_weight.shape, generator=generator)
            layer.paca_weight.add_(0.01 * layer.paca_weight.abs().mean() * noise)
    config, tensors = paca_lora_form(model)
    write_adapter(tmp_path, config, tensors, torch.float32)
    ids = torch.randint(0, 49152, (2, 64), generator=generator)
    loaded = peft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    with torch.no_grad():
        expected = leanft.merge_paca(model).eval()(input_ids=ids).logits
        unmerged = loaded(input_ids=ids).logits
        merged_by_peft = loaded.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged_by_peft, expected, rtol=0, atol=0)
    difference = (unmerged - expected).abs().max().item()
    print(f"{method}: max abs logit difference {difference:.2e} (logits up to {expected.abs().max().item():.1f})")
    assert difference <= 2 * EXACT  # measured 8.4e-5 (PaCA) and 1.0e-4 (S2FT) on logits up to 34
