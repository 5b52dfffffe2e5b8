"""``leanft bench``: step time, memory and max sequence length of each method, side by side with peft LoRA.

Three phases, every model in a fresh worker process (``leanft.bench_worker``) so that memory peaks never mix:

1. **memory**: one worker per method runs one step (after allocating AdamW's state) and reports its peak
   (CPU: RSS high-water mark; GPU: ``max_memory_allocated``) and the bytes saved for backward.
2. **timing**: one worker per base method (LoRA, full, PaCA) holds its model; the parent drives them in
   rounds, one step at a time, so every method runs once per round, back to back with the others. DropBP
   rates switch between steps on the same model; step ``k`` draws the controller's own seeded pattern for
   step ``k`` (the same patterns for every base at a rate). After warm-up steps of each model, figures are
   medians over rounds, and ratios are medians of per-round ratios (robust to load changing between rounds).
3. **max length**: for chosen methods, a search over sequence lengths (each probe a fresh worker) for the
   longest one whose peak fits ``--mem-budget``.

Peak memory on the CPU counts what the model and training add to the process (RSS high-water mark minus
RSS before the model was loaded), the CPU analogue of ``max_memory_allocated``; "train peak" leaves out the
model, optimizer state and method set-up (RSS high-water mark minus RSS right before the measured step).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing
import platform
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from leanft.bench_report import (
    BASELINE,
    MIB,
    Method,
    build_methods,
    check_targets,
    parse_method_keys,
    render_table,
    render_targets,
    summarize,
)
from leanft.bench_worker import BASES, TINY_MODEL, Case, case_dict, serve

DEFAULT_MAX_LEN = "lora,full,paca,lora+dropbp0.5,paca+dropbp0.5"
QUICK_MAX_LEN = "lora,paca,paca+dropbp0.5"
Progress = Callable[[str], None]


class WorkerFailed(RuntimeError):
    """A worker process raised, died or timed out."""


class Worker:
    """A fresh process holding one model (``bench_worker.serve``), called with ``call(op, **args)``."""

    def __init__(self, context, case: Case, timeout: float) -> None:
        self.timeout = timeout
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(case_dict(case), child), daemon=True)
        self.process.start()
        child.close()
        self.ready = self._receive()

    def _receive(self) -> dict:
        if not self.conn.poll(self.timeout):
            raise WorkerFailed(f"no answer within {self.timeout:.0f} s")
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(5)
            if self.process.exitcode == -signal.SIGKILL:
                raise WorkerFailed("worker killed (SIGKILL: out of memory?)") from None
            raise WorkerFailed(f"worker died with exit code {self.process.exitcode} (see its output above)") from None
        if "error" in reply:
            raise WorkerFailed(reply["error"].strip().splitlines()[-1] + "\n" + reply["error"])
        return reply

    def call(self, op: str, **args) -> dict:
        """Send one request and wait for its reply."""
        self.conn.send({"op": op, "args": args})
        return self._receive()

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send({"op": "exit"})
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def worker_context():
    """A fork-server context whose server has imported torch, transformers, peft and leanft once.

    As with any non-fork start method, a script that calls ``run_bench`` must do so under
    ``if __name__ == "__main__":`` (workers import the main module).
    """
    context = multiprocessing.get_context("forkserver")
    preload = ["leanft.bench_worker", "peft", "transformers.models.llama.modeling_llama"]
    if importlib.util.find_spec("bitsandbytes") is not None:  # imported before any worker measures its memory
        preload += ["bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit"]
    context.set_forkserver_preload(preload)
    return context


# -- phases ------------------------------------------------------------------------------------------------


def measure_memory(context, args: argparse.Namespace, method: Method, seq_len: int) -> dict:
    """Peak memory of one step of ``method`` at ``seq_len`` in a fresh worker (``oom`` set if it ran out)."""
    case = replace(args.case, base=method.base, seq_len=seq_len, dropbp=method.uses_dropbp, release_memory=True)
    try:
        with Worker(context, case, args.timeout) as worker:
            reply = worker.call(
                "memory", rate=method.rate, floor=method.floor, indices=args.timed_indices, chunked=method.chunked
            )
    except WorkerFailed as error:
        if "SIGKILL" not in str(error):
            raise
        return {"seq_len": seq_len, "oom": str(error).splitlines()[0]}
    if "oom" in reply:
        return {"seq_len": seq_len, "oom": reply["oom"]}
    start = worker.ready["start"]
    return {
        "seq_len": seq_len,
        "peak": reply["peak"] - start,
        "train_peak": reply["peak"] - reply["setup"],
        "setup": reply["setup"] - start,
        "saved": reply["saved"],
        "dropped": reply["dropped"],
        "index": reply["index"],
        "process_peak": reply["peak"],
        "threads": worker.ready["threads"],
    }


def run_memory(context, args: argparse.Namespace, methods: Sequence[Method], progress: Progress) -> dict[str, dict]:
    """Phase 1: each method's peak memory at the benchmark's sequence length."""
    results = {}
    for number, method in enumerate(methods, 1):
        try:
            result = measure_memory(context, args, method, args.seq_len)
        except WorkerFailed as error:
            result = {"seq_len": args.seq_len, "error": str(error)}
        results[method.key] = result
        if "peak" not in result:
            problem = result.get("oom") or result["error"]
            progress(f"[memory {number}/{len(methods)}] {method.label}: failed: {problem.splitlines()[0]}")
            continue
        progress(
            f"[memory {number}/{len(methods)}] {method.label}: peak {result['peak'] / MIB:,.0f} MiB "
            f"(training {result['train_peak'] / MIB:,.0f} MiB), saved for backward {result['saved'] / MIB:,.0f} MiB"
        )
    return results


def run_timing(
    context, args: argparse.Namespace, methods: Sequence[Method], progress: Progress
) -> dict[str, list[dict]]:
    """Phase 2: all base models loaded at once, stepped in rounds; returns the timed steps of each method."""
    bases = [base for base in BASES if any(method.base == base for method in methods)]
    order = sorted(methods, key=lambda m: (m.floor, m.rate, bases.index(m.base)))
    timing: dict[str, list[dict]] = {method.key: [] for method in methods}
    workers: dict[str, Worker] = {}
    try:
        for base in bases:
            workers[base] = Worker(context, replace(args.case, base=base, dropbp=True), args.timeout)
        started = time.perf_counter()
        warm = [method for method in order if not method.uses_dropbp]  # first steps allocate and fault pages in
        for index in range(args.warmup):
            for method in warm:
                workers[method.base].call("step", index=index, chunked=method.chunked)
        progress(f"[timing warm-up] {args.warmup * len(warm)} steps in {time.perf_counter() - started:.1f} s")
        for index in args.timed_indices:
            started = time.perf_counter()
            for method in order:
                step = workers[method.base].call(
                    "step", rate=method.rate, floor=method.floor, index=index, chunked=method.chunked
                )
                timing[method.key].append(step)
            elapsed = time.perf_counter() - started
            progress(f"[timing round {index - args.warmup + 1}/{args.rounds}] {len(order)} steps in {elapsed:.1f} s")
    finally:
        for worker in workers.values():
            worker.close()
    for method in methods:
        seconds = sorted(step["seconds"] for step in timing[method.key])
        if seconds:
            progress(f"[timing] {method.label}: median {seconds[len(seconds) // 2]:.3f} s/step")
    return timing


def max_fitting_length(fits: Callable[[int], bool], guess: int, step: int, cap: int) -> tuple[int, dict[int, bool]]:
    """Longest multiple of ``step`` up to ``cap`` for which ``fits`` holds (0 if none), assuming monotone ``fits``.

    Gallops from ``guess`` (doubling the stride) until one length fits and a longer one does not, then
    bisects between them. Returns the length and every probe made (length -> fits).
    """
    probes: dict[int, bool] = {}

    def fits_units(units: int) -> bool:
        if units * step not in probes:
            probes[units * step] = fits(units * step)
        return probes[units * step]

    top = cap // step
    if top < 1:
        return 0, probes
    known_good, known_bad = 0, top + 1  # invariant: known_good fits (0 trivially), known_bad does not
    current = min(max(round(guess / step), 1), top)
    stride = max(1, current // 4)
    while known_bad - known_good > 1 and (known_good == 0 or known_bad == top + 1):
        if fits_units(current):
            known_good = current
            current = min(current + stride, known_bad - 1)
        else:
            known_bad = current
            current = max(current - stride, known_good + 1)
        stride *= 2
        if current in (known_good, known_bad):
            break
    while known_bad - known_good > 1:
        middle = (known_good + known_bad) // 2
        if fits_units(middle):
            known_good = middle
        else:
            known_bad = middle
    return known_good * step, probes


def run_max_len(
    context, args: argparse.Namespace, methods: Sequence[Method], memory: dict[str, dict], progress: Progress
) -> dict[str, dict]:
    """Phase 3: the longest sequence each method trains within ``args.budget`` bytes of peak memory."""
    results = {}
    for method in methods:
        measured: dict[int, dict] = {}
        at_seq = memory.get(method.key, {})
        if at_seq.get("peak") is not None:
            measured[args.seq_len] = at_seq

        def fits(seq_len: int, method: Method = method, measured: dict = measured) -> bool:
            if seq_len not in measured:
                measured[seq_len] = measure_memory(context, args, method, seq_len)
                result = measured[seq_len]
                shown = "out of memory" if "oom" in result else f"{result['peak'] / MIB:,.0f} MiB"
                progress(f"[max len] {method.label}: {seq_len} tokens -> {shown}")
            return measured[seq_len].get("peak", math.inf) <= args.budget

        max_len, _ = max_fitting_length(fits, guess_length(at_seq, args), args.len_step, args.max_len_cap)
        probes = [{"seq_len": n, "peak": r.get("peak"), "fits": r.get("peak", math.inf) <= args.budget}
                  for n, r in sorted(measured.items())]
        results[method.key] = {"max_len": max_len, "probes": probes}
        progress(f"[max len] {method.label}: {max_len} tokens within {args.budget / MIB:,.0f} MiB")
    return results


def guess_length(at_seq: dict, args: argparse.Namespace) -> int:
    """Where the search starts: peak taken as set-up + a per-token cost measured at ``--seq-len``."""
    if at_seq.get("peak") is None or at_seq["peak"] <= at_seq["setup"]:
        return args.seq_len
    per_token = (at_seq["peak"] - at_seq["setup"]) / args.seq_len
    return max(args.len_step, int((args.budget - at_seq["setup"]) / per_token))


# -- command line ------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"1500MiB"``, ``"3e9"`` -> bytes (K/M/G units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 2GB or 1500MiB)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``leanft bench``'s options to ``parser`` (defaults depend on the device and ``--quick``)."""
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, a smoke test that takes < 60 s")
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (CPU default 4, GPU 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (CPU default 256, GPU 1024)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank = PaCA columns per layer")
    parser.add_argument("--bases", default="lora,full,paca", help=f"base methods: any of {','.join(BASES)}")
    parser.add_argument("--chunked", action="store_true", help="also run every method with the chunked loss")
    parser.add_argument("--rates", default="0.25,0.5,0.75", help="DropBP rates ('' for none)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step of each method; 0 = skip)")
    parser.add_argument(
        "--warmup", type=int, default=2,
        help="untimed steps of each model first (the 2nd pays PaCA's one-off copy-on-write of mmapped weights)",
    )
    parser.add_argument("--mem-budget", default="auto", help="e.g. 2GB; auto = LoRA's peak at --seq-len")
    parser.add_argument("--max-len-methods", default=None, help=f"method keys, all or none ({DEFAULT_MAX_LEN})")
    parser.add_argument("--len-step", type=int, default=None, help="granularity of the length search")
    parser.add_argument("--max-len-cap", type=int, default=None, help="longest length probed (default 8x seq)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 CPU, bfloat16 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one worker reply")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and charts")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill device-dependent defaults and derived settings (``args.case``, ``args.timed_indices``)."""
    import torch

    gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.quick:  # one thread: a tiny model's many small ops gain nothing from more, and CI boxes are shared
        args.model = args.model or TINY_MODEL
        args.batch, args.seq_len = args.batch or 2, args.seq_len or 128
        args.threads = args.threads or 1
        args.max_len_methods = args.max_len_methods or QUICK_MAX_LEN
    args.max_len_methods = args.max_len_methods or DEFAULT_MAX_LEN
    args.model = args.model or "default"
    args.batch = args.batch or (8 if gpu else 4)
    args.seq_len = args.seq_len or (1024 if gpu else 256)
    args.len_step = args.len_step or max(8, args.seq_len // 8)
    args.max_len_cap = args.max_len_cap or 8 * args.seq_len
    bases = [base.strip() for base in args.bases.split(",") if base.strip()]
    if not bases or any(base not in BASES for base in bases):
        raise SystemExit(f"--bases must name some of {', '.join(BASES)}, got {args.bases!r}")
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    if any(not 0 < rate < 1 for rate in rates):
        raise SystemExit(f"--rates must lie in (0, 1), got {args.rates!r}")
    args.methods = build_methods(bases, rates, chunked=args.chunked)
    args.case = Case(model=args.model, r=args.r, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                     device=args.device, dtype=args.dtype, threads=args.threads or 0)
    args.timed_indices = list(range(args.warmup, args.warmup + args.rounds))
    return args


def environment(args: argparse.Namespace, threads: int | None) -> dict:
    """Where the numbers come from."""
    import torch
    import transformers

    import leanft

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "leanft": leanft.__version__, "cpu": platform.processor() or platform.machine(), "threads": threads}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def run_bench(args: argparse.Namespace, progress: Progress | None = None) -> int:
    """Run the benchmark for parsed ``args``: table on stdout, JSON / markdown / PNGs in ``args.out``."""
    started = time.perf_counter()
    progress = progress or (lambda line: print(f"[{time.perf_counter() - started:4.0f}s] {line}", file=sys.stderr,
                                                flush=True))
    args = resolve_defaults(args)
    context = worker_context()
    tokens = args.batch * args.seq_len
    progress(f"leanft bench: {args.model} on {args.device} ({args.dtype}), batch {args.batch}, seq {args.seq_len}, "
             f"r {args.r}, {len(args.methods)} methods")
    memory = run_memory(context, args, args.methods, progress)
    if args.mem_budget == "auto":
        reference = memory.get(BASELINE, next(iter(memory.values())))
        args.budget = math.ceil(reference.get("peak", 0) / (64 * MIB)) * 64 * MIB
    else:
        args.budget = parse_bytes(args.mem_budget)
    timing = run_timing(context, args, args.methods, progress) if args.rounds else {}
    searched = parse_method_keys(args.max_len_methods, args.methods)
    max_len = run_max_len(context, args, searched, memory, progress)

    rows = summarize(args.methods, timing, memory, max_len, tokens)
    targets = check_targets(rows)
    elapsed = time.perf_counter() - started
    threads = next((m["threads"] for m in memory.values() if "threads" in m), None)
    header = (f"leanft bench — {args.model}, {args.device} {args.dtype}, batch {args.batch} x seq {args.seq_len}, "
              f"r {args.r}; median of {args.rounds} rounds after {args.warmup} warm-up step(s); "
              f"memory budget {args.budget / MIB:,.0f} MiB; {elapsed:.0f} s")
    notes = ("Ratios are medians of per-round ratios to peft LoRA. 'dropped' is the realised share of branch FLOPs "
             "skipped; 'vs interp.' compares each DropBP step with the straight line from no-drop to floor at that "
             "share. Peak memory of a DropBP method is taken on the least-dropped pattern among the timed steps.")
    scope = "" if args.model == "default" else " (set for the embedded SmolLM2 on a CPU: indicative only here)"
    targets_text = f"Targets (issues #4, #7){scope}:\n" + render_targets(targets)
    text = "\n\n".join([header, render_table(rows), notes, targets_text])
    print(text)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text + "\n")
    config = {key: value for key, value in vars(args).items() if key not in ("methods", "case", "func")}
    report = {"config": config, "environment": environment(args, threads), "elapsed_s": elapsed, "rows": rows,
              "targets": targets, "timing": timing, "memory": memory, "max_len": max_len}
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.no_plots:
        from leanft.bench_plot import plot_charts

        for path in plot_charts(rows, out, header.split(";")[0]):
            progress(f"wrote {path}")
    progress(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {elapsed:.0f} s")
    return 0


def main_bench(argv: Sequence[str] | None = None) -> int:
    """``leanft bench`` / ``python -m leanft.bench`` entry point."""
    parser = add_bench_arguments(argparse.ArgumentParser(prog="leanft bench", description=__doc__.splitlines()[0]))
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_bench())
