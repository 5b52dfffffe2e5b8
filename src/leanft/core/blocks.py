"""Find the decoder blocks of a Hugging Face causal LM and their residual branches.

A *branch* is one residual sub-layer of a decoder block: the attention branch (``x + attn(norm(x))``)
or the MLP branch (``x + mlp(norm(x))``). Most architectures keep each branch in one sub-module
(``self_attn`` / ``mlp``); OPT keeps its MLP as two linears (``fc1``, ``fc2``) directly in the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from leanft.core.errors import LeanftError

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc1+fc2")
HOW_TO_POINT = (
    "pass blocks='<dotted path to the ModuleList of decoder blocks>', "
    "attn='<attention sub-module name>' and mlp='<MLP sub-module name, or names joined by +>' "
    "to apply_dropbp"
)


@dataclass
class Branch:
    """One residual branch: the modules that compute it and its forward FLOPs at the current length."""

    name: str
    kind: str  # "attn" | "mlp"
    layer: int
    modules: list[nn.Module]
    linear_flops_per_token: float
    attn_flops_per_token_sq: float = 0.0
    flops: float = 0.0

    def set_seq_len(self, seq_len: int) -> None:
        """Recompute ``flops`` (forward FLOPs for one sequence) at ``seq_len`` tokens."""
        self.flops = seq_len * self.linear_flops_per_token + seq_len * seq_len * self.attn_flops_per_token_sq


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``Conv1D`` (a linear layer whose weight is stored in x out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (nn.Linear, GPT-2 Conv1D, PaCA), else None."""
    if isinstance(module, nn.Linear) or hasattr(module, "paca_index"):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    return None


def _linear_flops_per_token(module: nn.Module) -> float:
    """2 * in * out for every linear-like module inside ``module`` (not descending into one)."""
    dims = linear_dims(module)
    if dims is not None:
        return 2.0 * dims[0] * dims[1]
    return sum(_linear_flops_per_token(child) for child in module.children())


def text_config(config):
    """The language model's part of a model config (a multimodal config's text config), or ``config`` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_flops_per_token_sq(config) -> float:
    """Score (QK^T) and value (AV) products: 2 * 2 * heads * head_dim FLOPs per (query, key) pair."""
    lm_config = text_config(config)
    heads = getattr(lm_config, "num_attention_heads", None)
    hidden = getattr(lm_config, "hidden_size", None)
    if not heads or not hidden:
        return 0.0
    head_dim = getattr(lm_config, "head_dim", None) or hidden // heads
    return 4.0 * heads * head_dim


def find_block_list(model: nn.Module, blocks: str | None) -> tuple[str, nn.ModuleList]:
    """(dotted name, the ModuleList) of the model's decoder blocks: at ``blocks`` when given, else found."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError as exc:
            raise LeanftError(f"blocks={blocks!r} is not a sub-module of {type(model).__name__}") from exc
        if not isinstance(found, nn.ModuleList):
            raise LeanftError(f"blocks={blocks!r} is a {type(found).__name__}, not an nn.ModuleList of blocks")
        return blocks, found
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and any(hasattr(module[0], attn) for attn in ATTN_NAMES)
    ]
    if not candidates:
        raise LeanftError(f"leanft could not find the decoder blocks of {type(model).__name__}; {HOW_TO_POINT}")
    return max(candidates, key=lambda item: len(item[1]))


def _branch_modules(block: nn.Module, names: Sequence[str]) -> tuple[str, list[nn.Module]] | None:
    for name in names:
        parts = name.split("+")
        if all(isinstance(getattr(block, part, None), nn.Module) for part in parts):
            return name, [getattr(block, part) for part in parts]
    return None


def find_branches(
    model: nn.Module, blocks: str | None = None, attn: str | None = None, mlp: str | None = None
) -> list[Branch]:
    """All residual branches of ``model`` in model order (attn then mlp in each block).

    ``blocks``, ``attn`` and ``mlp`` override the automatic search for architectures it does not know.
    """
    list_name, block_list = find_block_list(model, blocks)
    attn_sq = _attention_flops_per_token_sq(getattr(model, "config", None))
    branches = []
    for layer, block in enumerate(block_list):
        for kind, names in (("attn", (attn,) if attn else ATTN_NAMES), ("mlp", (mlp,) if mlp else MLP_NAMES)):
            found = _branch_modules(block, names)
            if found is None:
                raise LeanftError(
                    f"leanft could not find the {kind} branch of {type(block).__name__} "
                    f"(block {list_name}.{layer}, tried {', '.join(names)}); {HOW_TO_POINT}"
                )
            sub_name, modules = found
            branches.append(
                Branch(
                    name=f"{list_name}.{layer}.{sub_name}",
                    kind=kind,
                    layer=layer,
                    modules=modules,
                    linear_flops_per_token=sum(_linear_flops_per_token(m) for m in modules),
                    attn_flops_per_token_sq=attn_sq if kind == "attn" else 0.0,
                )
            )
    return branches
