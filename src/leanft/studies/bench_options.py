"""``leanft bench [CONFIG.yaml] [train keys] [bench keys]``: its own keys, declared like the train config, and the
plan they resolve to before any work starts.

The model, batch, length, precision, r, seed, loss, compile and DropBP sampler are train's keys (``batch_size``,
``max_seq_len``, ``bf16``, ...), read and validated by train's own parser, so a bench row is set up as ``leanft
train`` sets up that config. With train's ``data=`` (a file or dataset, not a built-in task) the rows train on
that data's batches instead of a fixed random one, padded or padding-free as each row's ``padding_free`` says.
Every option is checked here, so a bad one ends with one line before the first worker starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from leanft.core.errors import LeanftError
from leanft.run.config import TrainConfig, load_config
from leanft.run.options import apply_items, doc, split_config_path, split_items
from leanft.studies.bench_report import TINY_MODEL, Method, build_methods, parse_method_keys, uses_real_data
from leanft.studies.variants import (
    EXAMPLES,
    parse_variants,
    study_variants,
    variant_base,
    variant_items,
    variant_name,
    variant_overrides,
    variant_train_config,
)

if TYPE_CHECKING:
    from leanft.studies.bench_worker import Case


DEFAULT_MAX_LEN = "lora,full,paca,lora+dropbp-uniform:rate=0.5,paca+dropbp-uniform:rate=0.5"
QUICK_MAX_LEN = "lora,paca,paca+dropbp-uniform:rate=0.5"
RENAMED = {  # bench's earlier spellings of train's keys and of its own, and what to pass instead
    "batch": "batch_size= (train's key)", "seq_len": "max_seq_len= (train's key)",
    "dtype": "bf16=true|false|auto (train's key)", "chunked": "chunked_loss= (train's key; every row runs it)",
    "warmup": "untimed_steps=", "bases": "variants= (leanft compare's grammar, e.g. lora,paca,paca:quantize=4bit)",
    "optimizers": "a variant's key: variants=full,full:optimizer=apollo",
}
QUICK_TRAIN_KEYS = {"model": TINY_MODEL, "batch_size": 2, "max_seq_len": 128}  # quick's defaults of train keys


@dataclasses.dataclass
class BenchOptions:
    """The keys of ``leanft bench`` (defaults that depend on the device or ``quick`` are null here)."""

    quick: bool = doc(
        "a tiny random Llama, batch 2 x 128 tokens unless model / batch_size / max_seq_len are given: a smoke test "
        "that takes under a minute",
        False,
    )
    variants: str = doc(
        "comma-separated variants in leanft compare's grammar, METHOD[+dropbp-uniform][:KEY=VALUE...], from "
        + ", ".join(name for name in study_variants() if not name.endswith("+dropbp")) + ", e.g. " + EXAMPLES
        + " (every row is set up as leanft train sets up that config; DropBP rows at uniform rates)",
        "lora,full,paca",
    )
    rates: str = doc("comma-separated DropBP rates, each in (0, 1), at which every variant without DropBP also runs "
                     "(and its floor, every branch dropped); empty for none", "0.25,0.5,0.75")
    rounds: int = doc("timed rounds, one step of each method per round; 0 = no timing", 3)
    untimed_steps: int = doc("steps of each model before the timed rounds (the 2nd pays PaCA's one-off copy)", 2)
    mem_budget: str = doc("memory budget of the length search, e.g. 2GB; auto = LoRA's peak at seq_len", "auto")
    max_len_methods: str | None = doc(
        f"row names for the length search, all, or off; null = those of {DEFAULT_MAX_LEN} (quick: {QUICK_MAX_LEN}) "
        "that run", None)
    len_step: int | None = doc("granularity of the length search; null = seq_len / 8", None)
    max_len_cap: int | None = doc("longest length probed; null = 8 x seq_len", None)
    device: str | None = doc("cpu or cuda; null = cuda where available", None)
    peer: bool = doc("with bf16 compute, also time peft LoRA in float32, as transformers' defaults run it", True)
    threads: int | None = doc("torch CPU threads per worker; null = all cores (quick: 1)", None)
    timeout: float = doc("seconds to wait for one worker reply", 900.0)
    out: str = doc("folder for bench.json, bench.md and the charts", "bench-results")
    plots: bool = doc("draw the PNG charts", True)


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """The resolved options: every default filled in, the methods to run and the first worker's case."""

    options: BenchOptions
    methods: list[Method]
    max_len_methods: list[Method]
    case: Case
    timed_indices: list[int]
    budget: int | None  # bytes; None = LoRA's measured peak (mem_budget=auto)

    def __getattr__(self, name: str):
        return getattr(self.options, name)

    @property
    def config(self) -> TrainConfig:
        """The train config every row is set up from."""
        return self.case.config

    @property
    def model(self) -> str:
        """The model spec of every row."""
        return self.case.config.model or "default"

    @property
    def batch(self) -> int:
        """Examples per step (train's batch_size)."""
        return self.case.batch

    @property
    def seq_len(self) -> int:
        """Tokens per example (train's max_seq_len)."""
        return self.case.seq_len

    @property
    def dtype(self) -> str:
        """The compute precision of every row but the float32 peer: float32 or bfloat16 (train's bf16)."""
        return "bfloat16" if self.config.bf16 == "true" else "float32"

    def row_config(self, method: Method) -> TrainConfig:
        """The train config of ``method``'s worker: the bench's config as its variant sets it (DropBP off: the
        worker's controller takes each step's rate)."""
        return variant_train_config(self.config, method.worker)

    @property
    def compile(self) -> bool:
        """Whether the branches are compiled (train's compile)."""
        return self.config.compile

    @property
    def r(self) -> str:
        """r as the rows use it: the config's, or each method's default."""
        return str(self.config.r) if self.config.r is not None else "per method"


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"1500MiB"``, ``"3e9"`` -> bytes (K/M/G units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise LeanftError(f"mem_budget must be a memory size such as 2GB or 1500MiB, or auto; got {text!r}")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _bench_variants(text: str, config: TrainConfig) -> tuple[list[str], list[Method]]:
    """(the variants without DropBP, the uniform-DropBP rows asked for by name), each checked against ``config``."""
    plain, dropping = [], []
    for name in parse_variants(text):
        base = variant_base(name)
        if base.endswith("+dropbp"):
            raise LeanftError(f"variant {name!r}: bench times uniform rates, not allocated ones: use {base}-uniform")
        row = variant_train_config(config, name)  # a bad key is refused here, before any worker starts
        spelled = dict(zip(variant_items(name), variant_overrides(name), strict=True))
        dropbp = [key for key in spelled.values() if key.startswith("dropbp.")]
        if any(not key.startswith("dropbp.rate=") for key in dropbp) or not isinstance(row.dropbp.rate, float):
            raise LeanftError(f"variant {name!r}: bench's DropBP rows take only a rate= in (0, 1)")
        method = variant_name(row.method, [item for item, key in spelled.items() if not key.startswith("dropbp.")])
        if base.endswith("+dropbp-uniform"):
            dropping.append(Method(method, row.dropbp.rate))
        else:
            plain.append(method)
    return plain, dropping


def _parse_rates(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in str(text).split(",") if rate.strip()]
    except ValueError:
        rates = None
    if rates is None or any(not 0 < rate < 1 for rate in rates):
        raise LeanftError(f"rates must be comma-separated numbers in (0, 1), got {text!r}")
    return rates


def _check_numbers(options: BenchOptions) -> None:
    positive = ("len_step", "max_len_cap", "threads")
    for name in positive:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise LeanftError(f"{name} must be >= 1, got {value}")
    for name in ("rounds", "untimed_steps"):
        if getattr(options, name) < 0:
            raise LeanftError(f"{name} must be >= 0, got {getattr(options, name)}")
    if options.timeout <= 0:
        raise LeanftError(f"timeout must be > 0 seconds, got {options.timeout}")
    if options.device is not None and options.device != "cpu" and not options.device.startswith("cuda"):
        raise LeanftError(f"device must be cpu or cuda[:N], got {options.device!r}")


def _train_config(path: str | None, items: Sequence[str], quick: bool) -> TrainConfig:
    """The validated train config of the bench: with ``quick``, its small defaults where a key is not given."""
    given = {item.partition("=")[0].strip() for item in items}
    defaults = [f"{key}={value}" for key, value in QUICK_TRAIN_KEYS.items() if quick and key not in given]
    config = load_config(path, [*defaults, *items])
    if uses_real_data(config) and config.model == TINY_MODEL:
        raise LeanftError(f"data={config.data} needs a model with a tokenizer: pass model=... (quick's tiny model "
                          "has none)")
    if uses_real_data(config) and config.streaming:
        raise LeanftError("bench reads its data= whole: use streaming=false")
    return config


def resolve(options: BenchOptions, config: TrainConfig) -> BenchPlan:
    """Check every option and fill the defaults that depend on the device and ``quick``."""
    import torch

    from leanft.core.precision import bf16_supported
    from leanft.studies.bench_worker import Case

    _check_numbers(options)
    budget = None if options.mem_budget == "auto" else parse_bytes(options.mem_budget)
    gpu = torch.cuda.is_available() if options.device is None else options.device.startswith("cuda")
    device = options.device or ("cuda" if gpu else "cpu")
    native = bf16_supported("cuda" if gpu else "cpu")
    bf16 = config.bf16 == "true" or (config.bf16 == "auto" and native)
    config = dataclasses.replace(config, bf16="true" if bf16 else "false")  # resolved for the bench's device
    quick = options.quick
    filled = dataclasses.replace(
        options,
        device=device,
        threads=options.threads or (1 if quick else None),  # a tiny model's small ops gain nothing from more
    )
    filled.len_step = filled.len_step or max(8, config.max_seq_len // 8)
    filled.max_len_cap = filled.max_len_cap or 8 * config.max_seq_len
    plain, dropping = _bench_variants(options.variants, config)
    methods = build_methods(plain, _parse_rates(options.rates), peer=options.peer and bf16)
    methods = list({method.key: method for method in [*methods, *dropping]}.values())
    if filled.max_len_methods is None:  # those of the default list that this bench runs
        default = (QUICK_MAX_LEN if quick else DEFAULT_MAX_LEN).split(",")
        filled.max_len_methods = ",".join(m.key for m in methods if m.key in default) or "off"
    try:
        searched = parse_method_keys(filled.max_len_methods, methods)
    except ValueError as error:
        raise LeanftError(f"max_len_methods: {error}") from None
    case = Case(config=config, batch=config.batch_size, seq_len=config.max_seq_len, device=device,
                threads=filled.threads or 0)
    timed = list(range(filled.untimed_steps, filled.untimed_steps + filled.rounds))
    return BenchPlan(filled, methods, searched, case, timed, budget)


def parse_bench_options(items: Sequence[str]) -> BenchPlan:
    """The plan of ``leanft bench [CONFIG.yaml] key=value ...``; a LeanftError names the first bad option."""
    path, items = split_config_path(items)
    for item in items:
        key = item.partition("=")[0].strip()
        if key in RENAMED:
            raise LeanftError(f"bench's {key}= is now {RENAMED[key]}: pass that instead")
    own, train = split_items(BenchOptions, items)
    options = apply_items(BenchOptions(), own, "bench")
    return resolve(options, _train_config(path, train, options.quick))
