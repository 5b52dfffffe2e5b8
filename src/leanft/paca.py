"""PaCA: fine-tune r input columns of each pretrained weight matrix (Woo et al., ICLR 2025).

``apply_paca`` replaces targeted ``nn.Linear`` (and GPT-2 ``Conv1D``) modules by ``PacaLinear``: the
frozen weight ``W`` (out x in) stays untouched, the trainable ``paca_weight`` ``P`` (out x r) holds
the columns ``paca_index``. Forward is one matmul with ``W`` whose columns ``idx`` are replaced by
``P``; backward gives ``grad_x = grad_y @ W_eff`` and ``grad_P = grad_y^T @ x[..., idx]`` and saves
only ``x[..., idx]`` (never the full input) besides the parameters themselves.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from leanft.distributed import full_tensor, is_main_process
from leanft.errors import LeanftError
from leanft.fileio import atomic_path, write_json

ADAPTER_FILE = "paca_adapter.safetensors"
CONFIG_FILE = "paca_config.json"


def effective_weight(
    weight: torch.Tensor | Callable[[], torch.Tensor], index: torch.Tensor, paca_weight: torch.Tensor
) -> torch.Tensor:
    """``W`` with ``P`` in columns ``index``: ``W`` itself on the CPU when it already holds them, else a copy.

    ``weight`` may be a provider returning a fresh dense ``W`` (QPaCA dequantizes its 4-bit base so): ``P`` is
    then written into that tensor in place.

    ``PacaLinear`` writes ``P`` into ``W`` in place on the CPU, where comparing r columns costs far less than
    copying ``W``; on accelerators the copy is cheap and a comparison would stall the stream.
    """
    if callable(weight):
        return weight().index_copy_(1, index, paca_weight)
    if weight.device.type == "cpu" and torch.equal(weight.index_select(1, index), paca_weight):
        return weight
    return weight.index_copy(1, index, paca_weight)


class PacaMatmul(torch.autograd.Function):
    """``y = x @ W_eff^T + b`` with ``W_eff = W`` whose columns ``index`` are ``P``; saves only ``x[..., index]``.

    ``W`` is a tensor or a provider of one (see ``effective_weight``); a provider is called again in backward,
    so the dense weight it builds is never kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, paca_weight, weight, index, bias):  # noqa: D102 - autograd protocol
        selected = x.index_select(-1, index) if ctx.needs_input_grad[1] else None
        ctx.provider = weight if callable(weight) else None
        ctx.save_for_backward(selected, paca_weight, None if ctx.provider else weight, index)
        return F.linear(x, effective_weight(weight, index, paca_weight), bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102 - autograd protocol
        selected, paca_weight, weight, index = ctx.saved_tensors
        grad_x = grad_p = grad_bias = None
        flat = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ effective_weight(ctx.provider or weight, index, paca_weight)
        if ctx.needs_input_grad[1]:  # (x_sel^T @ grad_y)^T: ~5x faster on the CPU than grad_y^T @ x_sel for r << out
            grad_p = (selected.reshape(-1, selected.shape[-1]).t() @ flat).t()
        if ctx.needs_input_grad[4]:
            grad_bias = flat.sum(0)
        return grad_x, grad_p, None, None, grad_bias


class PacaLinear(nn.Module):
    """A linear layer whose input columns ``paca_index`` are trained through ``paca_weight``.

    On the CPU the frozen ``weight`` doubles as ``W_eff``: each forward writes ``paca_weight`` into its columns
    ``paca_index`` in place when they differ (after an optimizer step, say), which costs r columns instead of a
    full copy of ``W`` per matmul. The original columns stay in the ``paca_original`` buffer, so disabling,
    removing and re-indexing restore them exactly.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, source: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.source = source  # "linear" | "conv1d": the module type merge/remove give back
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("paca_index", index.to(device=weight.device, dtype=torch.long))
        self.paca_weight = nn.Parameter(weight.index_select(1, self.paca_index).clone())
        self.register_buffer("paca_original", weight.index_select(1, self.paca_index).clone())
        self.disabled = False

    @property
    def r(self) -> int:
        """Number of trained input columns."""
        return int(self.paca_index.numel())

    def merged_weight(self) -> torch.Tensor:
        """``W`` with the trained columns written in (a new tensor)."""
        return self.weight.detach().index_copy(1, self.paca_index, self.paca_weight.detach().to(self.weight.dtype))

    def write_columns(self, columns: torch.Tensor) -> None:
        """Make ``weight`` hold ``columns`` (out x r) at ``paca_index``, writing in place only if they differ."""
        with torch.no_grad():
            columns = columns.to(self.weight.dtype)
            if not torch.equal(self.weight.index_select(1, self.paca_index), columns):
                self.weight.index_copy_(1, self.paca_index, columns)

    def set_index(self, index: torch.Tensor) -> None:
        """Train other columns: restore the original ones, then point ``paca_index`` at ``index``."""
        self.write_columns(self.paca_original)
        with torch.no_grad():
            self.paca_index.copy_(index)
            self.paca_original.copy_(self.weight.index_select(1, self.paca_index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One matmul with the trained columns in effect (or the original weight while disabled)."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.disabled or x.device.type == "cpu":  # see effective_weight
            self.write_columns(self.paca_original if self.disabled else self.paca_weight)
        if self.disabled:
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)
        with torch.autocast(device_type, enabled=False):
            return PacaMatmul.apply(
                x.to(dtype), self.paca_weight.to(dtype), self.weight.to(dtype), self.paca_index, bias
            )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"

    def merged_module(self) -> nn.Module:
        """The plain module (nn.Linear or Conv1D) with the trained columns written into its weight."""
        self.write_columns(self.paca_weight)
        return self.to_plain(self.weight.detach())

    def original_module(self) -> nn.Module:
        """The plain module (nn.Linear or Conv1D) with the original weight."""
        self.write_columns(self.paca_original)
        return self.to_plain(self.weight.detach())

    def to_plain(self, weight: torch.Tensor) -> nn.Module:
        """A plain module of the original type (nn.Linear or Conv1D) holding ``weight``."""
        bias = None if self.bias is None else self.bias.detach()
        if self.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
            return module
        module = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return module


def _source(module: nn.Module) -> str | None:
    """The type of a module PaCA can replace: 'linear', 'conv1d', 'linear4bit' (bitsandbytes), else None."""
    from leanft.quant import is_linear4bit

    if type(module) is nn.Linear:
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return "linear4bit" if is_linear4bit(module) else None


def _as_weight(module: nn.Module) -> tuple[torch.Tensor, str] | None:
    """(weight as out x in, source type) for a module PaCA can replace, else None (4-bit weights dequantized)."""
    source = _source(module)
    if source == "linear4bit":
        from leanft.quant import dequantize_module

        return dequantize_module(module, torch.float32), source
    if source == "conv1d":
        return module.weight.data.t().contiguous(), source
    return None if source is None else (module.weight.data, source)


def _target_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    candidates = [name for name, module in model.named_modules() if _source(module) is not None]
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in candidates if model.get_submodule(n) is not head and not n.endswith("lm_head")]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise LeanftError(f"target_modules={target_modules!r} is not a valid regex ({exc})") from exc
        names = [n for n in candidates if pattern.fullmatch(n)]
    elif isinstance(target_modules, Sequence) and all(isinstance(s, str) for s in target_modules):
        names = [n for n in candidates if any(n == s or n.endswith("." + s) for s in target_modules)]
    else:
        raise LeanftError(
            f"target_modules must be 'all-linear', a regex string or a list of name suffixes, got {target_modules!r}"
        )
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise LeanftError(
            f"target_modules={target_modules!r} matched no linear layer; known layer names: {', '.join(suffixes)}"
        )
    return names


def _choose_columns(weight: torch.Tensor, r: int, init: str, generator: torch.Generator) -> torch.Tensor:
    if init == "random":
        chosen = torch.randperm(weight.shape[1], generator=generator)[:r]
    elif init == "weight_norm":
        chosen = weight.float().norm(dim=0).topk(r).indices.cpu()
    else:
        raise LeanftError(f"init must be 'random' or 'weight_norm', got {init!r}")
    return chosen.sort().values


def paca_modules(model: nn.Module) -> dict[str, PacaLinear]:
    """All PaCA layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PacaLinear)}


def apply_paca(
    model: nn.Module,
    r: int = 8,
    target_modules: str | Sequence[str] = "all-linear",
    seed: int = 0,
    init: str = "random",
    train_bias: bool = False,
) -> nn.Module:
    """Replace targeted linears by PaCA layers in place and freeze every other parameter; returns ``model``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LeanftError(f"r must be a positive integer (number of trained columns per layer), got {r!r}")
    if paca_modules(model):
        raise LeanftError("the model already has PaCA layers; merge_paca or remove_paca them first")
    names = _target_names(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        width = module.weight.shape[0] if _source(module) == "conv1d" else module.in_features
        if r > width:
            raise LeanftError(f"r={r} exceeds the input width {width} of {name}; pick r <= {width}")
    for param in model.parameters():
        param.requires_grad_(False)
    tied = _shared_storages(model)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        module = model.get_submodule(name)
        weight, source = _as_weight(module)
        if weight.untyped_storage().data_ptr() in tied:  # PaCA writes into its weight: never into a tied one
            weight = weight.clone()
        index = _choose_columns(weight, r, init, generator)
        if source == "linear4bit":
            from leanft.quant import QPacaLinear

            replacement = QPacaLinear(module, index, weight)
        else:
            replacement = PacaLinear(weight, module.bias.data if module.bias is not None else None, index, source)
        if train_bias and replacement.bias is not None:
            replacement.bias.requires_grad_(True)
        model.set_submodule(name, replacement)
    return model


def _shared_storages(model: nn.Module) -> set[int]:
    """Storages held by more than one parameter or buffer of ``model`` (tied weights)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    counts = Counter(tensor.untyped_storage().data_ptr() for _, tensor in tensors)
    return {pointer for pointer, count in counts.items() if count > 1}


def _replace_all(model: nn.Module, merged: bool) -> nn.Module:
    for name, module in paca_modules(model).items():
        model.set_submodule(name, module.merged_module() if merged else module.original_module())
    return model


def merge_paca(model: nn.Module) -> nn.Module:
    """Write the trained columns into the weights and give back plain nn.Linear / Conv1D modules."""
    return _replace_all(model, merged=True)


def remove_paca(model: nn.Module) -> nn.Module:
    """Drop the PaCA layers and give back the original modules with their original weights."""
    return _replace_all(model, merged=False)


@contextlib.contextmanager
def paca_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model with the original weights (trained columns ignored) inside the block."""
    modules = list(paca_modules(model).values())
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module in modules:
            module.disabled = False


def save_paca(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter folder (``paca_adapter.safetensors`` + ``paca_config.json``) atomically.

    In a distributed run call it on every rank: FSDP2-sharded columns are gathered (a collective) and only
    rank 0 writes, so the full adapter is written once.
    """
    modules = paca_modules(model)
    if not modules:
        raise LeanftError("the model has no PaCA layers to save; call apply_paca first")
    tensors = {}
    for name, module in modules.items():
        tensors[f"{name}.paca_index"] = module.paca_index.detach().cpu().contiguous()
        tensors[f"{name}.paca_weight"] = full_tensor(module.paca_weight.detach()).cpu().contiguous()
        if module.bias is not None and module.bias.requires_grad:
            tensors[f"{name}.bias"] = full_tensor(module.bias.detach()).cpu().contiguous()
    folder = Path(path)
    if not is_main_process():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    ranks = {module.r for module in modules.values()}
    write_json(folder / CONFIG_FILE, {"format": "leanft-paca", "version": 1, "r": max(ranks), "layers": list(modules)})
    return folder


def load_paca(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter folder into ``model`` (applying PaCA to the saved layers first if needed)."""
    folder = Path(path)
    if not (folder / ADAPTER_FILE).is_file():
        raise LeanftError(f"{folder} holds no {ADAPTER_FILE}; point at a folder written by save_paca")
    tensors = load_file(str(folder / ADAPTER_FILE))
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    modules = paca_modules(model)
    if not modules:
        ranks = {int(tensors[f"{name}.paca_index"].numel()) for name in layers}
        missing = [name for name in layers if _safe_get(model, name) is None]
        if missing or len(ranks) != 1:
            raise LeanftError(f"the adapter in {folder} does not fit this model (missing layers: {missing[:3]})")
        apply_paca(model, r=ranks.pop(), target_modules=layers)
        modules = paca_modules(model)
    if set(modules) != set(layers):
        raise LeanftError(f"the adapter in {folder} names other layers than the model's PaCA layers")
    for name in layers:
        module, index = modules[name], tensors[f"{name}.paca_index"]
        weight = tensors[f"{name}.paca_weight"]
        if weight.shape != module.paca_weight.shape or index.shape != module.paca_index.shape:
            raise LeanftError(f"the adapter in {folder} does not fit layer {name} (shape {tuple(weight.shape)})")
        module.set_index(index)
        with torch.no_grad():
            module.paca_weight.copy_(weight)
            if f"{name}.bias" in tensors:
                module.bias.copy_(tensors[f"{name}.bias"])
                module.bias.requires_grad_(True)
    return model


def _safe_get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
