"""``leanft bench``'s options, declared like the train config, and the plan they resolve to before any work starts.

Every option is checked here (bases, rates, method keys, the memory budget, numbers, device, dtype), so a bad one
ends with one line before the first worker starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from leanft.core.errors import LeanftError
from leanft.core.precision import bf16_supported
from leanft.run.optimizers import optimizer_problem
from leanft.run.options import apply_items, doc
from leanft.studies.bench_report import PEER_DTYPE, Method, build_methods, parse_method_keys
from leanft.studies.bench_worker import BASES, TINY_MODEL, Case

DEFAULT_MAX_LEN = "lora,full,paca,lora+dropbp0.5,paca+dropbp0.5"
QUICK_MAX_LEN = "lora,paca,paca+dropbp0.5"
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class BenchOptions:
    """The keys of ``leanft bench`` (defaults that depend on the device or ``quick`` are null here)."""

    quick: bool = doc("a tiny random Llama: a smoke test that takes under a minute", False)
    model: str | None = doc("model spec; null = the embedded SmolLM2-135M-Instruct (quick: a tiny random Llama)", None)
    batch: int | None = doc("batch size; null = 4 on a CPU, 8 on a GPU (quick: 2)", None)
    seq_len: int | None = doc("sequence length; null = 256 on a CPU, 1024 on a GPU (quick: 128)", None)
    r: int = doc("LoRA rank = PaCA columns per layer", 8)
    bases: str = doc(f"comma-separated base methods, any of {','.join(BASES)}", "lora,full,paca")
    chunked: bool = doc("also run every method with the chunked loss", False)
    optimizers: str = doc(
        "comma-separated optimizers besides AdamW (apollo, apollo-mini): each adds every base, alone and at every "
        "DropBP rate, with that optimizer (e.g. bases=full optimizers=apollo)",
        "",
    )
    compile: bool = doc("torch.compile each attention and MLP branch, as train's compile=true", False)
    rates: str = doc("comma-separated DropBP rates, each in (0, 1); empty for none", "0.25,0.5,0.75")
    rounds: int = doc("timed rounds, one step of each method per round; 0 = no timing", 3)
    warmup: int = doc("untimed steps of each model first (the 2nd pays PaCA's one-off copy of mapped weights)", 2)
    mem_budget: str = doc("memory budget of the length search, e.g. 2GB; auto = LoRA's peak at seq_len", "auto")
    max_len_methods: str | None = doc(f"method keys for the length search, all, or off; null = {DEFAULT_MAX_LEN}", None)
    len_step: int | None = doc("granularity of the length search; null = seq_len / 8", None)
    max_len_cap: int | None = doc("longest length probed; null = 8 x seq_len", None)
    device: str | None = doc("cpu or cuda; null = cuda where available", None)
    dtype: str | None = doc(
        f"one of {', '.join(DTYPES)}; null = bfloat16 where the device computes it natively (as train's bf16=auto), "
        "else float32",
        None,
    )
    peer: bool = doc("if dtype is not float32, also time peft LoRA in float32, as transformers' defaults run it", True)
    threads: int | None = doc("torch CPU threads per worker; null = all cores (quick: 1)", None)
    seed: int = doc("seed of the batch, the method set-up and the drop patterns", 0)
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


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"1500MiB"``, ``"3e9"`` -> bytes (K/M/G units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise LeanftError(f"mem_budget must be a memory size such as 2GB or 1500MiB, or auto; got {text!r}")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _parse_optimizers(text: str | None) -> list[str]:
    names = [name.strip() for name in str(text or "").split(",") if name.strip()]
    for name in names:
        problem = "adamw runs in every row: name only others" if name == "adamw" else optimizer_problem(name)
        if problem:
            raise LeanftError(f"optimizers: {problem}")
    return names


def _parse_rates(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in str(text).split(",") if rate.strip()]
    except ValueError:
        rates = None
    if rates is None or any(not 0 < rate < 1 for rate in rates):
        raise LeanftError(f"rates must be comma-separated numbers in (0, 1), got {text!r}")
    return rates


def _check_numbers(options: BenchOptions) -> None:
    positive = ("batch", "seq_len", "r", "len_step", "max_len_cap", "threads")
    for name in positive:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise LeanftError(f"{name} must be >= 1, got {value}")
    for name in ("rounds", "warmup"):
        if getattr(options, name) < 0:
            raise LeanftError(f"{name} must be >= 0, got {getattr(options, name)}")
    if options.timeout <= 0:
        raise LeanftError(f"timeout must be > 0 seconds, got {options.timeout}")
    if options.device is not None and options.device != "cpu" and not options.device.startswith("cuda"):
        raise LeanftError(f"device must be cpu or cuda[:N], got {options.device!r}")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise LeanftError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")


def resolve(options: BenchOptions) -> BenchPlan:
    """Check every option and fill the defaults that depend on the device and ``quick``."""
    import torch

    _check_numbers(options)
    bases = [base.strip() for base in options.bases.split(",") if base.strip()]
    if not bases or any(base not in BASES for base in bases):
        raise LeanftError(f"bases must name some of {', '.join(BASES)}, got {options.bases!r}")
    budget = None if options.mem_budget == "auto" else parse_bytes(options.mem_budget)
    gpu = torch.cuda.is_available() if options.device is None else options.device.startswith("cuda")
    quick = options.quick
    filled = dataclasses.replace(
        options,
        model=options.model or (TINY_MODEL if quick else "default"),
        device=options.device or ("cuda" if gpu else "cpu"),
        dtype=options.dtype or ("bfloat16" if bf16_supported("cuda" if gpu else "cpu") else "float32"),
        batch=options.batch or (2 if quick else 8 if gpu else 4),
        seq_len=options.seq_len or (128 if quick else 1024 if gpu else 256),
        threads=options.threads or (1 if quick else None),  # a tiny model's small ops gain nothing from more
        max_len_methods=options.max_len_methods if options.max_len_methods is not None else (
            QUICK_MAX_LEN if quick else DEFAULT_MAX_LEN),
    )
    filled.len_step = filled.len_step or max(8, filled.seq_len // 8)
    filled.max_len_cap = filled.max_len_cap or 8 * filled.seq_len
    peer = options.peer and filled.dtype != PEER_DTYPE
    methods = build_methods(bases, _parse_rates(options.rates), chunked=options.chunked, peer=peer,
                            optimizers=_parse_optimizers(options.optimizers))
    try:
        searched = parse_method_keys(filled.max_len_methods, methods)
    except ValueError as error:
        raise LeanftError(f"max_len_methods: {error}") from None
    case = Case(model=filled.model, r=filled.r, batch=filled.batch, seq_len=filled.seq_len, seed=filled.seed,
                device=filled.device, dtype=filled.dtype, threads=filled.threads or 0, compile=filled.compile)
    timed = list(range(filled.warmup, filled.warmup + filled.rounds))
    return BenchPlan(filled, methods, searched, case, timed, budget)


def parse_bench_options(items: Sequence[str]) -> BenchPlan:
    """The plan of ``leanft bench key=value ...``; a LeanftError names the first bad option."""
    return resolve(apply_items(BenchOptions(), list(items), "bench"))
