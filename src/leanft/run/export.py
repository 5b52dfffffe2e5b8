"""``leanft export RUN OUT [format=...] [dtype=...] [type=...]`` (and ``leanft merge RUN OUT``, its ``format=hf``).

One path for every format: the options, the output and the run are checked before any model loads; the run is
loaded once; a format that wants a plain model gets the method's merge; the format writes into a temporary
sibling of ``OUT`` that replaces it only once complete (``atomic_dir``, or ``atomic_path`` for a one-file format),
so a failure, a full disk included, never leaves a half-written or changed output. Each format is one
``ExportFormat`` in ``FORMATS``.

This module imports neither torch nor transformers at import time: ``leanft export --help`` lists its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leanft.core.errors import LeanftError
from leanft.run.files import ADAPTER_DIR
from leanft.run.gguf_export import GGUF_TYPES
from leanft.run.methods import METHODS, method_spec
from leanft.run.options import apply_items, doc

if TYPE_CHECKING:
    from torch import nn

    from leanft.run.config import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportOptions:
    """``leanft export`` keys (``leanft merge`` takes them too, with format=hf)."""

    format: str | None = doc(
        "what to write: hf (a merged model folder that AutoModelForCausalLM loads) | peft-lora (an adapter folder "
        "that peft's PeftModel.from_pretrained loads onto the base; PaCA, S2FT and LoRA runs) | gguf (one merged "
        "GGUF file for llama.cpp and Ollama, an Ollama Modelfile beside it); null: gguf when OUT ends in .gguf, "
        "else hf",
        None,
    )
    type: str = doc("gguf: the tensor type, " + " | ".join(GGUF_TYPES) + " (norms and biases stay float32)", "f16")
    dtype: str = doc("dtype of the written weights (float32 | bfloat16 | float16), cast after merging", "float32")
    overwrite: bool = doc("replace a non-empty OUT", False)
    uniform_rank: bool = doc(
        "peft-lora: pad every layer with zeros to the largest rank (S2FT's layers differ; still exact), for readers "
        "that ignore peft's rank_pattern (llama.cpp scales each layer by one lora_alpha over that layer's rank)",
        False,
    )

    def validate(self) -> None:
        """Raise a LeanftError for a bad value (no model, no run folder needed)."""
        if self.format is not None and self.format not in FORMATS:
            raise LeanftError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise LeanftError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.type not in GGUF_TYPES:
            raise LeanftError(f"type must be one of {', '.join(GGUF_TYPES)}, got {self.type!r}")


@dataclass(frozen=True)
class ExportJob:
    """One checked export: the run, where to write, the options, the run's config, the format's name."""

    run_dir: Path
    out: Path
    options: ExportOptions
    config: TrainConfig
    format: str


@dataclass(frozen=True)
class ExportFormat:
    """One output format of ``leanft export``."""

    merged: bool  # the writer gets the method's merged, plain model (else the trained model as loaded)
    check: Callable[[ExportJob], None]  # refusals that need no model (after the options, the output, the run)
    write: Callable[[ExportJob, nn.Module, object, Path], str]  # (job, model, tokenizer, target) -> what it wrote
    file: bool = False  # OUT is one file (else a folder)


def _dtype(job: ExportJob):
    import torch

    return getattr(torch, job.options.dtype)


def _no_check(job: ExportJob) -> None:
    """A merged model exists for every method: nothing to refuse."""


def _write_hf(job: ExportJob, model: nn.Module, tokenizer, folder: Path) -> str:
    """The merged model and the tokenizer, as ``save_pretrained`` writes them."""
    model.to(_dtype(job)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    note = (f"\nnote: trained on a {job.config.quantize} base, merged in full precision; quantizing it again is lossy"
            if job.config.quantize else "")
    return f"merged model written to {job.out}{note}"


def _check_peft_lora(job: ExportJob) -> None:
    """Refuse a method without an adapter form, and a PaCA adapter that trains biases (LoRA cannot hold them)."""
    spec = METHODS[job.config.method]
    if spec.lora_form is None:
        raise LeanftError(f"a method={spec.name} run has no adapter form (every weight trained): use format=hf")
    trained_bias = _paca_bias(job.run_dir / ADAPTER_DIR)
    if trained_bias is not None:
        raise LeanftError(f"the run trains the bias of {trained_bias}, which a LoRA adapter cannot hold: use format=hf")


def _paca_bias(folder: Path) -> str | None:
    """The first layer whose bias the PaCA adapter saved in ``folder`` trains, or None (no bias, or no PaCA)."""
    from safetensors import safe_open

    from leanft.core.paca import ADAPTER_FILE

    path = folder / ADAPTER_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return next((key.rsplit(".", 1)[0] for key in handle.keys() if key.endswith(".bias")), None)  # noqa: SIM118


def _write_peft_lora(job: ExportJob, model: nn.Module, tokenizer, folder: Path) -> str:
    """The run's update as a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from leanft.run.peft_adapter import write_adapter

    config, tensors = METHODS[job.config.method].lora_form(model, job.options.uniform_rank)
    write_adapter(folder, config, tensors, _dtype(job))
    layers = sum(key.endswith(".lora_A.weight") for key in tensors)
    ranks = sorted({*(config.rank_pattern or {}).values(), config.r})
    shown = str(config.r) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    note = (f"\nnote: the adapter applies to the base loaded in 4 bits as the run trained it ({job.config.quantize}, "
            "nf4, double quantization)" if job.config.quantize else "")
    return (f"peft LoRA adapter written to {job.out} ({layers} layers, rank {shown}): "
            f"PeftModel.from_pretrained(base, {str(job.out)!r}){note}")


def _check_gguf(job: ExportJob) -> None:
    """Refuse dtype= (GGUF takes type=), an existing Modelfile without overwrite, and a base GGUF cannot hold."""
    from leanft.run.gguf_export import check_gguf_export
    from leanft.run.ollama import modelfile_path

    if job.options.dtype != "float32":
        raise LeanftError(f"format=gguf writes type={job.options.type}, not dtype=: drop dtype={job.options.dtype}")
    modelfile = modelfile_path(job.out)
    if modelfile.exists() and not job.options.overwrite:
        raise LeanftError(f"{modelfile} exists: pass overwrite=true or write the GGUF file into another folder")
    check_gguf_export(_base_config(job.config.model), job.options.type)


def _base_config(model_spec: str | None) -> dict:
    """The base model's config as a dict, read without its weights (a GGUF file: its architecture field)."""
    from leanft.run.gguf_export import source_gguf_for

    source = source_gguf_for(model_spec)
    if source is not None:
        from gguf import GGUFReader

        field = GGUFReader(source).fields["general.architecture"]
        return {"model_type": bytes(field.parts[field.data[0]]).decode()}
    from transformers import AutoConfig

    from leanft.run.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model_spec)).to_dict()


def _write_gguf(job: ExportJob, model: nn.Module, tokenizer, path: Path) -> str:
    """The merged model as one GGUF file at ``path``, then the Ollama Modelfile beside ``job.out``."""
    from leanft.run.gguf_export import source_gguf_for, write_gguf
    from leanft.run.ollama import write_modelfile

    write_gguf(model, tokenizer, path, job.options.type, source_gguf_for(job.config.model))
    modelfile = write_modelfile(job.out, tokenizer)
    return f"GGUF file ({job.options.type}) written to {job.out}, Ollama Modelfile to {modelfile}"


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(merged=True, check=_no_check, write=_write_hf),
    "peft-lora": ExportFormat(merged=False, check=_check_peft_lora, write=_write_peft_lora),
    "gguf": ExportFormat(merged=True, check=_check_gguf, write=_write_gguf, file=True),
}


def refuse_old_spellings(command: str, overwrite: bool, dtype: str | None) -> None:
    """One line giving the ``key=value`` spelling of ``--overwrite`` / ``--dtype X`` (the merge flags of before)."""
    if dtype is not None:
        raise LeanftError(f"--dtype is now a key: run leanft {command} RUN OUT dtype={dtype}")
    if overwrite:
        raise LeanftError(f"--overwrite is now a key: run leanft {command} RUN OUT overwrite=true")


def check_output(run_dir: Path, out: Path, overwrite: bool, file: bool = False) -> None:
    """Refuse an output inside, around or equal to the run folder, a file where a folder is written (``file``:
    a folder where a file is), or an existing output without ``overwrite`` (a folder: a non-empty one)."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise LeanftError(f"OUT {out} overlaps the run folder {run_dir}: choose a folder outside it")
    if file:
        if target.is_dir():
            raise LeanftError(f"OUT {out} is a folder: pass a file name, e.g. {out / 'model.gguf'}")
        if target.exists() and not overwrite:
            raise LeanftError(f"{out} exists: pass overwrite=true or choose another file name")
        return
    if target.exists() and not target.is_dir():
        raise LeanftError(f"OUT {out} is a file: pass a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise LeanftError(f"{out} is not empty: pass overwrite=true or choose another folder")


def prepare_export(run_dir: str | Path, out: str | Path, items: Sequence[str], command: str = "export") -> ExportJob:
    """The checked export of ``leanft {command} RUN OUT [key=value ...]``: options, output, run folder and what the
    format refuses, all before any model loads (nothing is written)."""
    options = apply_items(ExportOptions(), items, command)
    options.validate()
    run_dir, out = Path(run_dir), Path(out)
    name = options.format or ("gguf" if out.suffix == ".gguf" else "hf")
    if command == "merge" and name != "hf":
        raise LeanftError(f"leanft merge writes format=hf: run leanft export RUN OUT format={name}")
    check_output(run_dir, out, options.overwrite, FORMATS[name].file)
    from leanft.run.rundir import run_config  # imports torch: only once the options and the output pass

    job = ExportJob(run_dir=run_dir, out=out, options=options, config=run_config(run_dir), format=name)
    FORMATS[name].check(job)
    return job


def run_export(job: ExportJob) -> str:
    """Load the run once, merge it where the format wants a plain model, write ``job.out`` atomically; returns the
    line(s) to print."""
    from leanft.core.fileio import WRITE_ERRORS, atomic_dir, atomic_path
    from leanft.run.rundir import disk_is_full, load_run

    export_format = FORMATS[job.format]
    model, tokenizer, config = load_run(job.run_dir, device="cpu")
    if export_format.merged:
        model = method_spec(config.method).merge(model)  # merged in the run's precision, cast by the writer
    try:
        with (atomic_path if export_format.file else atomic_dir)(job.out) as target:
            return export_format.write(job, model, tokenizer, target)
    except WRITE_ERRORS as error:  # a writer that reports a full disk only as a short write (numpy's tofile)
        if disk_is_full(job.out.parent, error):
            raise LeanftError(f"no space left on the disk holding {job.out}: free some space and run again") from None
        raise
