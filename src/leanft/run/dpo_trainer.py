"""TRL's ``DPOTrainer`` with leanft's checkpoints, optimizers and logs, and a reference model without a copy.

``LeanftDPOTrainer`` is ``LeanftTrainer`` (the method's own checkpoints marked complete, APOLLO, leanft's metrics)
over ``trl.DPOTrainer``. The reference model depends on the method:

* PaCA and S2FT: ``leanft.core.reference.ReferenceView``, the policy with its trained columns switched off;
* LoRA: the same view, with peft's ``disable_adapter``;
* full fine-tuning: TRL's ``precompute_ref_log_probs``, the reference log-probs of every training pair computed by
  the model before its first step (nothing to switch off afterwards).

No method holds a second copy of the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import trl
from torch import nn

from leanft.core.compat import PretokenizedPreferences
from leanft.core.reference import ReferenceView, has_reference_pass
from leanft.run.config import TrainConfig
from leanft.run.trainer import LeanftTrainer, training_argument_values


class LeanftDPOTrainer(LeanftTrainer, PretokenizedPreferences, trl.DPOTrainer):
    """``LeanftTrainer`` over TRL's ``DPOTrainer``, on pairs leanft tokenized (``leanft.run.preferences``)."""

    def create_model_card(self, *args, **kwargs) -> None:
        """No hub model card in the run folder (the run's ``summary.json`` describes it)."""


def reference_for(model: nn.Module) -> ReferenceView | None:
    """The reference model of ``model`` as a view of it, or None where the reference log-probs are precomputed."""
    return ReferenceView(model) if has_reference_pass(model) else None


def dpo_arguments(config: TrainConfig, run_dir: Path, dropbp_on: bool, precompute: bool) -> trl.DPOConfig:
    """TRL's ``DPOConfig`` for a run: leanft's training arguments and the ``dpo.*`` keys.

    Activation checkpointing stays leanft's (``gradient_checkpointing`` of the config, non-reentrant); TRL only
    turns it off around reference passes and back on the same way. ``precompute``: the reference log-probs of the
    training pairs are computed before training (full fine-tuning).
    """
    with warnings.catch_warnings():  # TRL's config has gradient_checkpointing on by default: leanft turns it off
        warnings.filterwarnings("ignore", "`gradient_checkpointing", FutureWarning)
        return trl.DPOConfig(
            **training_argument_values(config, run_dir, dropbp_on, padding_free=False),
            beta=config.dpo.beta,
            loss_type=[config.dpo.loss_type],
            max_length=config.max_seq_len,
            precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=config.batch_size,
            gradient_checkpointing=False,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            disable_dropout=True,
        )
