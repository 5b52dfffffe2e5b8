"""Config: YAML mirrors the dataclasses, key=value overrides, clear errors on unknown keys and bad values."""

from __future__ import annotations

import pytest

from leanft import LeanftError
from leanft.run.config import TrainConfig, config_help, config_to_dict, load_config
from leanft.run.methods import parse_target_modules


def test_defaults_are_valid_and_lr_follows_method():
    config = load_config()
    assert config == TrainConfig()
    assert (config.learning_rate(), config.rank()) == (1.5e-3, 64)  # the best PaCA on both real instruction sets
    assert (load_config(overrides=["method=lora"]).learning_rate(), load_config(overrides=["method=lora"]).rank()) == (
        3e-3, 8)
    assert load_config(overrides=["r=16"]).rank() == 16 and load_config().resolved().r == 64
    assert load_config(overrides=["method=lora", "lr=5e-5"]).learning_rate() == 5e-5
    dpo = load_config(overrides=["objective=dpo", "data=builtin:prefs-arith"])
    assert (dpo.learning_rate(), dpo.rank()) == (3e-4, 32)  # preference tuning keeps the setting it was measured in
    dpo_lora = load_config(overrides=["objective=dpo", "data=builtin:prefs-arith", "method=lora"])
    assert (dpo_lora.learning_rate(), dpo_lora.rank()) == (3e-4, 8)


def test_yaml_then_overrides_with_nested_keys_and_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nr: 4\npacking: true\ndropbp:\n  rate: 0.25\n  allocate_at: null\n")
    config = load_config(path, ["r=16", "dropbp.rate=0", "gradient_checkpointing=true", "output_dir=out"])
    assert (config.method, config.r, config.packing, config.gradient_checkpointing) == ("lora", 16, True, True)
    assert config.dropbp.rate == 0.0 and config.dropbp.allocate_at is None and config.output_dir == "out"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nonsense=1"], "unknown key 'nonsense'"),
        (["dropbp.nonsense=1"], "unknown key 'dropbp.nonsense'"),
        (["dropbp.rate=1.5"], r"dropbp.rate must be in \[0, 1\)"),
        (["r=abc"], "r='abc' is not a valid int"),
        (["method=qlora"], "method must be one of"),
        (["max_steps=0"], "max_steps must be >= 1"),
        (["dropbp=0.5"], "dropbp is a group"),
        (["justtext"], "expected key=value"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(LeanftError, match=message):
        load_config(None, overrides)


def test_missing_or_bad_yaml_file(tmp_path):
    with pytest.raises(LeanftError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(LeanftError, match="mapping"):
        load_config(tmp_path / "bad.yaml")


def test_help_lists_every_key_with_its_doc():
    lines = "\n".join(config_help())
    for key in ("method", "dropbp.rate", "dropbp.allocate_at", "max_seq_len", "packing", "resume", "overwrite"):
        assert f"  {key} (default" in lines
    assert "share of the branches' backward FLOPs" in lines


def test_target_modules_parsing():
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules(r".*\.mlp\..*") == r".*\.mlp\..*"


def test_the_shipped_default_config_is_the_default_job():
    from pathlib import Path

    import yaml

    shipped = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert load_config(shipped) == TrainConfig()
    spelled = yaml.safe_load(shipped.read_text())
    defaults = config_to_dict(TrainConfig())  # every key spelled out, each method's own keys as its group
    assert spelled.keys() == defaults.keys() and spelled["dropbp"].keys() == defaults["dropbp"].keys()
    assert spelled["lora"].keys() == defaults["lora"].keys() and "method_keys" not in spelled
