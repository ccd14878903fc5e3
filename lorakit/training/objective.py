"""What one training objective computes; the loop (lorakit.training.loop) does everything else.

An objective owns its rows and its loss: how rows become examples and batches, the loss of a
micro-batch and what it is normalised by, the metrics it logs, and what else it needs from the
run (the base without adapters as a reference, or generated rollouts). The loop owns steps,
accumulation over micro-batches and ranks, clipping, the non-finite policy, logging, evaluation
and checkpoint schedules, signals and the final save.

Losses are sums, never means: the loop sums `count` over a step's micro-batches on every rank
first and divides each micro-batch's loss by that total, so the gradient of a step is that of
one batch of all its rows however it is split into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class Examples(Protocol):
    """Prepared examples: indexable, sized, with a length per example for length grouping."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...
    @property
    def lengths(self) -> Sequence[int]: ...


@dataclass
class Terms:
    """One micro-batch's loss, summed over its units (tokens, pairs, ...), and the sums of the
    metrics the objective logs (divided by the step's count before logging)."""

    loss: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)


class Objective:
    """The interface the loop calls; SFT (lorakit.training.sft) is the first implementation."""

    needs_reference: bool = False  # the base without adapters (preference objectives)
    needs_generation: bool = False  # rollouts from the model being trained (RL)

    def prepare(self, data: Any, split: str) -> Examples:
        """Rows (a file, a Dataset, a list of dicts, ...) as examples; bad data fails here."""
        raise NotImplementedError

    def collate(self, examples: list[Any]) -> Batch:
        """Examples into one batch of tensors (on the CPU; the loop moves it)."""
        raise NotImplementedError

    def filler(self, data: Examples) -> Batch:
        """A batch that trains and scores nothing, for a rank whose share of a short last batch
        is empty: it keeps the ranks' collectives in step (FSDP2 gathers weights per forward)."""
        raise NotImplementedError

    def count(self, batch: Batch) -> tuple[int, int]:
        """(units the loss is normalised by, tokens processed for throughput)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        """The summed loss of `batch` on `model` (a LoraModel) and the metric sums to log."""
        raise NotImplementedError

    def log_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """The metrics to log from the means of the metric sums over the logged steps (KTO
        turns its per-class sums and counts into per-class means here)."""
        return means

    def eval_metrics(self, loss: float, count: int, sums: dict[str, float]) -> dict[str, float]:
        """Evaluation metrics from the summed loss, count and metric sums of all eval batches."""
        return {"eval_loss": loss / max(count, 1)}

    def run_config(self, train: Examples | None, eval: Examples | None) -> dict[str, Any]:
        """What the objective adds to the saved run config (data statistics, choices made)."""
        return {}

    def start(
        self,
        model: nn.Module,
        data: dict[str, Examples | None],
        saved: dict[str, torch.Tensor],
        autocast: Any,
    ) -> None:
        """Before the first step of train(): what the objective computes once over its data
        ("train" / "eval"), e.g. the reference's log-probs, or takes from `saved` (the
        `extra_state` of the checkpoint the run resumes from). `autocast`: the run's."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors each checkpoint keeps for the objective (objective.safetensors), so that a
        resumed run need not (or must not) compute them again."""
        return {}
