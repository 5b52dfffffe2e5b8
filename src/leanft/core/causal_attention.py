"""Causal self-attention of one example in bf16 on the CPU, as plain batched matrix products.

PyTorch's fused CPU attention kernel (SDPA's flash kernel) runs bf16 at about fp32 speed, and its backward at about
three times its forward, so in bf16 it took over a third of a training step of SmolLM2 on 300-token examples.
``CausalAttention`` computes the same attention with bf16 ``bmm`` (which runs at native bf16 speed) and PyTorch's
fused softmax (computed in fp32), and keeps only its inputs for backward, never the L x L probabilities (backward
recomputes them). Query heads that share a key/value head (grouped-query attention) run as one product against
that head. Its scores are materialised per example, so it serves examples up to ``MAX_LENGTH`` tokens, where it
measured faster; longer ones, fp32, accelerators and anything else go to SDPA (``fits``).
"""

from __future__ import annotations

import torch

from leanft.core.compat import softmax_backward

MAX_LENGTH = 512  # longest example it serves: 1.0-2.1x faster than SDPA up to here, slower from about 1024


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float = 0.0, **kwargs) -> bool:
    """Whether ``CausalAttention`` serves this (1, heads, L, head_dim) attention: bf16 on the CPU, eager, one
    example of at most ``MAX_LENGTH`` tokens, no dropout, softcap or attention sinks, whole key/value groups."""
    return (
        query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and not torch.compiler.is_compiling()
        and query.shape[0] == 1
        and 1 < query.shape[2] == key.shape[2] <= MAX_LENGTH
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )


def _probabilities(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (kv heads, group * L, L) of scaled grouped queries (kv heads, group * L, d): bf16
    scores, as transformers' eager attention has them, and a softmax computed in fp32."""
    heads, length = key.shape[0], key.shape[1]
    scores = torch.bmm(query, key.transpose(1, 2)).view(heads, -1, length, length).masked_fill_(mask, float("-inf"))
    return torch.softmax(scores, -1).view(heads, -1, length)


class CausalAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + causal mask) v`` for q (1, heads, L, d) and k, v (1, kv heads, L, d)."""

    @staticmethod
    def forward(ctx, query, key, value, scale):  # noqa: D102 - autograd protocol
        _, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        grouped = (query[0] * scale).reshape(kv_heads, heads // kv_heads * length, dim)
        key, value = key[0], value[0]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
        output = torch.bmm(_probabilities(grouped, key, mask), value)
        ctx.save_for_backward(grouped, key, value, mask)
        ctx.scale, ctx.query_shape = scale, query.shape
        return output.view(1, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - autograd protocol
        grouped, key, value, mask = ctx.saved_tensors
        kv_heads, rows, dim = grouped.shape
        grad_output = grad_output[0].reshape(kv_heads, rows, dim).to(grouped.dtype)
        probabilities = _probabilities(grouped, key, mask)  # recomputed: nothing L x L is kept between the passes
        grad_value = torch.bmm(probabilities.transpose(1, 2), grad_output)
        grad_probabilities = torch.bmm(grad_output, value.transpose(1, 2))
        grad_scores = softmax_backward(grad_probabilities, probabilities, -1)
        grad_query = torch.bmm(grad_scores, key).mul_(ctx.scale).view(ctx.query_shape)
        grad_key = torch.bmm(grad_scores.transpose(1, 2), grouped)
        return grad_query, grad_key[None], grad_value[None], None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
                     ) -> torch.Tensor:
    """Causal attention of one example, (1, L, heads, d) as transformers' attention functions return it; ``scale``
    defaults to 1 / sqrt(d). Check ``fits`` first."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return CausalAttention.apply(query, key, value, scale).transpose(1, 2)
