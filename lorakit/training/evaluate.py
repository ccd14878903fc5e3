"""Evaluation: an objective's metrics of a model on prepared examples, all ranks together.

A plain function: the loop calls it on its schedule, `lorakit eval` and scripts call it alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.training.launch import Launch
from lorakit.training.objective import Batch, Examples, Objective


def collate_share(objective: Objective, data: Examples, idx: list[int]) -> Batch:
    """The batch of examples `idx`, or the objective's filler when this rank's share is empty."""
    return objective.collate([data[i] for i in idx]) if idx else objective.filler(data)


@torch.no_grad()
def evaluate(
    model: nn.Module, objective: Objective, data: Examples, launch: Launch, batch_size: int
) -> dict[str, Any]:
    """The objective's evaluation metrics on `data`. Batches of similar lengths; under torchrun
    rank r evaluates batches r, r + ranks, ... and every rank runs as many forwards."""
    group, was_training = launch.group, model.training
    group.prepare_model(model, launch.device)  # several ranks: joins them, once
    model.eval()
    lengths = data.lengths
    order = sorted(range(len(data)), key=lambda i: lengths[i])
    chunks = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    mine = chunks[group.rank :: group.world_size]
    mine += [[]] * (-(-len(chunks) // group.world_size) - len(mine))
    loss, count, sums = 0.0, 0, {}
    for idx in mine:
        batch = collate_share(objective, data, idx)
        batch = {k: v.to(launch.device) for k, v in batch.items()}
        with launch.autocast():
            terms = objective.loss(model, batch, training=False)
        loss += float(terms.loss)
        count += objective.count(batch)[0]
        for key, value in terms.sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    totals = group.sum_floats(loss, count, *sums.values())
    model.train(was_training)
    return objective.eval_metrics(totals[0], int(totals[1]), dict(zip(sums, totals[2:])))
