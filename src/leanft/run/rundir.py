"""The run folder: its layout, the checks before a run writes into it, and loading a finished run.

A run folder holds ``run_config.yaml``, ``checkpoint-N/`` folders (each complete once its marker exists), then at
the end ``adapter/`` (or the full model), ``metrics.jsonl``, ``loss_curve.png`` and ``summary.json``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
import yaml

from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path
from leanft.run.config import TrainConfig, config_to_dict, load_config
from leanft.run.methods import ADAPTER_DIR, load_trained
from leanft.run.models import load_model_and_tokenizer

RUN_CONFIG_FILE = "run_config.yaml"
SUMMARY_FILE = "summary.json"
BASELINE_FILE = "baseline.json"
COMPLETE_MARKER = "leanft_complete"
MODEL_KEYS = ("model", "method", "r", "lora_alpha", "target_modules", "quantize", "seed")  # fix what a run trained


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder whose save finished, or None."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def fresh_output_dir(folder: Path, overwrite: bool, what: str) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite`` (then the folder is emptied)."""
    if folder.exists() and not folder.is_dir():
        raise LeanftError(f"output_dir {folder} is a file: pass a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise LeanftError(f"{folder} {what}: pass overwrite=true or choose another output_dir")
        shutil.rmtree(folder)


def default_output_dir(name: str) -> Path:
    """A new folder under ``runs/`` named by the time and ``name``."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run folder, checked against finished / unfinished runs already in it (nothing is changed yet)."""
    if config.output_dir is None:
        return default_output_dir(config.method)
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LeanftError(f"output_dir {run_dir} is a file: pass a folder")
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        if last_complete_checkpoint(run_dir) is None:
            raise LeanftError(f"{run_dir} holds no complete checkpoint to resume from: drop resume=true")
        return run_dir
    if (run_dir / SUMMARY_FILE).is_file() and not config.overwrite:
        raise LeanftError(f"{run_dir} holds a finished run: pass overwrite=true or choose another output_dir")
    if has_content and not config.overwrite:
        raise LeanftError(f"{run_dir} is not empty: pass resume=true to continue the run in it, or overwrite=true")
    return run_dir


def start_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run folder (emptied first for ``overwrite=true``) and record the config in it."""
    if config.overwrite and not config.resume and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / RUN_CONFIG_FILE) as temporary:
        temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The saved config of a run folder with ``overrides`` applied; keys that fix the trained model may not change."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        raise LeanftError(f"{run_dir} is not a finished leanft run (no {RUN_CONFIG_FILE} and {ADAPTER_DIR}/)")
    saved = load_config(run_dir / RUN_CONFIG_FILE)
    config = load_config(run_dir / RUN_CONFIG_FILE, list(overrides))
    changed = [key for key in MODEL_KEYS if getattr(config, key) != getattr(saved, key)]
    if changed:
        raise LeanftError(f"{', '.join(changed)} of a trained run cannot change: drop {changed[0]}=...")
    return config


def load_run(
    run_dir: str | Path, device: str | None = None, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, object, TrainConfig]:
    """(trained model, tokenizer, config) of a finished run folder; ``overrides`` change evaluation keys only."""
    config = run_config(run_dir, overrides)
    base, tokenizer = load_model_and_tokenizer(config.model, device=device, quantize=config.quantize)
    return load_trained(base, config.method, Path(run_dir) / ADAPTER_DIR), tokenizer, config
