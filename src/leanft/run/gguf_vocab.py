"""A Hugging Face byte-level BPE tokenizer as GGUF ``tokenizer.*`` metadata, under llama.cpp's key names.

llama.cpp's ``gpt2`` tokenizer model is byte-level BPE: the vocabulary spelled in GPT-2's byte alphabet, the
merges as ``"left right"`` strings, a type per token (normal, control, user-defined, unused) and a named
pre-tokenizer (``tokenizer.ggml.pre``) that fixes how text is split before the merges apply. The name is
read off the tokenizer's own ``tokenizer.json`` pre-tokenizer; one this module does not recognise is refused
rather than guessed, since a wrong split gives a model that tokenizes differently from how it was trained.
No torch or gguf import at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from leanft.core.errors import LeanftError

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Split patterns of the pre-tokenizers llama.cpp names, as tokenizer.json files spell them
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SUPPORTED_PRE = "GPT-2's byte-level split, digits then byte-level (SmolLM), Llama-3's or Qwen2's split"


@dataclass
class GgufVocab:
    """What llama.cpp needs of a byte-level BPE tokenizer, ready to write with ``add_vocab``."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | dict | None


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LeanftError("GGUF export needs a fast (tokenizers-backed) tokenizer: save the model with one")
    return json.loads(backend.to_str())


def _byte_level(step: dict | None, regex: bool) -> bool:
    return (
        bool(step)
        and step["type"] == "ByteLevel"
        and not step.get("add_prefix_space", False)
        and (step.get("use_regex", True) == regex)
    )


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizer.json pre-tokenizer, or None when not recognised."""
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre]
    kinds = [step["type"] if step else None for step in steps]
    if kinds == ["ByteLevel"] and _byte_level(steps[0], regex=True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and _byte_level(steps[1], regex=True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and _byte_level(steps[1], regex=False):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_PRE_TOKENIZERS.get(split.get("pattern", {}).get("Regex"))
    return None


def _merges(model: dict) -> list[str]:
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]


def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token (``[PADn]``, unused, for ids past the tokenizer's) and its llama.cpp type."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise LeanftError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has {vocab_size} rows: "
            "resize the embeddings to the tokenizer before exporting"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(f"[PAD{index}]" if token is None else token)
        if token is None:
            types.append(UNUSED)
        elif index in added:
            types.append(CONTROL if added[index].special else USER_DEFINED)
        else:
            types.append(NORMAL)
    return tokens, types


def adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text adds the BOS token before it and the EOS token after it."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    extra = len(full) - len(plain)
    add_bos = extra > 0 and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id
    add_eos = extra > 0 and tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id
    return add_bos, add_eos


def gguf_vocab(tokenizer, vocab_size: int) -> GgufVocab:
    """The GGUF view of a Hugging Face byte-level BPE ``tokenizer`` for a model with ``vocab_size`` rows.

    Raises ``LeanftError`` (one line) for a tokenizer llama.cpp's ``gpt2`` model cannot reproduce.
    """
    backend = _backend(tokenizer)
    model = backend.get("model") or {}
    decoder = backend.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise LeanftError(
            "GGUF export of a Hugging Face folder supports byte-level BPE tokenizers (GPT-2 style, as Llama-3, "
            f"Qwen and SmolLM use) only; this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    if pre is None:
        raise LeanftError(
            f"the tokenizer's pre-tokenizer is not one llama.cpp knows by name (supported: {SUPPORTED_PRE}): "
            "export from a GGUF base instead, whose tokenizer metadata is copied"
        )
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    special_ids = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }
    add_bos, add_eos = adds_special_tokens(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return GgufVocab(tokens, types, _merges(model), pre, special_ids, add_bos, add_eos, template)


def add_vocab(writer, vocab: GgufVocab) -> None:
    """Write ``vocab`` into a ``gguf.GGUFWriter``'s metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, index in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    template = vocab.chat_template
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
