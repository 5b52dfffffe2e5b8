"""Study: PaCA with new random columns every N steps (not a leanft option: it lost, see the README).

Every ``every`` optimizer steps each PaCA layer keeps its trained columns in its weight, starts training ``r``
new random columns, and their AdamW state starts afresh. Prints the held-out curve of the run.

    python scripts/paca_resample_study.py 20 data=aclsum_train.jsonl eval_data=aclsum_eval.jsonl \
        max_seq_len=384 batch_size=4 max_steps=80 eval_steps=10 max_new_tokens=1 output_dir=runs/resample20
"""

from __future__ import annotations

import sys

import torch
from transformers import TrainerCallback

from leanft.core.paca import paca_modules
from leanft.run.config import load_config
from leanft.run.train import train


class ResampleColumns(TrainerCallback):
    """New random columns for every PaCA layer each ``every`` steps (the last step excepted)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Keep the trained columns in the weight; train r new ones from a fresh AdamW state."""
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return
        generator = torch.Generator().manual_seed(1000 + state.global_step)
        for layer in paca_modules(model).values():
            layer.write_columns(layer.paca_weight)
            index = torch.randperm(layer.in_features, generator=generator)[: layer.r].sort().values
            with torch.no_grad():
                layer.paca_index.copy_(index)
                layer.paca_original.copy_(layer.weight.index_select(1, index))
                layer.paca_weight.copy_(layer.weight.index_select(1, index).to(layer.paca_weight.dtype))
            optimizer.state.pop(layer.paca_weight, None)


def main(argv: list[str]) -> None:
    """``EVERY key=value...``: train with resampled columns and print the held-out curve."""
    summary = train(load_config(None, argv[1:]), callbacks=[ResampleColumns(int(argv[0]))])
    print(" ".join(f"{point['step']}:{point['heldout_loss']:.4f}" for point in summary["heldout_curve"]))


if __name__ == "__main__":
    main(sys.argv)
