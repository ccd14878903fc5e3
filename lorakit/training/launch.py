"""A run's placement, resolved once: process group, device, precision, batch split and seed.

`resolve_launch(args)` reads torchrun's environment and the config; the recipe, the trainer and
evaluation all take the same `Launch` instead of resolving any of it again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lorakit.base.loading import bf16_is_fast, resolve_device
from lorakit.training.config import TrainConfig
from lorakit.training.distributed import ProcessGroup, per_rank_batch_size, process_group


@dataclass(frozen=True)
class Launch:
    group: ProcessGroup  # a group of one without torchrun
    device: torch.device  # this rank's
    bf16: bool  # bf16 autocast around forwards
    per_rank_batch: int  # examples per rank per micro-batch
    accumulation: int  # micro-batches per optimizer step
    seed: int

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, all ranks and micro-batches together: what is drawn,
        shuffled and length-grouped as one batch."""
        return self.per_rank_batch * self.group.world_size * self.accumulation

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def resolve_launch(args: TrainConfig, group: ProcessGroup | None = None) -> Launch:
    """The launch `args` describes in this process's environment. A broken torchrun
    environment, or a batch the ranks cannot split, fails here alike on every rank."""
    group = group if group is not None else process_group(args)
    device = group.local_device(resolve_device(args.device))
    return Launch(
        group=group,
        device=device,
        bf16=bf16_is_fast(device) if args.bf16 is None else args.bf16,
        per_rank_batch=per_rank_batch_size(args, group.world_size),
        accumulation=args.gradient_accumulation_steps,
        seed=args.seed,
    )


def split_global_batch(
    indices: list[int], per_rank: int, world_size: int, rank: int
) -> list[list[int]]:
    """This rank's micro-batches of one global batch: consecutive slices of per_rank × ranks
    examples (neighbours in a length-grouped batch have similar lengths), of which rank r takes
    examples r, r + ranks, ... Every rank gets the same number of micro-batches; a short last
    global batch may leave a rank's share of its last slice empty."""
    width = per_rank * world_size
    return [indices[lo : lo + width][rank::world_size] for lo in range(0, len(indices), width)]
