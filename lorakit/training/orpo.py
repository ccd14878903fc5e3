"""Odds-ratio preference optimisation on adapters: ORPO's objective, and `ORPOTrainer` (the call
of TRL's trl.experimental.orpo).

ORPO needs no reference model. With a = the mean log-probability of an answer's tokens under the
policy, odds(a) = a − log(1 − eᵃ), per micro-batch (TRL's loss):
    loss = NLL − mean over pairs of β·log σ(odds(a_chosen) − odds(a_rejected)),
NLL being the mean negative log-likelihood of every token of the chosen sequences, prompt
included (each token predicted from the ones before it). Metrics are TRL's: rewards/… (β·a),
rewards/accuracies, rewards/margins, logps/… (a), nll_loss, log_odds_ratio (the log σ term) and
log_odds_chosen (its argument).

Rows are tokenized as lorakit's DPO tokenizes them (TRL's stable preference trainers); TRL's
experimental ORPO adds BOS and EOS ids itself, which gives the same tokens where the template or
the answers already carry them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.training.config import ORPOConfig, ORPOOptions
from lorakit.training.launch import Launch
from lorakit.training.objective import Batch, Terms
from lorakit.training.paired import PairedObjective, PreferenceTrainer, token_logps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −log 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


class ORPOObjective(PairedObjective):
    """ORPO's loss and metrics on pairs (see the module docstring)."""

    needs_reference = False
    prompt_scored = True

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        token, rows, answer = token_logps(model.model, batch)
        n = batch["n"] if "n" in batch else batch["completion_mask"].sum(1)
        pairs = len(n) // 2
        sums = torch.zeros(len(n), device=token.device).index_add(0, rows[answer], token[answer])
        chosen_tokens = rows < pairs  # the chosen sequences' tokens, prompt included
        nll = -token[chosen_tokens].sum() / chosen_tokens.sum().clamp(min=1)
        mean_c, mean_r = (sums / n.clamp(min=1)).chunk(2)
        scored = n[:pairs] > 0
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        ratio = F.logsigmoid(log_odds)
        beta = self.options.beta
        total = scored.sum() * nll - (beta * ratio)[scored].sum()
        reward_c, reward_r = (beta * mean_c.detach())[scored], (beta * mean_r.detach())[scored]
        sums = {
            "rewards/chosen": reward_c.sum(),
            "rewards/rejected": reward_r.sum(),
            "rewards/accuracies": (reward_c > reward_r).float().sum(),
            "rewards/margins": (reward_c - reward_r).sum(),
            "logps/chosen": mean_c.detach()[scored].sum(),
            "logps/rejected": mean_r.detach()[scored].sum(),
            "nll_loss": nll.detach() * scored.sum(),
            "log_odds_ratio": ratio.detach()[scored].sum(),
            "log_odds_chosen": log_odds.detach()[scored].sum(),
        }
        return Terms(total, {k: float(v) for k, v in sums.items()})

    def run_config(self, train: Any, eval: Any) -> dict:
        return {
            "objective": "orpo",
            "pairs_packed_off": self.pack_off,
            "beta": self.options.beta,
            "train_data": train.stats() if train is not None else None,
            "eval_data": eval.stats() if eval is not None else None,
        }


class ORPOTrainer(PreferenceTrainer):
    """The call of TRL's `ORPOTrainer` (trl.experimental.orpo) on lorakit's loop."""

    objective_class, config_class, options_class = ORPOObjective, ORPOConfig, ORPOOptions

    def __init__(
        self,
        model=None,
        args: ORPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        compute_metrics: Any = None,
        launch: Launch | None = None,
        options: ORPOOptions | None = None,
    ) -> None:
        """TRL's call, plus lorakit's `launch` and `options` (as DPOTrainer's)."""
        self._setup(
            model, args, (train_dataset, eval_dataset), processing_class, callbacks, peft_config,
            launch, options, None, data_collator=data_collator, model_init=model_init,
            optimizers=optimizers, compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip
