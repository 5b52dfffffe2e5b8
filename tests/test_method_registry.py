"""A method is one registry entry: its keys (``NAME.KEY``) join the option language, the help, validation, the
run folder's fixed keys and compare's variants; earlier flat keys are still read."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.run.config import config_help, config_to_dict, flat_items, load_config
from leanft.run.methods import METHODS, MethodSpec, lazy
from leanft.run.options import doc
from leanft.studies.variants import variant_overrides


@dataclasses.dataclass
class ToyKeys:
    """``toy.*``: the test method's own keys."""

    module: str = doc("the one module whose parameters train", "model.norm")

    def validate(self, in_use: bool) -> None:
        if in_use and not self.module.startswith("model."):
            raise LeanftError(f"toy.module must name a module under model., got {self.module!r}")


def attach_toy(model, settings):
    """Train the parameters of one module (``toy.module``), nothing else."""
    model.requires_grad_(False)
    model.get_submodule(settings.own(ToyKeys).module).requires_grad_(True)
    return model


TOY = MethodSpec(name="toy", label="toy method", short_label="toy", default_lr=1e-2, quantized=None,
                 attach=attach_toy, check=lambda model, settings: None, merge=lambda model: model,
                 save=lazy("save_pretrained"), load=lazy("load_full"), keys=ToyKeys)  # fmt: skip


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)  # nothing else in the package changes


def test_a_test_only_method_is_one_entry_with_its_keys(toy, model_dir, data_file, tmp_path, capsys):
    assert any(line.strip().startswith("toy.module (default 'model.norm')") for line in config_help())
    with pytest.raises(LeanftError, match="toy.module must name a module under model."):
        load_config(None, ["method=toy", "toy.module=lm_head"])
    run_dir = tmp_path / "run"
    args = ["train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}", "max_steps=2",
            "batch_size=4", "num_eval=4", "max_new_tokens=2", "method=toy", "toy.module=model.layers.1",
            "bf16=false"]  # the toy layer computes in fp32, not on a bf16 base (AVX-512 BF16 CPUs)  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert saved["method"] == "toy" and saved["toy"] == {"module": "model.layers.1"}
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "adapter").state_dict()
    moved = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert moved and all(name.startswith("model.layers.1.") for name in moved)  # toy.module reached attach
    assert main(["eval", str(run_dir), "toy.module=model.norm"]) == 2  # a trained run's own keys are fixed
    assert "toy.module of a trained run cannot change" in capsys.readouterr().err
    assert variant_overrides("toy:module=model.norm:lr=0.1") == ["toy.module=model.norm", "lr=0.1"]


def test_old_flat_keys_are_read_with_a_one_line_note(caplog):
    with caplog.at_level(logging.WARNING):
        config = load_config(None, ["lora_alpha=32", "paca_columns=random", "s2ft_ffn=0.1", "s2ft_heads=0.5"])
    assert config.option_group("lora").alpha == 32 and config.option_group("paca") is None
    assert (config.option_group("s2ft").ffn, config.option_group("s2ft").heads) == (0.1, 0.5)
    assert "lora_alpha is now lora.alpha" in caplog.text


def test_a_retired_key_is_read_at_todays_value_and_refused_at_another(tmp_path, capsys):
    saved = tmp_path / "run_config.yaml"  # an older run folder's config
    saved.write_text(yaml.safe_dump({"method": "paca", "paca": {"columns": "random"}}))
    assert flat_items(load_config(saved)) == flat_items(load_config(None, ["method=paca"]))
    for key in ("paca.columns", "paca_columns"):
        assert main(["train", f"{key}=activation", f"output_dir={tmp_path / 'run'}"]) == 2
        assert "paca.columns is no longer a key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_method_keys_round_trip_through_yaml_and_the_variant_grammar(tmp_path):
    config = load_config(None, ["lora.alpha=8", "s2ft.heads=0.25"])
    data = config_to_dict(config)
    assert "method_keys" not in data and data["lora"] == {"alpha": 8} and data["s2ft"]["ffn"] == 0.05
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert flat_items(load_config(path)) == flat_items(config)
    assert variant_overrides("lora+dropbp:alpha=32:warmup=0.2:r=32") == [
        "lora.alpha=32", "dropbp.warmup=0.2", "r=32"]
    assert "method_keys" not in "\n".join(config_help())
    with pytest.raises(LeanftError, match="unknown key 'method_keys'"):
        load_config(None, ["method_keys={}"])
