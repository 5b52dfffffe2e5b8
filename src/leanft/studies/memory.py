"""Measure the bytes autograd saves for backward (activations), excluding parameters and buffers."""

from __future__ import annotations

import torch
from torch import nn


class SavedTensorMeter:
    """Context manager counting unique storages saved for backward inside it, minus the model's own tensors.

    ``meter.bytes`` is the activation memory the graph holds: each saved storage counted once, parameter and
    buffer storages (which exist anyway) left out.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        tensors = [] if model is None else [*model.parameters(), *model.buffers()]
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded and pointer not in self._seen:
            self._seen.add(pointer)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
