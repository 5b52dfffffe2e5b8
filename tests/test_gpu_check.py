"""`make gpu-check` rehearsed where the tests run: every step passes (the CUDA tests collected, and skipped without
CUDA), the results fit what a short GPU lease brings back, and carried bundle parts are checked and installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_the_gpu_check_rehearsal_passes_and_brings_back_at_most_8_files(model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = gpu_check("--quick", f"--model={model_dir}", f"--data={data_file}", OUT=str(out),
                       STAGE=str(tmp_path / "stage"), BUNDLE=str(tmp_path / "none"))  # fmt: skip
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else result.stderr
    assert result.returncode == 0, log[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [step["step"] for step in report["steps"]] == ["cuda-tests", "bench", "compare"] and report["passed"]
    assert report["machine"]["packages"]["torch"] == torch.__version__
    suite = ElementTree.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    collected, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert collected >= 15
    if not torch.cuda.is_available():
        assert skipped == collected  # collected everywhere, run only with CUDA
    assert {"bench.json", "bench.md", "compare.json", "compare.md"} <= {path.name for path in out.iterdir()}
    assert len(list(out.iterdir())) <= 8 and all(path.is_file() for path in out.iterdir())
    compare = json.loads((out / "compare.json").read_text())
    assert [row["variant"] for row in compare["variants"]] == ["lora", "paca", "paca+dropbp"]


def tiny_wheel(folder: Path) -> Path:
    """A wheel holding one module, ``leanft_probe`` (``VALUE = 42``)."""
    path = folder / "leanft_probe-1.0-py3-none-any.whl"
    info = "leanft_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("leanft_probe.py", "VALUE = 42\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: leanft-probe\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_bundle_parts_are_staged_across_calls_then_installed(tmp_path):
    (tmp_path / "wheels").mkdir()
    tiny_wheel(tmp_path / "wheels")
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(tmp_path / "bundle.tar"), "wheels"], check=True)
    data = (tmp_path / "bundle.tar").read_bytes()
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, index, piece in ((first, 0, data[:5000]), (second, 1, data[5000:])):
        folder.mkdir()
        (folder / f"part-{index}-of-2").write_bytes(piece)
    stage = str(tmp_path / "stage")
    assert gpu_check("stage", STAGE=stage, BUNDLE=str(first)).returncode == 0  # the first call keeps its part
    early = gpu_check("--help", STAGE=stage, BUNDLE=str(tmp_path / "none"))
    assert early.returncode == 2 and "holds 1 of the bundle's 2 parts" in early.stderr
    done = gpu_check("--help", STAGE=stage, BUNDLE=str(second))
    assert done.returncode == 0, done.stderr
    environment = {**os.environ, "PYTHONPATH": f"{stage}/site"}
    probe = subprocess.run([sys.executable, "-c", "import leanft_probe; print(leanft_probe.VALUE)"],
                           env=environment, capture_output=True, text=True)  # fmt: skip
    assert probe.stdout.strip() == "42"
