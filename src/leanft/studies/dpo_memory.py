"""Peak memory of preference tuning, side by side, each case in a fresh process: leanft's DPO with PaCA (the
reference is the policy with its columns switched off) against TRL's ``DPOTrainer`` with peft LoRA and a separate
reference model, on the same pairs of ``builtin:prefs-arith``.

    python -m leanft.studies.dpo_memory [model=default] [steps=4] [batch_size=8] [threads=0] [checkpointing=0]

Each process imports torch, transformers, peft, TRL and datasets first; its peak is the resident-set high-water
mark during training minus its resident set before the model was loaded (the CPU analogue of
``max_memory_allocated``, as ``leanft bench`` measures), with freed memory handed back to the OS at once
(``bench_worker.release_freed_memory``). ``checkpointing=1`` turns activation checkpointing on in both (non-reentrant).
Prints one JSON line per case, then the ratio.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
import time
import traceback
from pathlib import Path

from transformers import TrainerCallback

from leanft.studies.bench_worker import current_bytes, peak_bytes, release_freed_memory, reset_peak

CASES = ("leanft-dpo-paca", "trl-dpo-lora-ref-copy")
MIB = 2**20


class TrainingPeak(TrainerCallback):
    """Peak memory over training (reset when training begins) and the mean time of a step."""

    def __init__(self) -> None:
        self.peak, self.step_times, self.began = 0, [], 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak("cpu")

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.began)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak = peak_bytes("cpu")


def _leanft_case(options: dict, folder: Path, peak: TrainingPeak) -> None:
    from leanft.run.config import load_config
    from leanft.run.train import train

    keys = [f"model={options['model']}", "objective=dpo", "data=builtin:prefs-arith", "method=paca", "bf16=false",
            f"max_steps={options['steps']}", f"batch_size={options['batch_size']}", "num_train=64", "num_eval=2",
            "eval_steps=0", "save_steps=1000", f"output_dir={folder}",
            f"gradient_checkpointing={bool(options['checkpointing'])}"]  # fmt: skip
    train(load_config(None, keys), callbacks=[peak])


def _trl_case(options: dict, folder: Path, peak: TrainingPeak) -> None:
    import datasets
    import peft
    import trl

    from leanft.run.models import load_model, load_model_and_tokenizer
    from leanft.run.pref_tasks import prefs_arith_task

    model, tokenizer = load_model_and_tokenizer(options["model"])
    reference = load_model(options["model"])
    pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant",
              "content": r["chosen"]}], "rejected": [{"role": "assistant", "content": r["rejected"]}]}
             for r in prefs_arith_task(0, 64, 2)[0]]  # fmt: skip
    args = trl.DPOConfig(
        output_dir=str(folder), max_steps=options["steps"], per_device_train_batch_size=options["batch_size"],
        learning_rate=3e-3, beta=0.1, max_length=256, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=bool(options["checkpointing"]),
        gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0, disable_tqdm=True,
    )  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(
        pairs), processing_class=tokenizer, peft_config=lora, callbacks=[peak])  # fmt: skip
    trainer.train()


def measure(case: str, options: dict, queue) -> None:
    """Child process: train ``case`` for ``options["steps"]`` steps; put its memory and step time on ``queue``."""
    import warnings

    warnings.filterwarnings("ignore")
    release_freed_memory()
    import datasets  # noqa: F401 - every library both cases use, before the baseline
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    start = current_bytes("cpu")
    peak = TrainingPeak()
    try:
        with tempfile.TemporaryDirectory() as folder:
            (_leanft_case if case == CASES[0] else _trl_case)(options, Path(folder) / "run", peak)
    except Exception:  # reported by the parent
        queue.put({"case": case, "error": traceback.format_exc(limit=6)})
        return
    times = peak.step_times[1:] or peak.step_times  # the first step warms up
    queue.put({"case": case, "peak_mib": round((peak.peak - start) / MIB, 1), "start_mib": round(start / MIB, 1),
               "step_s": round(sum(times) / len(times), 2), "threads": torch.get_num_threads()})  # fmt: skip


def parse(argv: list[str]) -> dict:
    """``key=value`` options over the defaults."""
    options = {"model": "default", "steps": 4, "batch_size": 8, "threads": 0, "checkpointing": 0}
    for item in argv:
        key, _, value = item.partition("=")
        if key not in options:
            raise SystemExit(f"unknown key {key!r}: use {', '.join(options)}")
        options[key] = value if key == "model" else int(value)
    return options


def main(argv: list[str]) -> int:
    """Measure every case in its own fresh process; print each result and the ratio of the two peaks."""
    options = parse(argv)
    context = multiprocessing.get_context("spawn")
    results = {}
    for case in CASES:
        queue = context.Queue()
        process = context.Process(target=measure, args=(case, options, queue))
        process.start()
        results[case] = queue.get()
        process.join()
        print(json.dumps(results[case]), flush=True)
        if "error" in results[case]:
            return 1
    ratio = results[CASES[0]]["peak_mib"] / results[CASES[1]]["peak_mib"]
    print(json.dumps({"peak_ratio_leanft_over_trl": round(ratio, 3), **{k: options[k] for k in options}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
