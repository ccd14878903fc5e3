"""Direct preference optimisation on adapters: DPO's objective, and `DPOTrainer` (TRL's call).

A pair is a prompt with a chosen and a rejected answer; its log-probabilities are summed over
each answer's tokens, under the policy (the model with its adapters) and under the reference (the
same model with its adapters switched off: no second copy of the base). With
r = log π(answer) − log π_ref(answer) and Δ = r_chosen − r_rejected, per pair (TRL's losses):
- sigmoid: −log σ(βΔ) (the paper's);
- hinge:   max(0, 1 − βΔ);
- ipo:     (r_chosen / n_chosen − r_rejected / n_rejected − 1/(2β))², n: answer tokens;
- robust:  (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing;
- sft:     −Σ log π(chosen tokens) / Σ chosen tokens over the micro-batch, for every pair (the
           NLL that keeps the chosen answers likely; with sigmoid it is RPO).
Several losses combine as Σ weight_k · loss_k. The loss is summed over pairs; the loop divides by
the step's pairs, so a step is the mean over its global batch. Metrics are TRL's:
rewards/chosen, rewards/rejected (β·r), rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.preference import PreferenceData
from lorakit.errors import ConfigError
from lorakit.training.config import DPO_LOSS_TYPES as LOSS_TYPES
from lorakit.training.config import DPOConfig, DPOOptions
from lorakit.training.objective import Batch, Terms
from lorakit.training.paired import PairedObjective, PreferenceTrainer

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_loss(
    kind: str, r_c, r_r, n_c, n_r, beta: float, smoothing: float, p_c: torch.Tensor
) -> torch.Tensor:
    """One loss type's value for each scored pair, from the log-ratios r, the answer lengths n
    and the policy's log-probs p_c of the chosen answers (all of scored pairs only)."""
    delta = r_c - r_r
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        return (r_c / n_c - r_r / n_r - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (
            -(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)
        ) / (1 - 2 * smoothing)
    if kind == "sft":
        return (-p_c.sum() / n_c.sum()).expand_as(p_c)
    raise ConfigError(f"loss_type {kind!r}: lorakit has {LOSS_TYPES}")


class DPOObjective(PairedObjective):
    """DPO's losses and metrics on pairs (see the module docstring)."""

    name = "dpo"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.options
        weights = options.loss_weights or [1.0] * len(options.loss_type)
        self.losses = list(zip(options.loss_type, weights))

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        logps, ref, n = self.policy_and_reference(model, batch)
        (p_c, p_r), (ref_c, ref_r), (n_c, n_r) = logps.chunk(2), ref.chunk(2), n.chunk(2)
        scored = n_c > 0  # a filler batch scores nothing
        r_c, r_r = p_c - ref_c, p_r - ref_r
        args = self.options
        on = (r_c[scored], r_r[scored], n_c[scored], n_r[scored].clamp(min=1))
        total = sum(
            weight * pair_loss(kind, *on, args.beta, args.label_smoothing, p_c[scored]).sum()
            for kind, weight in self.losses
        )
        reward_c, reward_r = (args.beta * r_c.detach())[scored], (args.beta * r_r.detach())[scored]
        sums = {
            "rewards/chosen": reward_c.sum(),
            "rewards/rejected": reward_r.sum(),
            "rewards/accuracies": (reward_c > reward_r).float().sum(),
            "rewards/margins": (reward_c - reward_r).sum(),
            "logps/chosen": p_c.detach()[scored].sum(),
            "logps/rejected": p_r.detach()[scored].sum(),
        }
        return Terms(total, {k: float(v) for k, v in sums.items()})

    def run_config(self, train: PreferenceData | None, eval: PreferenceData | None) -> dict:
        return {
            "objective": "dpo",
            "pairs_packed_off": self.pack_off,
            "loss_type": self.options.loss_type,
            "beta": self.options.beta,
            "train_data": train.stats() if train is not None else None,
            "eval_data": eval.stats() if eval is not None else None,
        }


class DPOTrainer(PreferenceTrainer):
    """TRL's `DPOTrainer` call on lorakit's loop; the reference is the model with its adapters
    switched off (pass a base model and `peft_config`, or a model with fresh adapters), or the
    model as given (reference="start")."""

    objective_class, config_class, options_class = DPOObjective, DPOConfig, DPOOptions
