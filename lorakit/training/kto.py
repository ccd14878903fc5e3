"""Kahneman-Tversky optimisation on adapters: KTO's objective, and `KTOTrainer` (TRL's call).

A row is a prompt and one answer marked desirable or not. With r = log π(answer) − log π_ref
(answer) (sums over the answer's tokens; the reference is the model with its adapters off) and
z a baseline, per row (TRL's losses):
- kto: desirable 1 − σ(β(r − z)), undesirable 1 − σ(β(z − r)), z = max(0, mean KL estimate);
- apo_zero_unpaired: desirable 1 − σ(βr), undesirable σ(βr) (no baseline).
The KL estimate is r of mismatched rows: each prompt with the answer of the previous row of its
chunk of `per_device_train_batch_size` rows (the last row's for the first; TRL's rotation, fixed
when the data is prepared), averaged over the micro-batch and the ranks, without gradient.
Losses are weighted by desirable_weight / undesirable_weight and summed over rows; the loop
divides by the step's rows. Metrics are TRL's: kl, and per class rewards/… and logps/… (means
over that class's rows), rewards/margins.

A row and its mismatched answer share the prompt: they run as one packed example (the prompt
computed once), the mismatched answer in the second row of lorakit.training.paired's layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lorakit.data.preference import UnpairedData, prepare_unpaired
from lorakit.errors import ConfigError
from lorakit.training.config import KTOConfig, KTOOptions
from lorakit.training.objective import Batch, Terms
from lorakit.training.paired import PairedObjective, PreferenceTrainer

CLASSES = ("chosen", "rejected")  # TRL's metric names for desirable and undesirable rows


class KTOObjective(PairedObjective):
    """KTO's losses and metrics on unpaired rows (see the module docstring)."""

    answers = ("completion_ids", "kl_ids")
    unit = "rows"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.with_kl = self.options.loss_type == "kto"
        if self.with_kl and self.args.per_device_train_batch_size < 2:
            raise ConfigError(
                "KTO's KL estimate pairs each prompt with another row's answer from its batch: "
                "per_device_train_batch_size must be > 1 (as in TRL)"
            )

    def prepare(self, data: Any, split: str) -> UnpairedData:
        if not isinstance(data, UnpairedData):
            if self.tokenizer is None:
                raise ConfigError(f"{split} data is not tokenized yet: pass processing_class=")
            data = prepare_unpaired(
                data, self.tokenizer, self.args.max_length, both_labels=split == "train"
            )
        size = self.args.per_device_train_batch_size
        for lo in range(0, len(data), size):
            chunk = data.examples[lo : lo + size]
            previous = [chunk[-1]] + chunk[:-1]
            for e, other in zip(chunk, previous):
                e["kl_ids"] = other["completion_ids"] if self.with_kl else []
        return data

    def extra_columns(self, examples: list[dict]) -> Batch:
        return {"label": torch.tensor([e["label"] for e in examples], dtype=torch.bool)}

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        logps, ref, n = self.policy_and_reference(model, batch)
        (p, p_kl), (ref_p, ref_kl), n_p = logps.chunk(2), ref.chunk(2), n.chunk(2)[0]
        scored, o = n_p > 0, self.options
        good, bad = batch["label"] & scored, ~batch["label"] & scored
        kl = self._kl(p_kl.detach() - ref_kl, scored) if self.with_kl else p.new_zeros(())
        r = p - ref_p
        if self.with_kl:
            desirable, undesirable = (
                1 - F.sigmoid(o.beta * (r - kl)),
                1 - F.sigmoid(o.beta * (kl - r)),
            )
        else:
            desirable, undesirable = 1 - F.sigmoid(o.beta * r), F.sigmoid(o.beta * r)
        total = (o.desirable_weight * desirable)[good].sum() + (o.undesirable_weight * undesirable)[
            bad
        ].sum()
        rewards, p = o.beta * r.detach(), p.detach()
        sums = {"kl": kl * scored.sum()}
        for name, rows in zip(CLASSES, (good, bad)):
            sums |= {
                f"rewards/{name}": rewards[rows].sum(),
                f"logps/{name}": p[rows].sum(),
                f"count/{name}": rows.sum(),
            }
        return Terms(total, {k: float(v) for k, v in sums.items()})

    @staticmethod
    def _kl(log_ratios: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """max(0, mean log-ratio of the mismatched rows), over this micro-batch on every rank."""
        total = torch.stack([log_ratios[scored].sum(), scored.sum().to(log_ratios.dtype)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).clamp(min=0)

    def log_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Per-class means from the per-class sums and counts (a class absent from the logged
        steps is left out, as TRL does)."""
        out = {"kl": means["kl"]}
        for name in CLASSES:
            count = means[f"count/{name}"]
            if count > 0:
                out[f"rewards/{name}"] = means[f"rewards/{name}"] / count
                out[f"logps/{name}"] = means[f"logps/{name}"] / count
        if all(f"rewards/{name}" in out for name in CLASSES):
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def run_config(self, train: UnpairedData | None, eval: UnpairedData | None) -> dict:
        o = self.options
        return {
            "objective": "kto",
            "rows_packed_off": self.pack_off,
            "loss_type": o.loss_type,
            "beta": o.beta,
            "desirable_weight": o.desirable_weight,
            "undesirable_weight": o.undesirable_weight,
            "train_data": train.stats() if train is not None else None,
            "eval_data": eval.stats() if eval is not None else None,
        }


class KTOTrainer(PreferenceTrainer):
    """TRL's `KTOTrainer` call on lorakit's loop; the reference as DPOTrainer's."""

    objective_class, config_class, options_class = KTOObjective, KTOConfig, KTOOptions
