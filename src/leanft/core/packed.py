"""Padding-free batches: a batch's examples in one row, each attending only to itself.

``flatten_examples`` concatenates examples into a single row with ``position_ids`` that restart at every example,
and labels masked at every example start, so the loss of the row is the padded batch's loss (the last token of an
example never predicts the next example's first token). ``transformers`` keeps such examples apart by itself when
it gets ``position_ids`` without an ``attention_mask`` and no cache (it derives a block-diagonal mask for eager and
SDPA attention); the row also carries the examples' boundaries (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``,
the keywords transformers' flash-attention path reads). Models that ignore ``position_ids`` for masking (OPT, for
example) get the block-diagonal causal mask as an explicit 4D additive mask instead (``block_mask=True``).
``packed_attention_mode(model)`` finds out which of the two a model honours, from two tiny forward passes.

A block-diagonal mask makes SDPA compute the whole row's T x T scores with its masked kernel, which on a CPU is
slower than the padded batch. ``varlen_sdpa(model)`` (a context manager) switches an SDPA model to
``VARLEN_SDPA`` meanwhile: the same SDPA, run on each example's slice of the row with ``is_causal=True`` (its
fused causal kernel, no mask, no cross-example scores), wherever the boundaries reach the attention; in bf16 on
the CPU each example runs ``leanft.core.causal_attention`` instead, which is faster there than the fused kernel.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from leanft.core import causal_attention
from leanft.core.chunked_loss import IGNORE_INDEX

POSITIONS = "positions"  # transformers derives the block-diagonal mask from restarting position ids
BLOCK_MASK = "block_mask"  # leanft passes the block-diagonal causal mask as a 4D additive mask
VARLEN_SDPA = "leanft_sdpa_varlen"  # the attention implementation of varlen_sdpa


def sequence_starts(position_ids: Sequence[int]) -> list[bool]:
    """Whether each token starts an example: its position id is 0 or does not follow the previous one by 1."""
    return [i == 0 or pos != position_ids[i - 1] + 1 for i, pos in enumerate(position_ids)]


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (1, 1, T, T) additive mask of one packed row: 0 where a token may attend (itself and earlier tokens of
    its own example), the dtype's minimum elsewhere."""
    starts = torch.tensor(sequence_starts(position_ids.tolist()), device=position_ids.device)
    example = starts.cumsum(0)
    allowed = (example[:, None] == example[None, :]) & torch.ones(
        len(example), len(example), dtype=torch.bool, device=position_ids.device
    ).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def flatten_examples(
    features: Sequence[dict[str, Sequence[int]]], block_mask: bool = False, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """One (1, T) row of ``input_ids``, ``labels`` and ``position_ids`` from examples of any lengths, no padding.

    An example's ``position_ids`` default to ``0 .. len - 1``; given ones (a packed block) are kept. Every token
    that starts an example gets label ``-100``. With ``block_mask=True`` the row also gets the block-diagonal causal
    mask as a 4D ``attention_mask`` of ``mask_dtype`` (for models that do not derive it from ``position_ids``);
    without, it gets the examples' boundaries (``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``,
    ``max_length_k``). Run the model on it without a KV cache (``use_cache=False``, or within ``varlen_sdpa``):
    with one, transformers does not mask by position.
    """
    input_ids, labels, positions = [], [], []
    for feature in features:
        ids = list(feature["input_ids"])
        input_ids += ids
        labels += list(feature["labels"])
        positions += list(feature.get("position_ids") or range(len(ids)))
    starts = sequence_starts(positions)
    labels = [IGNORE_INDEX if start else label for label, start in zip(labels, starts, strict=True)]
    batch = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }
    if block_mask:
        batch["attention_mask"] = block_causal_mask(batch["position_ids"][0], mask_dtype)
        return batch
    bounds = torch.tensor([*(i for i, start in enumerate(starts) if start), len(positions)], dtype=torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {**batch, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def sdpa_per_example(module, query, key, value, attention_mask, **kwargs):
    """``VARLEN_SDPA``: transformers' SDPA attention, run per example of a padding-free row when the row's example
    boundaries are given (``cu_seq_lens_q``: causal, no mask), else exactly as SDPA (padded batches, generation,
    sliding windows shorter than an example, boundaries that do not span the row), which masks by position."""
    cu_seq_lens_q = kwargs.pop("cu_seq_lens_q", None)
    window = getattr(module, "sliding_window", None)
    longest = kwargs.get("max_length_q") or 0
    bounds = [] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    whole_row = len(bounds) > 1 and bounds[0] == 0 and bounds[-1] == query.shape[2]  # else cut (a dispatched batch)
    if not whole_row or query.shape[0] != 1 or (window is not None and longest > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        attend_causally(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], **kwargs)
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None


def attend_causally(module, query, key, value, **kwargs) -> torch.Tensor:
    """One example's causal attention, (1, L, heads, d): ``leanft.core.causal_attention`` where it fits (bf16 on
    the CPU, where it is faster than SDPA's fused kernel), else SDPA's fused causal kernel."""
    if causal_attention.fits(query, key, value, **kwargs):
        return causal_attention.causal_attention(query, key, value, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)[0]


AttentionInterface.register(VARLEN_SDPA, sdpa_per_example)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches still get SDPA's masks


@contextlib.contextmanager
def varlen_sdpa(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, an SDPA model attends per example on padding-free rows (``VARLEN_SDPA``), and builds no
    KV cache; other attention implementations are left alone. Restores both on exit."""
    config = model.config
    implementation, use_cache = config._attn_implementation, getattr(config, "use_cache", None)
    config.use_cache = False  # with a cache, transformers would not keep packed examples apart
    if implementation == "sdpa":
        model.set_attn_implementation(VARLEN_SDPA)
    try:
        yield
    finally:
        config.use_cache = use_cache
        if implementation == "sdpa":
            model.set_attn_implementation(implementation)


@torch.no_grad()
def packed_attention_mode(model: torch.nn.Module) -> str | None:
    """How ``model`` keeps examples of a padding-free row apart: ``POSITIONS``, ``BLOCK_MASK``, or None (neither).

    Runs a 3-token and a 4-token example alone and packed in one row (eval mode, no cache) and accepts a mode when
    the packed logits of the second example are at least 10x closer to its logits alone than the logits it gets
    with the first example in its context: a tolerance that holds in bf16 as in fp32.
    """
    was_training = model.training
    model.eval()
    try:
        embeddings = model.get_input_embeddings()
        device, vocab = embeddings.weight.device, embeddings.num_embeddings
        first, second = [(3 + i * 7) % vocab for i in range(3)], [(5 + i * 11) % vocab for i in range(4)]

        def logits(**batch) -> torch.Tensor:
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            return model(**batch, use_cache=False).logits[0, -len(second) :].float()

        alone = logits(input_ids=torch.tensor([second]))
        leaked = logits(input_ids=torch.tensor([first + second]))
        leak = (leaked - alone).abs().max()
        features = [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]
        for mode in (POSITIONS, BLOCK_MASK):
            row = flatten_examples(features, block_mask=mode == BLOCK_MASK, mask_dtype=embeddings.weight.dtype)
            row.pop("labels")
            with contextlib.suppress(TypeError):  # a forward without **kwargs refuses the boundary keywords
                if (logits(**row) - alone).abs().max() * 10 <= leak:
                    return mode
        return None
    finally:
        model.train(was_training)
