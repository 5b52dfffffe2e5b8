"""S2FT: structured sparse fine-tuning (Yang et al., NeurIPS 2024), written for leanft.

S2FT trains a few whole attention heads and FFN channels of the pretrained model and leaves the rest frozen.
In the configuration the paper recommends, a selected head trains its block of input columns of the
attention's output projection (``o_proj``: ``head_dim`` columns), and a selected FFN channel trains its input
column of the MLP's down projection (``down_proj``). Heads and channels are drawn at random, without
replacement, from the pool of all (layer, head) and all (layer, channel) pairs of the model, so each layer gets
its own number of them; the paper found random selection as good as the informed ones.

Each such slice is a dense block of input columns, which is exactly what a PaCA layer trains
(``leanft.core.paca_layer``): its forward is one matmul with the columns written in, and its backward gives
each trained column the full weight's gradient at that column while saving only those input columns. The
authors permute the weights so that the selection is contiguous; PaCA's column index makes that unnecessary.
Save, load and merge are PaCA's (``save_paca``, ``load_paca``, ``merge_paca``).
"""

from __future__ import annotations

import torch
from torch import nn

from leanft.core.blocks import find_branches, linear_dims, text_config
from leanft.core.errors import LeanftError
from leanft.core.paca import paca_modules, train_columns


def _output_projection(branch_modules: list[nn.Module], names: dict[int, str], hidden: int) -> tuple[str, int]:
    """(qualified name, input width) of a branch's output projection: its last linear-like module that writes
    the residual width ``hidden`` (Phi-3 registers ``o_proj`` before ``qkv_proj``; OPT's q, k, v and out_proj
    all write ``hidden``, and ``out_proj`` comes last)."""
    found = None
    for module in branch_modules:
        for sub in module.modules():
            dims = linear_dims(sub)
            if dims is not None and dims[1] == hidden:
                found = (names[id(sub)], dims[0])
    if found is None:
        raise LeanftError(f"S2FT found no linear layer writing the hidden size {hidden} in a residual branch; "
                          "this architecture is not supported")
    return found


def _head_count(model: nn.Module) -> int:
    heads = getattr(text_config(getattr(model, "config", None)), "num_attention_heads", None)
    if not heads:
        raise LeanftError("S2FT needs config.num_attention_heads to split the attention output into heads")
    return int(heads)


Unit = tuple[str, int, int]  # (output projection's name, first input column, columns) of one head or channel


def _draw(pool: list[Unit], ratio: float, generator: torch.Generator) -> list[Unit]:
    """``int(ratio * len(pool))`` units drawn without replacement (the paper's rounding)."""
    count = int(ratio * len(pool))
    return [pool[i] for i in torch.randperm(len(pool), generator=generator)[:count].tolist()]


def s2ft_columns(
    model: nn.Module, ffn: float = 0.05, heads: float = 0.0, seed: int = 0, **where: str | None
) -> dict[str, torch.Tensor]:
    """The input columns S2FT trains, by layer name: ``ffn`` of all FFN channels and ``heads`` of all heads
    (``where``: ``blocks``, ``attn``, ``mlp`` as ``leanft.core.blocks.find_branches`` takes them).

    Raises a LeanftError for a ratio outside [0, 1] or a selection of nothing; changes nothing in ``model``.
    """
    for key, ratio in (("ffn", ffn), ("heads", heads)):
        if not 0.0 <= ratio <= 1.0:
            raise LeanftError(f"s2ft.{key} must be in [0, 1] (share of all {key} channels/heads), got {ratio}")
    names = {id(module): name for name, module in model.named_modules()}
    hidden = getattr(text_config(getattr(model, "config", None)), "hidden_size", None)
    if not hidden:
        raise LeanftError("S2FT needs config.hidden_size to find each branch's output projection")
    head_count = _head_count(model) if heads > 0 else 1
    head_pool, channel_pool = [], []
    for branch in find_branches(model, **where):
        name, width = _output_projection(branch.modules, names, hidden)
        if branch.kind == "mlp":
            channel_pool += [(name, channel, 1) for channel in range(width)]
        elif heads > 0:
            if width % head_count:
                raise LeanftError(f"{name} has {width} inputs, not a multiple of the {head_count} attention heads")
            size = width // head_count
            head_pool += [(name, h * size, size) for h in range(head_count)]
    generator = torch.Generator().manual_seed(seed)
    chosen = _draw(head_pool, heads, generator) + _draw(channel_pool, ffn, generator)
    if not chosen:
        raise LeanftError(
            f"s2ft.ffn={ffn} and s2ft.heads={heads} select no channel or head of this model; raise one of them"
        )
    columns: dict[str, list[torch.Tensor]] = {}
    for name, first, size in chosen:
        columns.setdefault(name, []).append(torch.arange(first, first + size))
    return {name: torch.cat(units).sort().values for name, units in columns.items()}


def apply_s2ft(model: nn.Module, ffn: float = 0.05, heads: float = 0.0, seed: int = 0, **where: str) -> nn.Module:
    """Make ``model`` train S2FT's selection (see ``s2ft_columns``) and freeze everything else; returns ``model``.

    ``where`` may name ``blocks``, ``attn`` and ``mlp`` for architectures the branch search does not know.
    """
    if paca_modules(model):
        raise LeanftError("the model already has column-trained layers; merge_paca or remove_paca them first")
    return train_columns(model, s2ft_columns(model, ffn, heads, seed, **where))
