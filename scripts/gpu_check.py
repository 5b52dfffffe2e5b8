"""One GPU check in one command: the CUDA tests, ``leanft bench`` and ``leanft compare``, each under a time limit,
with every result in one folder (at most 8 files, so a short GPU lease brings all of it back).

Run as ``make gpu-check`` (or ``bash scripts/gpu_check.sh``). Without CUDA it rehearses: the CUDA tests are
collected and skipped and the bench and compare run on the CPU, so a GPU window is spent measuring, not
debugging. ``--quick --model DIR --data FILE`` makes the rehearsal take about a minute (the test suite runs it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "gguf", "bitsandbytes",
            "cut-cross-entropy", "liger-kernel", "apollo-torch", "triton")  # fmt: skip


def versions() -> dict:
    """The machine and the versions of what leanft uses (None: not installed)."""
    import torch

    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "packages": found,
    }


def run_step(name: str, command: list[str], limit_s: float, log) -> dict:
    """Run ``command`` (output into ``log``) for at most ``limit_s`` seconds; its exit code and time."""
    print(f"== {name}: {' '.join(command)}", file=log, flush=True)
    start = time.monotonic()
    try:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = round(time.monotonic() - start, 1)
    print(f"== {name}: exit {code} after {seconds} s", file=log, flush=True)
    return {"step": name, "exit": code, "seconds": seconds}


def leanft(*args: str) -> list[str]:
    return [sys.executable, "-m", "leanft", *args]


def plan(args: argparse.Namespace, work: Path) -> list[tuple[str, list[str], float]]:
    """The three steps with their time limits: together they stay within 8 minutes."""
    tests = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             f"--junitxml={work / 'cuda_tests.xml'}", "tests/test_cuda.py"]  # fmt: skip
    model = [f"model={args.model}"] if args.model else []
    if args.quick:
        bench = leanft("bench", "quick=true", "variants=lora,paca", "rates=0.5", "rounds=1", "untimed_steps=1",
                       "max_len_methods=paca+dropbp-uniform:rate=0.5", "max_len_cap=256", *model)  # fmt: skip
    else:  # batch 4 x 1024, QPaCA, the floors, and the length search up to 16k tokens
        searched = "lora,paca,paca+dropbp-uniform:rate=0.5,paca+dropbp-uniform:quantize=4bit:rate=0.5"
        bench = leanft("bench", "variants=lora,paca,paca:quantize=4bit", "rates=0.5", "batch_size=4",
                       "max_seq_len=1024", "rounds=5", "max_len_cap=16384", f"max_len_methods={searched}", *model)
    bench.append(f"out={work / 'bench'}")
    compare = leanft("compare", "variants=lora,paca,paca+dropbp", f"max_steps={4 if args.quick else 80}",
                     f"output_dir={work / 'compare'}", *model, *([f"data={args.data}"] if args.data else []))
    if args.quick:
        compare += ["batch_size=4", "eval_every=2", "num_eval=4", "max_new_tokens=4"]
    return [("cuda-tests", tests, 150), ("bench", bench, 180), ("compare", compare, 150)]


KEPT = {  # what comes back, at most 8 files: (folder under the work folder, file)
    "cuda_tests.xml": ".", "bench.json": "bench", "bench.md": "bench", "compare.json": "compare",
    "compare.md": "compare", "compare_loss.png": "compare",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every step passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-results", help="results folder")
    parser.add_argument("--quick", action="store_true", help="a tiny bench and a 4-step compare (rehearsal)")
    parser.add_argument("--model", help="model spec for bench and compare (default: the embedded default model)")
    parser.add_argument("--data", help="data for compare (default: the built-in date task)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": versions(), "steps": []}
    with tempfile.TemporaryDirectory(prefix="leanft-gpu-check-") as folder, open(out / "gpu_check.log", "w") as log:
        work = Path(folder)
        for name, command, limit in plan(args, work):
            report["steps"].append(run_step(name, command, limit, log))
        for name, kept_in in KEPT.items():
            if (work / kept_in / name).is_file():
                shutil.copy(work / kept_in / name, out / name)
    report["passed"] = all(step["exit"] == 0 for step in report["steps"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["steps"]), "passed" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
