"""The run folder: its layout, the checks before a run writes into it, and loading a finished run.

A run folder holds ``run_config.yaml``, ``checkpoint-N/`` folders (each complete once its marker exists), then at
the end ``adapter/`` (or the full model), ``metrics.jsonl``, ``loss_curve.png`` and ``summary.json``.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import torch
import yaml

from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path, says_disk_full
from leanft.run.config import TrainConfig, config_to_dict, flat_items, load_config
from leanft.run.files import ADAPTER_DIR, COMPLETE_MARKER, LOCK_FILE, RUN_CONFIG_FILE, SUMMARY_FILE
from leanft.run.methods import METHODS, MethodSettings, load_trained
from leanft.run.models import load_model_and_tokenizer

# what a trained run's model is made of: the base, the method, the settings every method reads (MethodSettings)
# and each method's own keys (``lora.alpha``, ...: see ``model_keys``)
MODEL_KEYS = ("model", "quantize", "method",
              *(item.name for item in fields(MethodSettings) if item.name != "keys"))  # fmt: skip


def model_keys(flat: dict[str, object]) -> list[str]:
    """The keys among ``flat`` (``flat_items`` of a config) that a trained run may not change."""
    return [key for key in flat if key in MODEL_KEYS or key.split(".")[0] in METHODS]
RESUME_SAFE_KEYS = (  # what a resumed run may change: how long it trains, how often it logs, saves and evaluates
    "max_steps", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "ddp_timeout", "resume", "overwrite",
    "output_dir",  # the folder may have been moved
)


def _step(folder: Path) -> int:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, newest first."""
    found = [path for path in run_dir.glob("checkpoint-*") if path.is_dir() and _step(path) >= 0]
    return sorted(found, key=_step, reverse=True)


def _listed(folder: Path) -> dict[str, int]:
    """The files a checkpoint's manifest covers (other ranks' RNG files are written on their own schedule)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        other_rank = name.startswith("rng_state_") and name != "rng_state_0.pth"
        if path.is_file() and name != COMPLETE_MARKER and not path.name.startswith(".") and not other_rank:
            files[name] = path.stat().st_size
    return files


def disk_is_full(folder: Path, error: Exception) -> bool:
    """Whether ``error`` (raised writing under ``folder``) comes from a full disk or quota."""
    if says_disk_full(error):
        return True
    newest = next((c for c in checkpoints(folder) if checkpoint_problem(c) is None), None)
    needed = sum(path.stat().st_size for path in newest.rglob("*") if path.is_file()) if newest else 0
    return shutil.disk_usage(folder).free < max(1024 * 1024, needed)


def mark_complete(folder: Path) -> None:
    """Mark a checkpoint complete: the marker lists every file of it with its size (checked before a resume)."""
    listing = json.dumps({"files": _listed(folder)}, indent=1) + "\n"
    with atomic_path(folder / COMPLETE_MARKER) as temporary:
        temporary.write_text(listing)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (not complete, a file missing or of another size), or None."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "its save did not finish"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {COMPLETE_MARKER} marker is damaged"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    return None


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from, and why each newer one was skipped."""
    skipped = []
    for folder in checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones, and unfinished ones older than the newest
    complete one. Called only once a new checkpoint is complete, so a complete one always remains."""
    complete = [folder for folder in checkpoints(run_dir) if checkpoint_problem(folder) is None]
    if not complete:
        return
    kept, newest = complete[:keep], _step(complete[0])
    for folder in checkpoints(run_dir):
        stale = folder in complete or _step(folder) < newest  # an unfinished one newer than all may be in progress
        if folder not in kept and stale:
            shutil.rmtree(folder, ignore_errors=True)


def clear_newer_checkpoints(run_dir: Path, resume_from: Path) -> None:
    """Delete the checkpoints newer than ``resume_from`` (unfinished or damaged): the resumed run writes them anew."""
    for folder in checkpoints(run_dir):
        if _step(folder) > _step(resume_from):
            shutil.rmtree(folder, ignore_errors=True)


def fresh_output_dir(folder: Path, overwrite: bool, what: str) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite`` (then the folder is emptied)."""
    refuse_a_file(folder)
    if _content(folder):
        if not overwrite:
            raise LeanftError(f"{folder} {what}: pass overwrite=true or choose another output_dir")
        shutil.rmtree(folder)


def refuse_a_file(folder: Path) -> None:
    """One line when the ``output_dir`` given names a file."""
    if folder.exists() and not folder.is_dir():
        raise LeanftError(f"output_dir {folder} is a file: pass a folder")


def default_output_dir(name: str) -> Path:
    """A new folder under ``runs/`` named by the time and ``name`` (``claim`` makes it unique)."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def _content(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name != LOCK_FILE] if folder.is_dir() else []


class RunFolderLock:
    """One run per folder: an exclusive lock on ``.leanft.lock`` inside it, released when the process ends (a
    crashed or killed run leaves no stale lock). An auto-named folder is claimed under a unique name first. On
    a failure before the run wrote anything, a folder this lock created is removed again."""

    def __init__(self, run_dir: Path, auto_named: bool) -> None:
        self.run_dir, self.auto_named = run_dir, auto_named
        self.created, self.handle = False, None

    def _claim(self) -> None:
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        if not self.auto_named:
            self.created = not self.run_dir.exists()
            self.run_dir.mkdir(exist_ok=True)
            return
        base = self.run_dir
        for number in range(1, 1000):
            candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            self.run_dir, self.created = candidate, True
            return
        raise LeanftError(f"could not claim a new run folder next to {base}: pass output_dir=...")

    def __enter__(self) -> Path:
        self._claim()
        self.handle = (self.run_dir / LOCK_FILE).open("a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise LeanftError(
                f"{self.run_dir} is in use by another leanft run: wait for it to finish or choose another output_dir"
            ) from None
        return self.run_dir

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None and self.created and not _content(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:  # removed while still held: a run starting now either fails to lock it or locks a new file
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def check_resume(run_dir: Path, config: TrainConfig) -> TrainConfig:
    """Refuse a resume whose settings differ from the run's saved ones in a key that is not safe to change;
    returns the saved config."""
    saved_config = load_config(run_dir / RUN_CONFIG_FILE)
    saved, given = flat_items(saved_config), flat_items(config)
    changed = [key for key in given if key not in RESUME_SAFE_KEYS and given[key] != saved.get(key)]
    if changed:
        key = changed[0]
        raise LeanftError(
            f"resume=true continues the run with its saved settings, but {key} differs ({saved.get(key)!r} saved, "
            f"{given[key]!r} given): drop {key}=...; a resume may change only {', '.join(RESUME_SAFE_KEYS[:5])}"
        )
    return saved_config


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run folder, checked against finished / unfinished runs already in it (nothing is changed yet)."""
    if config.output_dir is None:
        return default_output_dir(config.method)
    run_dir = Path(config.output_dir)
    refuse_a_file(run_dir)
    has_content = bool(_content(run_dir))
    if config.resume:
        found, skipped = resume_checkpoint(run_dir)
        if found is None or not (run_dir / RUN_CONFIG_FILE).is_file():
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise LeanftError(f"{run_dir} holds no complete checkpoint to resume from{why}: drop resume=true")
        saved = check_resume(run_dir, config)
        if (run_dir / SUMMARY_FILE).is_file() and config.max_steps <= saved.max_steps:
            raise LeanftError(f"{run_dir} holds a finished run: nothing to resume (raise max_steps to train on)")
        return run_dir
    if (run_dir / SUMMARY_FILE).is_file() and not config.overwrite:
        raise LeanftError(f"{run_dir} holds a finished run: pass overwrite=true or choose another output_dir")
    if has_content and not config.overwrite:
        raise LeanftError(f"{run_dir} is not empty: pass resume=true to continue the run in it, or overwrite=true")
    return run_dir


def start_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run folder (emptied first for ``overwrite=true``) and record the config in it."""
    if config.overwrite and not config.resume:
        for path in _content(run_dir):  # the lock file stays: this run holds it
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / RUN_CONFIG_FILE) as temporary:
        temporary.write_text(yaml.safe_dump(config_to_dict(config.resolved()), sort_keys=False))


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The saved config of a run folder with ``overrides`` applied; keys that fix the trained model may not change."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        raise LeanftError(f"{run_dir} is not a finished leanft run (no {RUN_CONFIG_FILE} and {ADAPTER_DIR}/)")
    saved = load_config(run_dir / RUN_CONFIG_FILE)
    config = load_config(run_dir / RUN_CONFIG_FILE, list(overrides))
    given, kept = flat_items(config), flat_items(saved)
    changed = [key for key in model_keys(given) if given[key] != kept.get(key)]
    if changed:
        raise LeanftError(f"{', '.join(changed)} of a trained run cannot change: drop {changed[0]}=...")
    return config


def load_run(
    run_dir: str | Path, device: str | None = None, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, object, TrainConfig]:
    """(trained model, tokenizer, config) of a finished run folder; ``overrides`` change evaluation keys only."""
    config = run_config(run_dir, overrides)
    base, tokenizer = load_model_and_tokenizer(
        config.model, dtype=config.base_dtype(), device=device, quantize=config.quantize
    )  # the base as it was trained (bf16 where the run computed in bf16)
    return load_trained(base, config.method, Path(run_dir) / ADAPTER_DIR), tokenizer, config
