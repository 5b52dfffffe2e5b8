"""Training configuration: documented dataclasses, YAML files that mirror them, ``key=value`` overrides."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from leanft.core import choices
from leanft.core.errors import LeanftError
from leanft.run.dpo_config import DPO_LR_DIVISOR, DPOKeys, check_objective
from leanft.run.dropbp_config import DropBPConfig
from leanft.run.files import RUN_CONFIG_FILE
from leanft.run.methods import METHODS, MethodSettings, method_spec, quantized_forms
from leanft.run.optimizers import optimizer_problem
from leanft.run.options import apply_items, assign, doc, options_help, skip_retired
from leanft.run.tasks import builtin_task

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# keys of an earlier release, still read (run_config.yaml files of older runs hold them), and their spellings now
OLD_KEYS = {"lora_alpha": "lora.alpha", "paca_columns": "paca.columns", "s2ft_ffn": "s2ft.ffn",
            "s2ft_heads": "s2ft.heads"}  # fmt: skip
# keys of an earlier release that are gone: (the value that is today's behaviour, which is read and skipped; why)
RETIRED_KEYS = {"paca.columns": ("random", "PaCA trains random columns; the data-aware choices lost to them on "
                                           "every data set measured (README: the default, chosen on real data)")}

REPORTERS = ("tensorboard", "wandb")  # each is also the name of the package it needs


FIELDS = ("instruction", "input", "output", "messages")  # what a record holds; columns= maps them


def parse_columns(text: str | None) -> dict[str, str]:
    """``"instruction:question,output:answer"`` -> ``{"instruction": "question", "output": "answer"}``."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        field, sep, column = (part.strip() for part in item.partition(":"))
        if not sep or not column or field not in FIELDS:
            raise LeanftError(f"columns: {item.strip()!r} is not FIELD:COLUMN with FIELD one of {', '.join(FIELDS)} "
                              "(e.g. columns=instruction:question,output:answer)")
        mapping[field] = column
    return mapping



@dataclass
class TrainConfig:
    """Everything ``leanft train`` needs; every field can be set in YAML or as ``key=value``."""

    model: str = doc("local HF folder, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)", "default")
    data: str = doc(
        "a .jsonl/.json/.parquet/.csv file of {instruction,input,output} or {messages} records, a save_to_disk "
        "folder, a hub dataset id, or a generated task: builtin:dates (= builtin, saturates fast) or builtin:arith "
        "(multi-step word problems, worked answers, scored on the final number); objective=dpo: records of "
        "{prompt, chosen, rejected} (strings, or chosen / rejected as message lists) or builtin:prefs-arith",
        "builtin",
    )
    eval_data: str | None = doc(
        "held-out data (same forms as data); default: the built-in task's held-out split, eval_split of data, or "
        "5% of data (the first num_eval examples when streaming)",
        None,
    )
    data_split: str = doc("split to train on, for a saved DatasetDict or a hub dataset", "train")
    eval_split: str | None = doc("split of data (or of eval_data) to evaluate on, e.g. test", None)
    columns: str | None = doc(
        "FIELD:COLUMN pairs naming the dataset's columns for instruction, input, output or messages, e.g. "
        "instruction:question,output:answer",
        None,
    )
    streaming: bool = doc("read data while training instead of loading it all (data larger than memory)", False)
    objective: str = doc(
        "sft | dpo: supervised fine-tuning on answers, or preference tuning (DPO) on {prompt, chosen, rejected} "
        "pairs (pip install leanft[trl]; the reference is the base model, never a second copy of it)",
        "sft",
    )
    output_dir: str | None = doc("run folder; default: a new folder under runs/", None)
    method: str = doc(" | ".join(METHODS), "paca")
    r: int | None = doc(
        "PaCA columns / LoRA rank per layer; null = the method's default: "
        + ", ".join(f"{m.name} {m.default_r}" for m in METHODS.values() if m.default_r is not None),
        None,
    )
    target_modules: str = doc(
        "'all-linear', a regex, or comma-separated name suffixes", MethodSettings.target_modules
    )
    lr: float | None = doc(
        "learning rate; default per method: " + ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values())
        + f" (objective=dpo: a {DPO_LR_DIVISOR}th of that; paca: r 32 at 3e-4, as preference tuning was measured)",
        None,
    )
    lr_scheduler: str = doc("transformers scheduler name (cosine, linear, constant, ...)", "cosine")
    warmup_ratio: float = doc("share of steps for LR warm-up", 0.05)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    optimizer: str = doc(
        "adamw | apollo | apollo-mini: APOLLO's low-rank-scaled AdamW (pip install leanft[apollo]), far less "
        "optimizer state for full fine-tuning",
        "adamw",
    )
    max_steps: int = doc("optimizer steps", 80)
    batch_size: int = doc("examples per device per step", 8)
    grad_accum: int = doc("gradient accumulation steps", 1)
    max_seq_len: int = doc("tokens per example (longer ones are truncated) or per packed block", 256)
    padding_free: bool = doc(
        "each batch's examples in one row without padding, each attending only to itself (position ids restart at "
        "every example); false = right-padded rows",
        True,
    )
    packing: bool = doc(
        "concatenate examples into max_seq_len blocks (padding-free rows; examples in a block stay apart)", False
    )
    gradient_checkpointing: bool = doc("recompute activations in backward (non-reentrant)", False)
    quantize: str | None = doc("null | 4bit: frozen base in bitsandbytes nf4 (QPaCA / QLoRA; needs bitsandbytes)", None)
    chunked_loss: bool = doc(
        "LM head + cross-entropy over token chunks, never the full logits (exact; off where the head does not allow)",
        True,
    )
    loss_kernel: str = doc(
        " | ".join(choices.LOSS_KERNELS) + ": the chunked loss's implementation; auto = cut-cross-entropy, else "
        "liger-kernel, on CUDA where installed, else leanft's own",
        "auto",
    )
    compile: bool = doc(
        "torch.compile each attention and MLP branch (DropBP patterns cause no recompiles; the first steps compile)",
        False,
    )
    fsdp: bool = doc("multi-process runs (torchrun / accelerate launch): shard with FSDP2 instead of DDP", False)
    ddp_comm_hook: str | None = doc(
        "multi-process DDP runs: null (none) | fp16 | bf16 (gradients sent in half precision; bf16 on CUDA) | "
        "powersgd (rank-powersgd_rank factors, with error feedback): PyTorch's DDP communication hooks",
        None,
    )
    powersgd_rank: int = doc("ddp_comm_hook=powersgd: rank of each gradient matrix's factors", 4)
    ddp_timeout: int = doc("multi-process runs: seconds a rank waits for the others before failing", 600)
    bf16: str = doc(
        "auto | true | false: bf16 compute on a bf16 frozen base, trained parameters and optimizer state in fp32 "
        "(auto = on where the device computes bf16 natively: CUDA with bf16, CPUs with AVX-512 BF16 or AMX)",
        "auto",
    )
    seed: int = doc("seed of data order, PaCA columns and DropBP patterns", 0)
    num_train: int = doc("built-in task: training examples", 2000)
    num_eval: int = doc("held-out examples for exact-match accuracy", 100)
    max_new_tokens: int | None = doc("generation length for accuracy; null = the built-in task's own, else 24", None)
    logging_steps: int = doc("log loss every N steps (metrics.jsonl)", 5)
    eval_steps: int = doc("held-out loss every N steps (metrics.jsonl, loss curve); 0 = only before and after", 20)
    save_steps: int = doc("checkpoint every N steps", 50)
    save_total_limit: int = doc("checkpoints kept", 2)
    resume: bool = doc("continue from the last checkpoint in output_dir", False)
    overwrite: bool = doc("allow writing into a run folder that holds a finished run", False)
    report_to: str | None = doc(
        "null (none) | tensorboard | wandb: where the Trainer also sends the metrics (losses, learning rate, "
        "tokens/s, DropBP's realised skipped share and mean rate); tensorboard writes into the run folder's runs/",
        None,
    )
    dropbp: DropBPConfig = doc("DropBP settings", factory=DropBPConfig)
    dpo: DPOKeys = doc("preference-tuning settings (objective=dpo)", factory=DPOKeys)
    method_keys: dict = dataclasses.field(default_factory=dict, metadata={"hidden": True})  # NAME -> its keys

    def __post_init__(self) -> None:
        for name in METHODS:  # every method's keys at their defaults, so equal configs compare equal
            self.option_group(name)

    def option_group(self, name: str) -> object | None:
        """The keys of the registered method ``name`` (``lora.alpha=...`` sets them), or None for another name."""
        spec = METHODS.get(name)
        if spec is None or spec.keys is None:
            return None
        return self.method_keys.setdefault(name, spec.keys())

    def option_alias(self, key: str) -> str | None:
        """The current spelling of a key of an earlier release (``lora_alpha`` is ``lora.alpha``), else None."""
        return OLD_KEYS.get(key)

    def option_retired(self, key: str, value: object) -> bool:
        """Whether ``key`` is one of ``RETIRED_KEYS`` to skip (``options.skip_retired``)."""
        return skip_retired(RETIRED_KEYS, key, value)

    def rank(self) -> int:
        """The configured r, or the method's default."""
        return self.default_rank() if self.r is None else self.r

    def default_rank(self) -> int:
        """The method's default r for this objective."""
        spec = method_spec(self.method)
        if self.objective == "dpo" and spec.preference_defaults:
            return spec.preference_defaults[0]
        return spec.default_r or MethodSettings.r  # a method without r ignores it

    def resolved(self) -> TrainConfig:
        """A copy with the method's defaults (r, lr) written in, as a run folder records them, so a later
        release's defaults never change what a trained run was."""
        return dataclasses.replace(self, r=self.rank(), lr=self.learning_rate(),
                                   method_keys=copy.deepcopy(self.method_keys))  # fmt: skip

    def learning_rate(self) -> float:
        """The configured learning rate, or the method's default (a tenth of it for preference tuning)."""
        if self.lr is not None:
            return self.lr
        spec = method_spec(self.method)
        if self.objective == "dpo" and spec.preference_defaults:
            return spec.preference_defaults[1]
        return round(spec.default_lr / (DPO_LR_DIVISOR if self.objective == "dpo" else 1), 12)

    def uses_bf16(self) -> bool:
        """bf16 compute (see ``core.precision``): on when asked, or with 'auto' where the device has it natively."""
        from leanft.core.precision import bf16_supported

        return bf16_supported(choices.device_type()) if self.bf16 == "auto" else self.bf16 == "true"

    def precision(self) -> str:
        """The compute precision of the run and why, e.g. ``fp32: this CPU has no native bf16 (AVX2)``."""
        from leanft.core.precision import precision_choice

        return precision_choice(choices.device_type(), self.bf16)

    def base_dtype(self) -> torch.dtype:
        """The dtype the frozen base is loaded in: bf16 with bf16 compute (a 4-bit base keeps its own)."""
        import torch

        return torch.bfloat16 if self.uses_bf16() and not self.quantize else torch.float32

    def method_settings(self) -> MethodSettings:
        """What attaching the run's method needs."""
        fit_r = self.rank() == self.default_rank()  # the default, also as a run folder records it
        return MethodSettings(r=self.rank(), fit_r=fit_r, target_modules=self.target_modules,
                              seed=self.seed, keys=self.option_group(self.method))

    def validate_data(self) -> None:
        """Raise a LeanftError for data keys that cannot work together (the data itself is read later)."""
        task = builtin_task(self.data)  # a LeanftError naming the built-in tasks for an unknown builtin:NAME
        parse_columns(self.columns)
        if self.streaming and task is not None:
            raise LeanftError("streaming=true reads a data file or dataset; built-in tasks are made in memory")
        if self.streaming and self.packing:
            raise LeanftError("packing=true needs the whole dataset: turn off streaming or packing")

    def validate_method_keys(self) -> None:
        """Raise a LeanftError for a bad value among the methods' own keys (each method's ``validate``)."""
        for name in METHODS:
            keys = self.option_group(name)
            if hasattr(keys, "validate"):
                keys.validate(in_use=name == self.method)

    def validate(self) -> TrainConfig:
        """Raise a LeanftError naming the first bad value; returns self."""
        method = method_spec(self.method)  # a LeanftError naming the methods for an unknown one
        if self.lr is not None and not self.lr > 0:
            raise LeanftError(f"lr must be > 0 (or null for the method's default), got {self.lr}")
        if not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0:
            raise LeanftError(f"warmup_ratio must be in [0, 1) and weight_decay >= 0, got {self.warmup_ratio}, "
                              f"{self.weight_decay}")
        if self.resume and self.output_dir is None:
            raise LeanftError("resume=true needs output_dir=RUN_FOLDER (the run to continue)")
        self.dropbp.validate(self.batch_size)
        self.validate_method_keys()
        problem = optimizer_problem(self.optimizer) or choices.comm_hook_problem(self.ddp_comm_hook, cuda=True)
        if problem:
            raise LeanftError(problem)
        if self.ddp_comm_hook is not None and self.fsdp:
            raise LeanftError("ddp_comm_hook applies to DDP: drop it, or fsdp=true")
        if self.powersgd_rank < 1:
            raise LeanftError(f"powersgd_rank must be >= 1, got {self.powersgd_rank}")
        if self.ddp_timeout < 1:
            raise LeanftError(f"ddp_timeout must be >= 1 (seconds), got {self.ddp_timeout}")
        if self.fsdp and self.resume:
            raise LeanftError("resume=true is not supported with fsdp=true (its checkpoints hold no optimizer state)")
        if self.r is not None and self.r < 1:
            raise LeanftError(f"r must be >= 1 (or null for the method's default), got {self.r}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_seq_len", "num_eval", "save_steps",
                     "save_total_limit", "logging_steps", "num_train"):
            if getattr(self, name) < 1:
                raise LeanftError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.validate_data()
        check_objective(self)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise LeanftError(f"max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.eval_steps < 0:
            raise LeanftError(f"eval_steps must be >= 0 (0 = only before and after training), got {self.eval_steps}")
        if self.quantize is not None and self.quantize not in choices.QUANTIZE_CHOICES:
            raise LeanftError(f"quantize must be null (none) or one of {', '.join(choices.QUANTIZE_CHOICES)}, "
                              f"got {self.quantize!r}")
        if self.quantize and method.quantized is None:
            raise LeanftError(f"quantize=4bit freezes the base: use {quantized_forms()}")
        if self.compile and self.quantize:
            raise LeanftError("compile=true is not supported with quantize=4bit: use one of them")
        if self.quantize and self.fsdp:
            raise LeanftError("quantize=4bit is not supported with fsdp=true")
        if self.quantize:
            from leanft.core.quant import require_bitsandbytes

            require_bitsandbytes()
        if self.report_to is not None and self.report_to not in REPORTERS:
            raise LeanftError(f"report_to must be null (none) or one of {', '.join(REPORTERS)}, got {self.report_to!r}")
        if self.report_to is not None and importlib.util.find_spec(self.report_to) is None:
            raise LeanftError(f"report_to={self.report_to} needs the {self.report_to} package: "
                              f"pip install {self.report_to}")
        if self.bf16 not in ("auto", "true", "false"):
            raise LeanftError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        self.validate_for_this_machine()
        return self

    def validate_for_this_machine(self) -> None:
        """The checks that need torch or transformers (the device, the scheduler names): run after every other
        check, so a bad value elsewhere is reported before either is imported."""
        from transformers.trainer_utils import SchedulerType

        from leanft.core.precision import bf16_supported

        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise LeanftError(f"lr_scheduler must be one of {', '.join(schedulers)}, got {self.lr_scheduler!r}")
        device = choices.device_type()
        problem = choices.comm_hook_problem(self.ddp_comm_hook, cuda=device == "cuda")
        if problem:
            raise LeanftError(problem)
        choices.select_loss_kernel(self.loss_kernel, device)
        if self.bf16 == "true" and not bf16_supported(device):
            logger.warning("bf16=true: this device has no native bf16 matmul, so bf16 is emulated and may be slower")


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), start: TrainConfig | None = None
) -> TrainConfig:
    """A validated TrainConfig from an optional YAML file, then ``key=value`` overrides (nested: ``dropbp.rate=0``).

    Keys neither file nor overrides set keep their defaults, or their values in ``start`` when given.
    """
    config = copy.deepcopy(start) if start is not None else TrainConfig()
    if path is not None:
        source = Path(path)
        if not source.is_file():
            raise LeanftError(f"config file {source} does not exist: check the path")
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise LeanftError(f"{source} is not valid UTF-8 YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise LeanftError(f"{source} must hold a mapping of config keys")
        for key, value in data.items():
            assign(config, str(key), value, "train")
    return apply_overrides(config, overrides).validate()


def train_config(path: str | None, overrides: Sequence[str]) -> TrainConfig:
    """The validated config of ``leanft train [path] [overrides]``: with ``resume=true``, the run's saved config
    with the given keys on top (``rundir.check_resume`` checks which may change); otherwise the defaults with them."""
    config = load_config(path, overrides)
    saved_file = Path(config.output_dir or "") / RUN_CONFIG_FILE
    if not config.resume or config.output_dir is None or not saved_file.is_file():
        return config  # prepare_run_dir names what is missing
    return load_config(path, overrides, start=load_config(saved_file))


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Set ``key=value`` items (YAML values; nested keys with dots) on ``config`` in place; returns it, unvalidated."""
    return apply_items(config, overrides, "train")


def config_help() -> list[str]:
    """One line per train key: ``key (default): help``, nested groups flattened with dots, each method's own keys
    after them (``lora.alpha``)."""
    own = [line for spec in METHODS.values() if spec.keys for line in options_help(spec.keys, f"{spec.name}.")]
    return [*options_help(TrainConfig), *own]


def config_to_dict(config: TrainConfig) -> dict:
    """The config as plain nested data (for YAML / JSON): each method's keys as a group of its name."""
    data = dataclasses.asdict(config)
    data.pop("method_keys")
    groups = {name: config.option_group(name) for name in METHODS}
    return {**data, **{name: dataclasses.asdict(keys) for name, keys in groups.items() if keys is not None}}


def flat_items(config: TrainConfig) -> dict[str, object]:
    """Every key of ``config`` with its value, nested groups flattened with dots (``dropbp.rate``)."""
    flat = {}
    for key, value in config_to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            flat[key] = value
    return flat
