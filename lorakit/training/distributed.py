"""Training on several processes and machines: the same run as on one process, launched by torchrun.

    torchrun --nproc_per_node 4 -m lorakit train --config run.yaml               # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0:29500 --rdzv-id run1 -m lorakit train --config run.yaml

`SFTTrainer` always talks to a `ProcessGroup`, which `process_group(args)` builds from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without WORLD_SIZE (or with
WORLD_SIZE=1) it is a group of one, whose collectives change nothing: the loop has no
single-process branch. Under torchrun it is a `MultiProcessGroup`: gloo on CPU, NCCL on CUDA.

Why N processes compute the 1-process run:
- Data: every rank reads all the data and computes the same global batch order from the seeded
  sampler (global micro-batch = per-rank batch × ranks); rank r takes examples r, r+N, r+2N, ...
  of each global micro-batch. So the global batch is exactly the 1-process batch of
  per-rank batch × ranks, and steps, epochs and the learning-rate schedule mean the same thing.
- Loss: the trained-token count of the step's micro-batches is summed over ranks first, and each
  rank divides its summed token loss by that global count: the sum of the ranks' gradients is
  then the 1-process gradient (up to float summation order).
- Gradients: the adapter gradients (the only ones: the base is frozen) are summed over ranks in
  one flat all-reduce per optimizer step. Every rank then holds the same gradient, clips it and
  steps the same AdamW the same way, so the replicas stay equal without any weight broadcast
  (rank 0's adapters are broadcast once, at the start).
- Dropout: the RNG is reseeded from (seed, step, rank) before each step, so a resumed run draws
  the same masks on every rank without per-rank RNG files.

Why a manual all-reduce and not DistributedDataParallel: the trainable state is the adapters,
megabytes, so one flat all-reduce per optimizer step (after all accumulated micro-batches) costs
little and needs no bucketing or overlap; DDP would broadcast the whole module, frozen (maybe
4-bit) base included, at construction, average gradients where we need the token-weighted sum,
need `no_sync` around accumulation, and need every rank to run a forward even when a short last
batch leaves it no example. The same all-reduce carries the step's loss (for the NaN check) and
the ranks' stop requests (SIGTERM), so all ranks agree on both; and it serves the FSDP2 mode too.

Replicate mode (`TrainConfig.distributed_mode="replicate"`, the default; "ddp" is its earlier
name) is all of the above: every rank holds the whole base, and only the adapter gradients cross.

FSDP2 mode (`TrainConfig.distributed_mode="fsdp2"`), for bases that do not fit one device:
`torch.distributed.fsdp.fully_shard` shards the frozen base per decoder layer (and the embedding
/ norm / head units), while the adapters are left out of the sharding (`ignored_params`) and stay
whole on every rank, trained exactly as in "replicate" mode. Adapters and their AdamW state are a
fraction of a percent of the base, so sharding them would save little and would make every
checkpoint and adapter save a gather; this way checkpoints, resume and PEFT adapter files are the
same code as on one process. Tried with torch 2.13: fully_shard works on CPU with gloo, also with
frozen and trainable parameters in one sharded unit (gradients equal the unsharded ones), and on
bitsandbytes 4-bit bases (bitsandbytes restores the quantization state after the all-gather).
Every rank must run the same forwards in this mode (each forward all-gathers the layer's shards),
so a rank without an example in a short last batch runs a 2-token forward that trains nothing.

Ill-configured launches fail on every rank with the same message before any collective: the
checks depend only on the environment, the config and the data, which every rank reads alike.
Joining the process group waits at most `TrainConfig.ddp_timeout` seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lorakit import compat
from lorakit.errors import UserError
from lorakit.lora import backends
from lorakit.training.config import TrainConfig, canonical_mode

_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(UserError, ValueError):
    """A multi-process launch that cannot work; raised alike on every rank, before collectives."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The validated torchrun environment, or None for a single process (WORLD_SIZE unset or 1)."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE") is None and env.get("RANK") is None:
        return None
    if env.get("WORLD_SIZE") == "1" and env.get("RANK", "0") == "0":
        return None
    missing = [k for k in _RENDEZVOUS if not env.get(k)]
    if missing:
        are = "is" if len(missing) == 1 else "are"
        raise LaunchError(
            f"RANK/WORLD_SIZE are set but {', '.join(missing)} {are} not: launch with torchrun "
            "(it sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or set "
            "them all (MASTER_ADDR:MASTER_PORT = rank 0's address and a free port)"
        )
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            values[key] = int(env[key])
        except ValueError:
            raise LaunchError(f"{key}={env[key]!r} is not an integer") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise LaunchError(f"RANK={values['RANK']} is not in [0, WORLD_SIZE={values['WORLD_SIZE']})")
    return LaunchEnv(
        values["RANK"],
        values["WORLD_SIZE"],
        values["LOCAL_RANK"],
        env["MASTER_ADDR"],
        values["MASTER_PORT"],
    )


def per_rank_batch_size(args, world_size: int) -> int:
    """Examples per rank per micro-batch: per_device_train_batch_size, or global_batch_size split
    over the ranks and accumulation steps (which must divide it)."""
    if args.global_batch_size is None:
        return args.per_device_train_batch_size
    parts = world_size * args.gradient_accumulation_steps
    if args.global_batch_size % parts:
        raise LaunchError(
            f"global_batch_size={args.global_batch_size} is not divisible by {world_size} "
            f"rank(s) x {args.gradient_accumulation_steps} accumulation step(s) = {parts}; use a "
            f"multiple of {parts}, or another number of processes"
        )
    return args.global_batch_size // parts


def local_device(device: torch.device, env: LaunchEnv | None) -> torch.device:
    """`cuda` means this rank's GPU (LOCAL_RANK) under torchrun."""
    if env is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def shutdown() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_group(args: TrainConfig) -> ProcessGroup:
    """The group this process trains in: torchrun's ranks, or a group of one without torchrun."""
    env = launch_env()
    if env is None:
        return ProcessGroup()
    return MultiProcessGroup(env, args.distributed_mode, args.ddp_timeout)


class ProcessGroup:
    """A process group of one: what `SFTTrainer` asks of its ranks, answered by one process.

    Every collective is an identity (the sum over one rank is its own value) and every check
    passes, so the trainer calls them unconditionally; `MultiProcessGroup` does the real work."""

    mode = "single"
    rank, world_size, is_main = 0, 1, True

    def local_device(self, device: torch.device) -> torch.device:
        """The device this process trains on, given the configured one."""
        return device

    def describe(self, per_rank: int, accumulation: int) -> str | None:
        """A line for the start of the run, or None when there is nothing to say."""
        return None

    def run_config(self, per_rank: int, accumulation: int) -> dict[str, Any]:
        """The group's part of the saved run config: nothing for one process."""
        return {}

    # -- checks before any collective -----------------------------------------------------------
    def check_data(self, n_examples: int) -> None:
        """Fail before training if the data cannot give every rank an example."""

    def check_model(self, model: nn.Module) -> None:
        """Fail before training if the model cannot be placed in this mode."""

    # -- the model --------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, device: torch.device) -> None:
        """Place the model on `device` for training or evaluation."""
        model.to(device)

    # -- collectives in the loop ------------------------------------------------------------------
    def seed_step(self, seed: int, step: int) -> None:
        """Reseed before a step. One process keeps the single stream seeded at the start of
        `train()`: its dropout masks then follow from the seed and the steps run, and a resume
        restores that stream from the checkpoint."""

    def sum_ints(self, *values: int) -> list[int]:
        return list(values)

    def sum_floats(self, *values: float) -> list[float]:
        return [float(v) for v in values]

    def reduce_step(
        self, params: Sequence[torch.Tensor], loss: float, stop: bool
    ) -> tuple[float, bool]:
        """The step's gradients (left in `params`), loss and stop request, summed over ranks."""
        return loss, stop

    def should_stop(self, agreed: bool, requested: bool) -> bool:
        """Whether to stop after this step, given the request `agreed` in `reduce_step` and this
        process's request now. One process agrees with itself at any moment, so a signal that
        came during the rest of the step (optimizer, logging, evaluation) stops it too."""
        return requested

    def any_rank(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank if the ranks do not all have the same `value`."""


class MultiProcessGroup(ProcessGroup):
    """Several processes launched by torchrun, in mode "replicate" or "fsdp2" (see the module
    doc): torch.distributed collectives over gloo (CPU) or NCCL (CUDA)."""

    def __init__(self, env: LaunchEnv, mode: str = "replicate", timeout_s: int = 1800) -> None:
        self.env, self.mode, self.timeout_s = env, canonical_mode(mode), timeout_s
        self.rank, self.world_size, self.is_main = env.rank, env.world_size, env.is_main
        self.device = torch.device("cpu")
        self._prepared: nn.Module | None = None

    def local_device(self, device: torch.device) -> torch.device:
        return local_device(device, self.env)

    def describe(self, per_rank: int, accumulation: int) -> str:
        return (
            f"{self.world_size} ranks ({self.mode}, {self._backend(self.device)}): global "
            f"batch {per_rank * self.world_size * accumulation} = {per_rank} per rank x "
            f"{self.world_size} ranks x {accumulation} accumulation step(s)"
        )

    def run_config(self, per_rank: int, accumulation: int) -> dict[str, Any]:
        return {
            "distributed": {
                "mode": self.mode,
                "world_size": self.world_size,
                "per_rank_batch_size": per_rank,
                "global_batch_size": per_rank * self.world_size * accumulation,
            }
        }

    # -- checks before any collective: same inputs, same outcome on every rank -----------------
    def check_data(self, n_examples: int) -> None:
        if n_examples < self.world_size:
            raise LaunchError(
                f"{n_examples} training example(s) for {self.world_size} ranks: "
                f"every rank needs at least one; launch at most {n_examples} "
                "processes"
            )

    def check_model(self, model: nn.Module) -> None:
        if self.mode != "fsdp2":
            return
        int8 = [n for n, m in model.named_modules() if backends.is_linear8bit(m)]
        if int8:
            raise LaunchError(
                f"distributed_mode='fsdp2' cannot shard bitsandbytes 8-bit weights ({int8[0]}): "
                "their quantization state (CB/SCB) lives on the parameter object, which FSDP2 "
                "replaces when it gathers the shards; use distributed_mode='replicate', or a 4-bit "
                "(nf4/fp4) or unquantized base"
            )
        if self._decoder_layers(model.model) == []:
            raise LaunchError(
                f"distributed_mode='fsdp2' found no decoder layers to shard in "
                f"{type(model.model).__name__} (it lists no _no_split_modules)"
            )

    # -- process group and model --------------------------------------------------------------
    @staticmethod
    def _backend(device: torch.device) -> str:
        return "nccl" if device.type == "cuda" else "gloo"

    def start(self, device: torch.device) -> None:
        """Join the process group (once), waiting at most `timeout_s` for the other ranks."""
        self.device = device
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise LaunchError(
                    f"the process group has {dist.get_world_size()} ranks but "
                    f"WORLD_SIZE={self.world_size}"
                )
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                self._backend(device),
                timeout=timedelta(seconds=self.timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, TimeoutError, OSError) as e:
            first = (
                str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            )
            raise LaunchError(
                f"rank {self.rank} could not join the other {self.world_size - 1} rank(s) at "
                f"{self.env.master_addr}:{self.env.master_port} within {self.timeout_s} s "
                f"(ddp_timeout): {first}. Were all ranks started, and can they reach that "
                "address?"
            ) from None

    def prepare_model(self, model: nn.Module, device: torch.device) -> None:
        """Join the group; place the model (replicate: whole on `device`; fsdp2: base sharded),
        and give every rank rank 0's adapters."""
        self.start(device)
        if self._prepared is model:
            return
        self._prepared = model
        if self.mode == "fsdp2":
            self._shard(model, device)
        else:
            model.to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        flat = self._flat([p.detach() for p in trainable])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for p, value in zip(trainable, self._split(flat, trainable)):
                p.copy_(value)

    @staticmethod
    def _decoder_layers(hf: nn.Module) -> list[nn.Module]:
        names = set(compat.no_split_modules(hf))
        return [m for m in hf.modules() if type(m).__name__ in names]

    def _shard(self, model: nn.Module, device: torch.device) -> None:
        """fully_shard the frozen base: one unit per decoder layer, then the modules the loss
        calls (backbone and head, see `causal_lm_loss`); adapters stay whole on every rank."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from lorakit.training.loss import split_head

        hf = model.model
        mesh = init_device_mesh(device.type, (self.world_size,))
        keep = {p for p in model.parameters() if p.requires_grad}
        for layer in self._decoder_layers(hf):
            fully_shard(layer, mesh=mesh, ignored_params=keep)
        parts = split_head(hf)
        if parts is None:  # the loss runs the whole model: one root
            fully_shard(hf, mesh=mesh, ignored_params=keep)
        else:  # the loss runs the backbone, then the head on the trained positions: two roots
            backbone, head = parts
            fully_shard(backbone, mesh=mesh, ignored_params=keep)
            shared = {id(p) for p in backbone.parameters()}
            if not any(id(p) in shared for p in head.parameters()):  # a tied head stays whole
                fully_shard(head, mesh=mesh, ignored_params=keep)
        with torch.no_grad():  # the adapters (ignored) and anything FSDP did not move
            for module in model.modules():
                for p in module.parameters(recurse=False):
                    if not isinstance(p, DTensor) and p.device != device:
                        p.data = p.data.to(device)
                for name, b in module.named_buffers(recurse=False):
                    if b.device != device:
                        setattr(module, name, b.to(device))  # stays a (persistent) buffer

    # -- collectives in the loop --------------------------------------------------------------
    def seed_step(self, seed: int, step: int) -> None:
        """Dropout masks that depend on (seed, step, rank) alone: a resumed run draws the same."""
        state = np.random.SeedSequence([seed, step, self.rank]).generate_state(1, np.uint64)
        torch.manual_seed(int(state[0]))

    def sum_ints(self, *values: int) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def sum_floats(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_step(
        self, params: Sequence[torch.Tensor], loss: float, stop: bool
    ) -> tuple[float, bool]:
        """Sum the adapters' gradients, the step loss and the stop requests over the ranks, in
        one all-reduce. A parameter keeps grad None only if it got none on every rank (AdamW
        then skips it, as on one process)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = torch.cat(
            [
                self._flat(grads),
                has.to(self.device),
                torch.tensor([loss, float(stop)], device=self.device),
            ]
        )
        dist.all_reduce(flat)
        n = flat.numel() - len(params) - 2
        for p, g, present in zip(params, self._split(flat[:n], params), flat[n:-2].tolist()):
            if present:
                p.grad = g.to(p.dtype)
        return float(flat[-2]), bool(flat[-1] > 0)

    def should_stop(self, agreed: bool, requested: bool) -> bool:
        # only the request agreed in the all-reduce: a signal that reaches one rank later would
        # otherwise stop that rank alone and leave the others waiting in the next collective
        return agreed

    def any_rank(self, flag: bool) -> bool:
        return self.sum_ints(int(flag))[0] > 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank if the ranks do not all have the same `value`."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise LaunchError(
                f"the ranks do not agree on {what} ({shown}); is the output "
                "directory on a file system that every machine shares?"
            )

    def _flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros(0, device=self.device)
        return torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in tensors])

    @staticmethod
    def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in like:
            out.append(flat[offset : offset + p.numel()].view(p.shape).to(p.device))
            offset += p.numel()
        return out
