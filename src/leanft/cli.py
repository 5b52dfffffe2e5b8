"""``leanft train | eval | export | merge | generate | compare | fidelity | bench``: thin commands over the library.

Bad input ends with one line on stderr and exit code 2; Ctrl-C during training saves a checkpoint first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from leanft.core.errors import LeanftError
from leanft.run.options import options_help, split_config_path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def quiet_transformers() -> None:
    """No progress bars from transformers (leanft draws its own); imports transformers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``leanft train``: every key is checked before torch and transformers are imported."""
    from leanft.run.config import train_config

    config = train_config(*split_config_path(args.items))
    quiet_transformers()
    from leanft.run.train import train

    summary = train(config)
    if summary:
        print(short_summary(summary))
    return 0


def short_summary(summary: dict) -> str:
    """What a finished run achieved, in three lines (the whole summary is in ``summary.json``)."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    run_dir = summary["run_dir"]
    if summary.get("objective") == "dpo":
        quality = (f"held-out preference accuracy {share(summary['preference_accuracy_before'])} -> "
                   f"{share(summary['preference_accuracy_after'])}, mean margin over the reference "
                   f"{summary['mean_margin_before']:.3f} -> {summary['mean_margin_after']:.3f} nats, chosen answer "
                   f"the more likely {share(summary['logprob_accuracy_before'])} -> "
                   f"{share(summary['logprob_accuracy_after'])} ({summary['num_eval']} pairs)")
    else:
        quality = (f"held-out loss {summary['heldout_loss_before']:.4f} -> {summary['heldout_loss_after']:.4f}, "
                   f"accuracy {share(summary['accuracy_before'])} -> {share(summary['accuracy_after'])} "
                   f"({summary['num_eval']} examples)")
    return "\n".join([
        quality,
        f"{summary['steps']} steps in {summary['wall_time_s']:.0f} s ({summary['tokens_per_s']:.0f} tokens/s), "
        + ("DPO, " if summary.get("objective") == "dpo" else "") + summary["method"]
        + (f" + DropBP {summary['dropbp_rate']:g}" if summary["dropbp_rate"] else ""),
        f"run folder: {run_dir} (summary.json, adapter/, metrics.jsonl, loss_curve.png)",
    ])


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``leanft eval``: held-out loss, perplexity and accuracy, or lm-eval tasks with ``lm_eval=TASKS``."""
    quiet_transformers()
    from leanft.run.config import load_config
    from leanft.run.files import RUN_CONFIG_FILE
    from leanft.run.lm_eval_tasks import LmEvalOptions, load_tasks, run_tasks
    from leanft.run.models import load_model_and_tokenizer
    from leanft.run.options import apply_items, split_items
    from leanft.run.rundir import load_run, run_config
    from leanft.run.sources import load_records

    path, items = split_config_path(args.items)
    own, overrides = split_items(LmEvalOptions, items)
    options = apply_items(LmEvalOptions(), own, "eval")
    if path is not None and Path(path).is_dir() and (Path(path) / RUN_CONFIG_FILE).is_file():
        config = run_config(path, overrides)  # overrides checked before loading

        def load() -> tuple:
            return load_run(path, overrides=overrides)[:2]
    elif path is not None:
        raise LeanftError(f"{path} is not a leanft run folder: pass a run folder, or model=... for a base model")
    else:
        config = load_config(None, overrides)

        def load() -> tuple:
            return load_model_and_tokenizer(config.model, quantize=config.quantize)
    # the tasks, or the held-out data, are checked before any model loads
    tasks = load_tasks(options) if options.lm_eval is not None else None
    if tasks is None and config.objective == "dpo":
        raise LeanftError("leanft eval measures answers to instructions; a preference run's summary.json holds its "
                          "held-out preference metrics: pass lm_eval=TASKS, or objective=sft data=... to score answers")
    records = load_records(config)[1] if tasks is None else None
    model, tokenizer = load()
    if tasks is not None:
        print(json.dumps({"lm_eval": run_tasks(model, tokenizer, tasks, options)}, indent=2))
    else:
        print(json.dumps(heldout_report(model, tokenizer, config, records), indent=2))
    return 0


def heldout_report(model, tokenizer, config, records: list) -> dict:
    """``leanft eval``'s own report: held-out loss, perplexity and accuracy on ``records``."""
    from leanft.run.data import tokenize_dataset
    from leanft.run.evaluate import eval_settings, evaluate

    features = tokenize_dataset(records, tokenizer, config.max_seq_len)
    return {**evaluate(model, tokenizer, records, features, eval_settings(config)), "num_eval": len(records)}


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``leanft export RUN OUT [key=value ...]`` (or ``leanft merge RUN OUT``, its format=hf): everything is
    checked before a model loads, and OUT is replaced only once it is completely written."""
    from leanft.run.export import prepare_export, refuse_old_spellings, run_export

    refuse_old_spellings(args.command, args.old_overwrite, args.old_dtype)
    job = prepare_export(args.run_dir, args.out, args.items, args.command)
    quiet_transformers()
    print(run_export(job))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``leanft generate RUN_DIR PROMPT``: the tuned model's greedy answer."""
    quiet_transformers()
    from leanft.run.evaluate import generate_answers
    from leanft.run.rundir import load_run

    model, tokenizer, _ = load_run(args.run_dir)
    print(generate_answers(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``leanft compare``: methods trained side by side, held-out quality against training time."""
    quiet_transformers()
    from leanft.studies.compare import run_compare

    run_compare(args.items)
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Run ``leanft fidelity``: how close DropBP's gradients come to the full one on a training batch."""
    quiet_transformers()
    from leanft.studies.fidelity_study import parse_options, plot_command, render, run_study

    drawn = plot_command(args.items)
    if drawn is not None:
        print(f"plot written to {drawn}")
        return 0
    path, items = split_config_path(args.items)
    config, options = parse_options(path, items)
    print(render(run_study(config, options)))
    if options.output is not None:
        print(f"results written to {options.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``leanft bench``: every option is checked before any measuring starts."""
    quiet_transformers()
    from leanft.studies.bench import run_bench
    from leanft.studies.bench_options import parse_bench_options

    return run_bench(parse_bench_options(args.items))


class KeyListParser(argparse.ArgumentParser):
    """A parser whose ``--help`` ends with its command's keys, listed only when the help is shown: listing them
    imports the command's option classes, which parsing and the other commands must not wait for."""

    def __init__(self, *args, keys: Callable[[], list[str]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys = keys

    def format_help(self) -> str:
        """The help text, with the key list as its epilog."""
        if self.keys is not None and self.epilog is None:
            self.epilog = "\n".join(self.keys())
        return super().format_help()


def _add_keys_command(
    commands, name: str, texts: tuple[str, str], keys: Callable[[], list[str]], func,
    metavar: str = "CONFIG.yaml | key=value",
) -> None:
    """A sub-command taking ``[CONFIG.yaml] [key=value ...]`` (or ``metavar``), ``keys()`` listed in ``--help``;
    ``texts``: its one-line summary and its description."""
    summary, description = texts
    command = commands.add_parser(
        name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter, description=description, keys=keys,
    )
    command.add_argument("items", nargs="*", metavar=metavar)
    command.set_defaults(func=func)


def _add_export_command(commands, name: str, summary: str, description: str) -> None:
    """``leanft export`` / ``leanft merge``: RUN_DIR OUT [key=value ...]; the flags of before are refused with
    their new spelling."""
    def keys() -> list[str]:
        lines = options_help(_option_class("run.export:ExportOptions"))
        return ["keys:", *(line for line in lines if name == "export" or line.split()[0] in ("dtype", "overwrite"))]

    command = commands.add_parser(
        name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter, description=description, keys=keys,
    )
    command.add_argument("run_dir", help="a finished leanft run folder")
    command.add_argument("out", help="the folder to write (replaced only once it is completely written)")
    command.add_argument("items", nargs="*", metavar="key=value")
    command.add_argument("--overwrite", dest="old_overwrite", action="store_true", help=argparse.SUPPRESS)
    command.add_argument("--dtype", dest="old_dtype", default=None, help=argparse.SUPPRESS)
    command.set_defaults(func=cmd_export)


def train_keys() -> list[str]:
    """``leanft train``'s keys, one line each."""
    from leanft.run.config import config_help

    return config_help()


def _option_class(target: str):
    """``leanft.MODULE:NAME``, imported (a command's option class, for its help)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(f"leanft.{module}"), name)


def build_parser() -> argparse.ArgumentParser:
    """The ``leanft`` argument parser with its sub-commands."""
    parser = KeyListParser(prog="leanft", description="Faster, lighter LLM fine-tuning: DropBP + PaCA.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=KeyListParser)
    with_train = "[CONFIG.yaml] [key=value ...]  (every `leanft train` key, plus those below)"
    _add_keys_command(
        commands, "train",
        ("fine-tune a model (no arguments: the embedded default job)", "leanft train [CONFIG.yaml] [key=value ...]"),
        lambda: ["config keys (YAML or key=value):", *train_keys()], cmd_train,
    )
    _add_keys_command(
        commands, "eval",
        ("held-out loss / perplexity / accuracy of a run or model, or lm-eval tasks",
         "leanft eval [RUN_DIR] [key=value ...]  (evaluation keys of `leanft train`, plus those below)"),
        lambda: ["lm-eval keys:", *options_help(_option_class("run.lm_eval_tasks:LmEvalOptions"))],
        cmd_eval, "RUN_DIR | key=value",
    )

    _add_export_command(commands, "export", "write a run for serving: a merged HF model or a peft LoRA adapter",
                        "leanft export RUN_DIR OUT [format=hf|peft-lora] [dtype=...] [overwrite=true]")
    _add_export_command(commands, "merge", "write a standalone HF model with the adapter merged in",
                        "leanft merge RUN_DIR OUT [dtype=...] [overwrite=true]  (leanft export's format=hf)")

    generate = commands.add_parser("generate", help="answer a prompt with a tuned model")
    generate.add_argument("run_dir")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(func=cmd_generate)

    _add_keys_command(
        commands, "compare",
        ("train several methods on the same job: held-out loss against time, time-to-quality vs LoRA",
         f"leanft compare {with_train}"),
        lambda: ["compare keys:", *options_help(_option_class("studies.compare:CompareOptions")),
                 "train keys (shared by every variant):", *train_keys()],
        cmd_compare,
    )
    _add_keys_command(
        commands, "fidelity",
        ("check whether DropBP suits a model and batch: cosine of DropBP gradients with the full one",
         f"leanft fidelity {with_train}\n"
         "example: leanft fidelity model=default rates=0.25,0.5 patterns=1,4,8 samples=6 output=f.json"),
        lambda: ["fidelity keys:", *options_help(_option_class("studies.fidelity_study:FidelityKeys")),
                 _option_class("studies.fidelity_study:PLOT_HELP"),
                 "train keys (model, method, data, batch_size, ...):", *train_keys()],
        cmd_fidelity,
    )
    _add_keys_command(
        commands, "bench",
        ("speed / memory / max length side by side with peft LoRA",
         f"leanft bench {with_train}\nexample: leanft bench quick=true variants=lora,paca rates=0.5"),
        lambda: ["bench keys:", *options_help(_option_class("studies.bench_options:BenchOptions")),
                 "train keys (model, batch_size, max_seq_len, bf16, r, chunked_loss, ...):", *train_keys()],
        cmd_bench,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leanft`` command; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch: log once, from rank 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "peft", "accelerate", "bitsandbytes", "httpx", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args, unknown = build_parser().parse_known_args(argv)
    try:
        if unknown:
            key = unknown[0].lstrip("-").replace("-", "_")
            raise LeanftError(f"unknown option {unknown[0]}: this command takes key=value options, e.g. {key}=...")
        return args.func(args)
    except LeanftError as error:
        print(f"leanft: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # a full disk, whichever library was writing; anything else is raised again
        from leanft.core.fileio import says_disk_full

        if not says_disk_full(error):
            raise
        where = getattr(error, "filename", None) or "the output"
        print(f"leanft: error: no space left on the disk holding {where}: free some space and run again",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:
        print(f"leanft: {str(interrupt) or 'interrupted (nothing was saved)'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if "torch.distributed" in sys.modules:  # torchrun / accelerate ranks: close the process group before exiting
            from leanft.core.distributed import leave_distributed

            leave_distributed()


if __name__ == "__main__":
    sys.exit(main())
