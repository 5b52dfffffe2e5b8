"""Real batches for ``leanft bench data=...``: the data's own examples, tokenized and collated as ``leanft train`` does.

Every row of the bench sees the same examples at the same step index (one fixed shuffle, whatever a row's seed),
each row collated its own way: padded to the longest example, or padding-free (``padding_free``). A step then
reports the examples' own tokens and the tokens it computed, so tokens/s counts real tokens only and rows compare
on equal work.
"""

from __future__ import annotations

import contextlib
import random

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from leanft.core.packed import varlen_sdpa
from leanft.run.config import TrainConfig
from leanft.run.data import tokenize_and_count
from leanft.run.sources import load_records
from leanft.run.train import training_collator

ORDER_SEED = 0  # one shuffle of the examples for every row, so each step index is the same examples everywhere


class RealBatches:
    """The training batches of ``config``'s data for one row: step ``index`` takes the next ``batch_size``
    examples of the fixed shuffle (cycling), collated as the row's train config says."""

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        records = load_records(config)[0]
        self.features = tokenize_and_count(records, tokenizer, config.max_seq_len, config.packing)[0]
        self.order = random.Random(ORDER_SEED).sample(range(len(self.features)), len(self.features))
        self.collator = training_collator(config, model, tokenizer.pad_token_id)
        self.batch_size = config.batch_size

    def batch(self, index: int, device: str) -> tuple[dict[str, torch.Tensor], int]:
        """Step ``index``'s batch on ``device`` and the number of its examples' own tokens."""
        start = index * self.batch_size
        chosen = [self.features[self.order[(start + k) % len(self.order)]] for k in range(self.batch_size)]
        batch = {key: value.to(device) if torch.is_tensor(value) else value
                 for key, value in self.collator(chosen).items()}
        return batch, sum(len(feature["input_ids"]) for feature in chosen)

    def attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Where the step runs: per-example attention for padding-free rows, as training runs them."""
        return varlen_sdpa(model) if self.collator.packing else contextlib.nullcontext()
