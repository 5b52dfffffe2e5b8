"""PaCA: fine-tune r input columns of each pretrained weight matrix (Woo et al., ICLR 2025).

``apply_paca`` replaces targeted ``nn.Linear`` (GPT-2 ``Conv1D``, bitsandbytes 4-bit) modules by PaCA layers
(``leanft.core.paca_layer``; ``QPacaLinear`` on a 4-bit base), chosen by the dispatchers in ``DISPATCHERS``;
the frozen weight stays untouched and only the columns ``paca_index`` train. Save, load, merge and remove work
on any model holding such layers.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from leanft.core.blocks import is_conv1d
from leanft.core.distributed import full_tensor, is_main_process
from leanft.core.errors import LeanftError
from leanft.core.fileio import atomic_path, write_json
from leanft.core.paca_layer import PacaDispatch, PacaLinear
from leanft.core.quant import LINEAR_4BIT

ADAPTER_FILE = "paca_adapter.safetensors"
CONFIG_FILE = "paca_config.json"


def _bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias.data if module.bias is not None else None


LINEAR = PacaDispatch(
    matches=lambda module: type(module) is nn.Linear,
    in_features=lambda module: module.in_features,
    weight=lambda module: module.weight.data,
    build=lambda module, index, weight: PacaLinear(weight, _bias(module), index, "linear"),
)
CONV1D = PacaDispatch(  # GPT-2's transposed linear
    matches=is_conv1d,
    in_features=lambda module: module.weight.shape[0],
    weight=lambda module: module.weight.data.t().contiguous(),
    build=lambda module, index, weight: PacaLinear(weight, _bias(module), index, "conv1d"),
)
DISPATCHERS = (LINEAR, CONV1D, LINEAR_4BIT)


def _dispatch(module: nn.Module) -> PacaDispatch | None:
    """The dispatcher for a module PaCA can replace, else None."""
    return next((dispatch for dispatch in DISPATCHERS if dispatch.matches(module)), None)


def target_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The linear layers of ``model`` that ``target_modules`` names ('all-linear', a regex or name suffixes)."""
    candidates = [name for name, module in model.named_modules() if _dispatch(module) is not None]
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


def _choose_columns(weight: torch.Tensor, r: int, rule: str, generator: torch.Generator) -> torch.Tensor:
    if rule == "random":
        chosen = torch.randperm(weight.shape[1], generator=generator)[:r]
    elif rule == "weight_norm":
        chosen = weight.float().norm(dim=0).topk(r).indices.cpu()
    else:
        raise LeanftError(f"columns must be 'random', 'weight_norm' or a dict of scores per layer, got {rule!r}")
    return chosen.sort().values


def paca_modules(model: nn.Module) -> dict[str, PacaLinear]:
    """All PaCA layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PacaLinear)}


def narrowest_input(model: nn.Module, target_modules: str | Sequence[str] = "all-linear") -> int | None:
    """The smallest input width among the layers ``apply_paca`` would target (None when it targets none)."""
    widths = [_dispatch(model.get_submodule(name)).in_features(model.get_submodule(name))
              for name in target_names(model, target_modules)]
    return min(widths, default=None)


def check_paca_targets(model: nn.Module, r: int, target_modules: str | Sequence[str] = "all-linear") -> list[str]:
    """The layers ``apply_paca`` would replace; raises what it would raise, without changing ``model``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LeanftError(f"r must be a positive integer (number of trained columns per layer), got {r!r}")
    if paca_modules(model):
        raise LeanftError("the model already has PaCA layers; merge_paca or remove_paca them first")
    names = target_names(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        width = _dispatch(module).in_features(module)
        if r > width:
            raise LeanftError(f"r={r} exceeds the input width {width} of {name}; pick r <= {width}")
    return names


def apply_paca(
    model: nn.Module,
    r: int = 8,
    target_modules: str | Sequence[str] = "all-linear",
    seed: int = 0,
    columns: str | dict[str, torch.Tensor] = "random",
    train_bias: bool = False,
) -> nn.Module:
    """Replace targeted linears by PaCA layers in place and freeze every other parameter; returns ``model``.

    ``columns`` picks each layer's ``r`` columns: ``"random"`` (the paper), ``"weight_norm"`` (largest weight
    norm), or a dict of scores per layer name, one value per input column, whose ``r`` highest-scoring columns
    train.
    """
    names = check_paca_targets(model, r, target_modules)
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(columns, dict):
            chosen[name] = columns[name].topk(r).indices.sort().values
        else:
            chosen[name] = _choose_columns(_dispatch(module).weight(module), r, columns, generator)
    return train_columns(model, chosen, train_bias)


def train_columns(model: nn.Module, columns: dict[str, torch.Tensor], train_bias: bool = False) -> nn.Module:
    """Replace each named linear by a PaCA layer training the input columns given for it; freeze the rest.

    The column sets may differ in size from layer to layer (S2FT's selection does); returns ``model``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    tied = _shared_storages(model)
    for name, index in columns.items():
        module = model.get_submodule(name)
        dispatch = _dispatch(module)
        weight = dispatch.weight(module)
        if weight.untyped_storage().data_ptr() in tied:  # PaCA writes into its weight: never into a tied one
            weight = weight.clone()
        replacement = dispatch.build(module, index.sort().values, weight)
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
    """Inside the block the model computes exactly as its base did: every PaCA (and S2FT) layer uses its original
    columns, trained ones ignored. No weight is written, so a backward still pending from a training forward before
    the block stays valid (a preference-tuning reference pass runs between the two)."""
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


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """PaCA's saved tensors from an adapter folder (``save_paca``) or from a ``transformers.Trainer`` / TRL
    checkpoint of a PaCA model (``model.safetensors``, sharded or not, whose ``*.paca_*`` keys are kept)."""
    if (folder / ADAPTER_FILE).is_file():
        return load_file(str(folder / ADAPTER_FILE))
    shards = sorted(folder.glob("model*.safetensors"))
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith((".paca_index", ".paca_weight")):
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise LeanftError(
            f"{folder} holds no {ADAPTER_FILE} and no checkpoint of a PaCA model; point at a folder written by "
            "save_paca or at a Trainer checkpoint of a PaCA model"
        )
    return tensors


def load_paca(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter folder, or a Trainer / TRL checkpoint of a PaCA model, into ``model`` (applying PaCA to the
    saved layers first if needed)."""
    folder = Path(path)
    tensors = adapter_tensors(folder)
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    modules, applied = paca_modules(model), False
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    if not modules:
        unfit = [name for name in layers if not _fits(_safe_get(model, name), tensors[f"{name}.paca_index"])]
        if unfit:
            raise LeanftError(f"the adapter in {folder} does not fit this model (layers {', '.join(unfit[:3])})")
        train_columns(model, {name: tensors[f"{name}.paca_index"] for name in layers})
        modules, applied = paca_modules(model), True
    problem = _misfit(modules, layers, tensors)
    if problem is not None:
        if applied:  # leave the model as it came: its own layers, its own trainable flags
            remove_paca(model)
            for name, param in model.named_parameters():
                param.requires_grad_(trainable.get(name, param.requires_grad))
        raise LeanftError(f"the adapter in {folder} {problem}")
    for name in layers:
        module = modules[name]
        module.set_index(tensors[f"{name}.paca_index"])
        with torch.no_grad():
            module.paca_weight.copy_(tensors[f"{name}.paca_weight"])
            if f"{name}.bias" in tensors:
                module.bias.copy_(tensors[f"{name}.bias"])
                module.bias.requires_grad_(True)
    return model


def _misfit(modules: dict[str, PacaLinear], layers: list[str], tensors: dict) -> str | None:
    """Why saved adapter ``tensors`` do not fit the PaCA layers ``modules`` (checked before anything is copied)."""
    if set(modules) != set(layers):
        return "names other layers than the model's PaCA layers"
    for name in layers:
        module, index, weight = modules[name], tensors[f"{name}.paca_index"], tensors[f"{name}.paca_weight"]
        if weight.shape != module.paca_weight.shape or index.shape != module.paca_index.shape:
            return f"does not fit layer {name} (shape {tuple(weight.shape)})"
    return None


def _fits(module: nn.Module | None, index: torch.Tensor) -> bool:
    """Whether ``module`` is a linear PaCA can replace whose input width holds every column of ``index``."""
    dispatch = None if module is None else _dispatch(module)
    return dispatch is not None and (index.numel() == 0 or int(index.max()) < dispatch.in_features(module))


def _safe_get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
