"""Held-out preference metrics: answer log-probs of a model on tokenized pairs, compared with the reference's.

``pair_logps`` gives each pair's summed log-probability of the chosen and of the rejected answer given the prompt
(the quantity DPO compares). ``preference_metrics`` compares a policy's log-probs with the reference model's:
the share of pairs whose chosen answer gained more log-probability over the reference than the rejected one did
(DPO's reward accuracy, ties counted half, so an untrained policy scores exactly 0.5), the mean of that margin,
the held-out DPO loss, and the share of pairs whose chosen answer is the more likely one outright.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _rows(features: Sequence[dict], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, answer mask) of the chosen rows, then the rejected rows, right-padded."""
    rows = [(f["prompt_ids"], f[key]) for key in ("chosen_ids", "rejected_ids") for f in features]
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    ids, attention, answer_mask = [], [], []
    for prompt, answer in rows:
        pad = length - len(prompt) - len(answer)
        ids.append(prompt + answer + [pad_token_id] * pad)
        attention.append([1] * (len(prompt) + len(answer)) + [0] * pad)
        answer_mask.append([0] * len(prompt) + [1] * len(answer) + [0] * pad)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(answer_mask)


@torch.no_grad()
def pair_logps(model: nn.Module, features: Sequence[dict], pad_token_id: int, batch_size: int = 2) -> torch.Tensor:
    """``(pairs, 2)`` float64: each pair's summed log-prob of its chosen and of its rejected answer (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        ids, attention, answer_mask = (t.to(device) for t in _rows(chunk, pad_token_id))
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]
        per_row = (token_logps * answer_mask[:, 1:]).sum(dim=1).double().cpu()
        sums.append(torch.stack(per_row.chunk(2), dim=1))
    model.train(was_training)
    return torch.cat(sums)


def _share(values: torch.Tensor) -> float:
    """Share of positive values, zeros counted half."""
    return float(((values > 0).double() + 0.5 * (values == 0).double()).mean())


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """Held-out preference metrics of ``policy`` log-probs against ``reference`` ones (both ``(pairs, 2)``)."""
    margins = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return {
        "preference_accuracy": round(_share(margins), 4),
        "mean_margin": round(float(margins.mean()), 4),
        "dpo_loss": round(float(-F.logsigmoid(beta * margins).mean()), 4),
        "logprob_accuracy": round(_share(policy[:, 0] - policy[:, 1]), 4),
        "mean_logprob_gap": round(float((policy[:, 0] - policy[:, 1]).mean()), 4),
    }
