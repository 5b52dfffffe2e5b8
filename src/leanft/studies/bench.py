"""``leanft bench``: step time, memory and max sequence length of each method, side by side with peft LoRA.

Three phases, every model in a fresh worker process (``leanft.studies.bench_worker``) so that memory peaks never mix:

1. **memory**: one worker per method runs one step (after allocating AdamW's state) and reports its peak
   (CPU: RSS high-water mark; GPU: ``max_memory_allocated``) and the bytes saved for backward.
2. **timing**: one worker per base method (LoRA, full, PaCA) holds its model; the parent drives them in
   rounds, one step at a time, so every method runs once per round, back to back with the others. DropBP
   rates switch between steps on the same model; step ``k`` draws the controller's own seeded pattern for
   step ``k`` (the same patterns for every base at a rate). After warm-up steps of each model, figures are
   medians over rounds, and ratios are medians of per-round ratios (robust to load changing between rounds).
3. **max length**: for chosen methods, a search over sequence lengths (each probe a fresh worker) for the
   longest one whose peak fits ``mem_budget``.

Peak memory on the CPU counts what the model and training add to the process (RSS high-water mark minus
RSS before the model was loaded), the CPU analogue of ``max_memory_allocated``; "train peak" leaves out the
model, optimizer state and method set-up (RSS high-water mark minus RSS right before the measured step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from leanft.run.config import config_to_dict
from leanft.studies.bench_options import BenchPlan
from leanft.studies.bench_report import BASELINE, MIB, Method, render_table, summarize, uses_real_data
from leanft.studies.bench_worker import Case, serve

Progress = Callable[[str], None]


class WorkerFailed(RuntimeError):
    """A worker process raised, died or timed out."""


class Worker:
    """A fresh process holding one model (``bench_worker.serve``), called with ``call(op, **args)``."""

    def __init__(self, context, case: Case, timeout: float) -> None:
        self.timeout = timeout
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(case, child), daemon=True)
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
    preload = ["leanft.studies.bench_worker", "peft", "transformers.models.llama.modeling_llama"]
    if importlib.util.find_spec("bitsandbytes") is not None:  # imported before any worker measures its memory
        preload += ["bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit"]
    context.set_forkserver_preload(preload)
    return context


# -- phases ------------------------------------------------------------------------------------------------


def measure_memory(context, plan: BenchPlan, method: Method, seq_len: int) -> dict:
    """Peak memory of one step of ``method`` at ``seq_len`` in a fresh worker (``oom`` set if it ran out)."""
    case = replace(plan.case, config=plan.row_config(method), seq_len=seq_len, dropbp=method.uses_dropbp,
                   release_memory=True)
    try:
        with Worker(context, case, plan.timeout) as worker:
            reply = worker.call("memory", rate=method.rate, floor=method.floor, indices=plan.timed_indices)
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
        "optimizer_state": reply["optimizer_state"],
        "setup": reply["setup"] - start,
        "saved": reply["saved"],
        "dropped": reply["dropped"],
        "index": reply["index"],
        "process_peak": reply["peak"],
        "threads": worker.ready["threads"],
    }


def run_memory(context, plan: BenchPlan, methods: Sequence[Method], progress: Progress) -> dict[str, dict]:
    """Phase 1: each method's peak memory at the benchmark's sequence length."""
    results = {}
    for number, method in enumerate(methods, 1):
        try:
            result = measure_memory(context, plan, method, plan.seq_len)
        except WorkerFailed as error:
            result = {"seq_len": plan.seq_len, "error": str(error)}
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
    context, plan: BenchPlan, methods: Sequence[Method], progress: Progress
) -> dict[str, list[dict]]:
    """Phase 2: all base models loaded at once, stepped in rounds; returns the timed steps of each method."""
    workers_in_order = list(dict.fromkeys(method.worker for method in methods))
    order = sorted(methods, key=lambda m: (m.floor, m.rate, workers_in_order.index(m.worker)))
    timing: dict[str, list[dict]] = {method.key: [] for method in methods}
    workers: dict[str, Worker] = {}
    try:
        for method in order:  # one worker per variant, holding its model for every DropBP rate
            if method.worker not in workers:
                case = replace(plan.case, config=plan.row_config(method), dropbp=True)
                workers[method.worker] = Worker(context, case, plan.timeout)
        started = time.perf_counter()
        warm = [method for method in order if not method.uses_dropbp]  # first steps allocate and fault pages in
        for index in range(plan.untimed_steps):
            for method in warm:
                workers[method.worker].call("step", index=index)
        if plan.compile:  # compiled branches compile more graphs where branches are dropped (no grad, gradless input)
            for index in range(plan.untimed_steps):
                for method in (m for m in order if m.uses_dropbp):
                    workers[method.worker].call(
                        "step", rate=method.rate, floor=method.floor, index=index
                    )
        progress(f"[timing warm-up] {plan.untimed_steps * len(warm)} steps in {time.perf_counter() - started:.1f} s")
        for index in plan.timed_indices:
            started = time.perf_counter()
            for method in order:
                step = workers[method.worker].call(
                    "step", rate=method.rate, floor=method.floor, index=index
                )
                timing[method.key].append(step)
            elapsed = time.perf_counter() - started
            round_number = index - plan.untimed_steps + 1
            progress(f"[timing round {round_number}/{plan.rounds}] {len(order)} steps in {elapsed:.1f} s")
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
    context, plan: BenchPlan, methods: Sequence[Method], memory: dict[str, dict], progress: Progress
) -> dict[str, dict]:
    """Phase 3: the longest sequence each method trains within ``plan.budget`` bytes of peak memory."""
    results = {}
    for method in methods:
        measured: dict[int, dict] = {}
        at_seq = memory.get(method.key, {})
        if at_seq.get("peak") is not None:
            measured[plan.seq_len] = at_seq

        def fits(seq_len: int, method: Method = method, measured: dict = measured) -> bool:
            if seq_len not in measured:
                measured[seq_len] = measure_memory(context, plan, method, seq_len)
                result = measured[seq_len]
                shown = "out of memory" if "oom" in result else f"{result['peak'] / MIB:,.0f} MiB"
                progress(f"[max len] {method.label}: {seq_len} tokens -> {shown}")
            return measured[seq_len].get("peak", math.inf) <= plan.budget

        max_len, _ = max_fitting_length(fits, guess_length(at_seq, plan), plan.len_step, plan.max_len_cap)
        probes = [{"seq_len": n, "peak": r.get("peak"), "fits": r.get("peak", math.inf) <= plan.budget}
                  for n, r in sorted(measured.items())]
        results[method.key] = {"max_len": max_len, "probes": probes}
        progress(f"[max len] {method.label}: {max_len} tokens within {plan.budget / MIB:,.0f} MiB")
    return results


def guess_length(at_seq: dict, plan: BenchPlan) -> int:
    """Where the search starts: peak taken as set-up + a per-token cost measured at ``seq_len``."""
    if at_seq.get("peak") is None or at_seq["peak"] <= at_seq["setup"]:
        return plan.seq_len
    per_token = (at_seq["peak"] - at_seq["setup"]) / plan.seq_len
    return max(plan.len_step, int((plan.budget - at_seq["setup"]) / per_token))


def environment(plan: BenchPlan, threads: int | None) -> dict:
    """Where the numbers come from."""
    import torch
    import transformers

    import leanft

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "leanft": leanft.__version__, "cpu": platform.processor() or platform.machine(), "threads": threads}
    if plan.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(plan.device)
    return info


def run_bench(plan: BenchPlan, progress: Progress | None = None) -> int:
    """Run the benchmark for a resolved ``plan``: table on stdout, JSON / markdown / PNGs in ``plan.out``."""
    started = time.perf_counter()
    progress = progress or (lambda line: print(f"[{time.perf_counter() - started:4.0f}s] {line}", file=sys.stderr,
                                                flush=True))
    context = worker_context()
    tokens = plan.batch * plan.seq_len
    progress(f"leanft bench: {plan.model} on {plan.device} ({plan.dtype}), batch {plan.batch}, seq {plan.seq_len}, "
             f"r {plan.r}, {len(plan.methods)} methods")
    memory = run_memory(context, plan, plan.methods, progress)
    if plan.budget is None:  # mem_budget=auto: LoRA's peak, rounded up to 64 MiB
        reference = memory.get(BASELINE, next(iter(memory.values())))
        plan = replace(plan, budget=math.ceil(reference.get("peak", 0) / (64 * MIB)) * 64 * MIB)
    timing = run_timing(context, plan, plan.methods, progress) if plan.rounds else {}
    max_len = run_max_len(context, plan, plan.max_len_methods, memory, progress)

    rows = summarize(plan.methods, timing, memory, max_len, tokens)
    elapsed = time.perf_counter() - started
    threads = next((m["threads"] for m in memory.values() if "threads" in m), None)
    shape = (f"batches of {plan.batch} examples of {plan.config.data} (max_seq_len {plan.seq_len}; tokens/s counts "
             "their own tokens)" if uses_real_data(plan.config) else f"batch {plan.batch} x seq {plan.seq_len}")
    header = (f"leanft bench — {plan.model}, {plan.device} {plan.dtype}, {shape}, "
              f"r {plan.r}, {'chunked' if plan.config.chunked_loss else 'plain'} loss; median of {plan.rounds} rounds "
              f"after {plan.untimed_steps} untimed step(s); "
              f"memory budget {plan.budget / MIB:,.0f} MiB; {elapsed:.0f} s")
    notes = ("Ratios are medians of per-round ratios to peft LoRA. 'dropped' is the realised share of branch FLOPs "
             "skipped; 'vs interp.' compares each DropBP step with the straight line from no-drop to floor at that "
             "share. Peak memory of a DropBP method is taken on the least-dropped pattern among the timed steps.")
    text = "\n\n".join([header, render_table(rows, real_data=uses_real_data(plan.config)), notes])
    print(text)

    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text + "\n")
    config = {**dataclasses.asdict(plan.options), "budget": plan.budget, "train": config_to_dict(plan.config)}
    report = {"config": config, "environment": environment(plan, threads), "elapsed_s": elapsed, "rows": rows,
              "timing": timing, "memory": memory, "max_len": max_len}
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if plan.plots:
        from leanft.studies.bench_plot import plot_charts

        for path in plot_charts(rows, out, header.split(";")[0]):
            progress(f"wrote {path}")
    progress(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {elapsed:.0f} s")
    return 0
