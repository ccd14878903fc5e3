"""The training loop, written once for every objective (lorakit.training.objective).

    trainer = Trainer(model, objective, TrainConfig(output_dir="out", max_steps=200),
                      train_data=rows, eval_data=held_out)
    result = trainer.train()            # or train(resume_from_checkpoint=True)

`train()` reads top-down: `_start` (output, placement, optimizer, resume), then per step
`_step` (micro-batches forward and backward, the ranks' reduction, clipping, the non-finite
policy, the update), `_log`, `_evaluate` and `_save` on their schedules, and `_finish` (final
evaluation, checkpoint and adapter). The loop always talks to a process group: without torchrun a
group of one whose collectives change nothing. Only rank 0 writes files and logs.

A step is one global batch (per-rank batch × ranks × accumulation steps): it is drawn (in a
seeded random order, or the data's with train_sampling_strategy="sequential") and length-grouped
as one batch, then split into micro-batches and ranks (`split_global_batch`), so any split of it
trains the same adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from lorakit.atomic import atomic_directory, atomic_write_bytes, remove_temporaries, writing
from lorakit.base.quantize import enable_checkpointing
from lorakit.data import LengthGroupedBatches
from lorakit.errors import InputNotFoundError, UserError
from lorakit.log import get_logger
from lorakit.training.callbacks import CallbackList, TrainerControl
from lorakit.training.checkpoint import (
    CheckpointError,
    TrainState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    objective_state,
    save_checkpoint,
)
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import collate_share, evaluate
from lorakit.training.launch import Launch, resolve_launch, split_global_batch
from lorakit.training.objective import Batch, Objective
from lorakit.training.optim import adapter_param_groups
from lorakit.training.trackers import (
    FAILED,
    FINISHED,
    KILLED,
    TrackedRun,
    Trackers,
    hyperparameters,
    resolve_report_to,
)

log = get_logger(__name__)

# nonfinite="skip" gives up when this many steps in a row are not finite: the weights, not a
# batch, are the problem then
MAX_SKIPS_IN_A_ROW = 10

# config keys that tell base models apart (a checkpoint of one does not continue on another)
_ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class TrainingDivergedError(UserError, RuntimeError):
    """The loss or the gradient became NaN/inf (the data, or too high a learning rate); the
    weights and the last checkpoint are left as they were. The message names the step."""


@dataclass
class TrainResult:
    global_step: int
    train_loss: float  # mean loss of the last logging window
    metrics: dict[str, float] = field(default_factory=dict)  # last evaluation, if any
    seconds: float = 0.0
    tokens_per_second: float = 0.0  # non-pad tokens
    peak_memory_mb: float = 0.0
    checkpoint: str | None = None
    interrupted: bool = False


@dataclass
class _Window:
    """What the loop sums between two log lines."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    since: float = field(default_factory=time.perf_counter)


@dataclass
class _Run:
    """One call of `train()`: what its parts share."""

    out: Path
    total: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.Tensor]
    config: dict[str, Any]  # run_config.json
    batches: Iterator[list[Batch]]
    bar: Any
    last_checkpoint: Path | None
    tokens_at_start: int
    started: float = field(default_factory=time.perf_counter)
    window: _Window = field(default_factory=_Window)
    last_eval: dict[str, float] = field(default_factory=dict)
    skips_in_a_row: int = 0
    grad_norm: float = 0.0
    stop_agreed: bool = False

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base learning rate at a step: linear warmup, then the schedule."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def short_number(value: Any) -> str:
    """A float to 4 significant digits (lr=0.001997, 5e-05); from 10^4 on, whole numbers
    (tokens_per_s=12085, not 1.209e+04). Anything else as str()."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    short = f"{value:.4g}"
    return f"{value:.0f}" if "e+" in short else short


def base_architecture(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {k: getattr(config, k) for k in _ARCHITECTURE_KEYS if hasattr(config, k)}


class Trainer:
    """Trains the adapters of a LoraModel for an objective. Public attributes (`state`,
    `train_data`, `eval_data`, `model`, `args`) are those of HF's Trainer where they exist."""

    def __init__(
        self,
        model,
        objective: Objective,
        args: TrainConfig,
        train_data: Any = None,
        eval_data: Any = None,
        launch: Launch | None = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        """launch: the resolved placement (the recipe resolves it once); otherwise read from
        `args` and torchrun's environment. Data is prepared by the objective here, so bad rows
        fail before any training."""
        self.model, self.objective, self.args = model, objective, args
        self.launch = launch = launch if launch is not None else resolve_launch(args)
        self.group = group = launch.group
        self.rank, self.world_size, self.is_main = group.rank, group.world_size, group.is_main
        self.device, self.bf16, self.batch_size = launch.device, launch.bf16, launch.per_rank_batch
        self.state = TrainState()  # where the last train() got to (log_history, as in TRL)
        self.callback_handler = CallbackList(callbacks)
        # every rank imports the trackers' libraries (a missing one fails alike everywhere);
        # rank 0 alone opens them
        self._trackers = Trackers(resolve_report_to(args.report_to))
        self.train_data = objective.prepare(train_data, "train") if train_data is not None else None
        self.eval_data = objective.prepare(eval_data, "eval") if eval_data is not None else None
        self._stop_signal: int | None = None
        group.check_model(model)  # fail alike on every rank, before any collective
        if self.train_data is not None:
            group.check_data(len(self.train_data))

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        if self.train_data is None:
            raise ValueError("no train_data was given")
        run = self._start(resume_from_checkpoint)
        try:
            with self._stop_on_signals():
                while self.state.step < run.total:
                    if not self._step(run):
                        continue  # a non-finite step, skipped
                    control = self.callback_handler.fire("on_step_end", self.args, self.state)
                    self._log(run, control)
                    if self.eval_data is not None and (
                        self._every(self.args.eval_steps) or control.should_evaluate
                    ):
                        run.last_eval = self._evaluate(run)
                    if self._save(run, control):
                        break
            result = self._finish(run)
        except BaseException as e:  # the trackers' run ends as the training did
            self._trackers.close(KILLED if isinstance(e, KeyboardInterrupt) else FAILED)
            raise
        self._trackers.close(KILLED if result.interrupted else FINISHED)
        return result

    def _start(self, resume_from_checkpoint: str | bool | None) -> _Run:
        """The output directory, the model on its device(s), optimizer and schedule, the state
        (fresh or resumed), the run's files, and the batch stream."""
        args, model, group = self.args, self.model, self.group
        out = Path(args.output_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        if self.is_main:  # what a killed run was writing: the run continues from whole files
            remove_temporaries(out)
        torch.manual_seed(args.seed)
        # several ranks: join them; replicate: the whole model here, fsdp2: the base sharded;
        # every rank starts from rank 0's adapters
        group.prepare_model(model, self.device)
        if line := group.describe(self.batch_size, args.gradient_accumulation_steps):
            self._say(line)
        if args.gradient_checkpointing:
            enable_checkpointing(model.model, getattr(args, "gradient_checkpointing_kwargs", None))
        total = self.total_steps()
        optimizer, scheduler, trainable = self._optimizer(total)
        config = self.run_config(total)
        self.state, last, resumed = self._resume(
            resume_from_checkpoint, out, optimizer, scheduler, config
        )
        self.state.max_steps, self.state.is_world_process_zero = total, self.is_main
        data = {"train": self.train_data, "eval": self.eval_data}
        self.objective.start(model, data, objective_state(resumed), self.launch.autocast)
        self.callback_handler.context = {
            "model": model,
            "processing_class": getattr(self.objective, "tokenizer", None),
            "optimizer": optimizer,
            "lr_scheduler": scheduler,
        }
        run = _Run(
            out,
            total,
            optimizer,
            scheduler,
            trainable,
            config,
            self._global_batches(),
            self._progress_bar(total),
            last,
            self.state.tokens_seen,
        )
        if self.is_main:
            atomic_write_bytes(
                out / "run_config.json", json.dumps(config, indent=2, default=str).encode()
            )
            lines = "".join(json.dumps(r) + "\n" for r in self.state.log_history)
            atomic_write_bytes(run.metrics_file, lines.encode())
        model.train()
        self.callback_handler.fire("on_train_begin", args, self.state)
        self._open_trackers(out, config)
        return run

    def _open_trackers(self, out: Path, config: dict[str, Any]) -> None:
        """Rank 0 opens the run's trackers; a resumed state names the runs they continue."""
        if not (self.is_main and self._trackers):
            return
        tracked = TrackedRun(
            output_dir=out,
            hyperparameters=hyperparameters(config),
            step=self.state.step,
            saved=self.state.trackers,
            run_name=self.args.run_name,
            project=self.args.project,
        )
        self._trackers.open(tracked)

    def _step(self, run: _Run) -> bool:
        """One optimizer step on the next global batch; False if it was skipped (non-finite)."""
        args, state, group = self.args, self.state, self.group
        group.seed_step(args.seed, state.step)  # ranks: masks from (seed, step, rank)
        self.callback_handler.fire("on_step_begin", args, state)
        micro = next(run.batches)
        counts = [self.objective.count(b) for b in micro]
        units, tokens = group.sum_ints(sum(c[0] for c in counts), sum(c[1] for c in counts))
        loss, sums = self._forward_backward(micro, units)
        run.window.tokens += tokens
        # every rank: the 1-process gradient and loss, and one decision about stopping (a signal
        # may reach the ranks at other steps)
        loss, run.stop_agreed = group.reduce_step(
            run.trainable, loss, self._stop_signal is not None
        )
        if sums:
            sums = dict(zip(sums, group.sum_floats(*sums.values())))
        if run.stop_agreed and self._stop_signal is None:
            self._stop_signal = 0  # another rank was signalled
        norm = torch.nn.utils.clip_grad_norm_(
            run.trainable, args.max_grad_norm if args.max_grad_norm else float("inf")
        )
        # a NaN/inf loss or gradient would poison the weights: stop before the update, or
        # (nonfinite="skip") drop this step's batches and go on
        if problem := _nonfinite(loss, norm):
            self._skip(run, problem)
            return False
        run.skips_in_a_row = 0
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        run.grad_norm = float(norm)
        run.window.loss, run.window.steps = run.window.loss + loss, run.window.steps + 1
        for key, value in sums.items():
            run.window.sums[key] = run.window.sums.get(key, 0.0) + value
        return True

    def _forward_backward(self, micro: list[Batch], units: int) -> tuple[float, dict[str, float]]:
        """Gradients of the step's loss: each micro-batch's summed loss over the step's units
        (all micro-batches, all ranks), so accumulation computes the mean over the global
        batch, not a mean of per-batch means. Returns this rank's share of the loss and of the
        objective's metric sums."""
        total, sums, scale = 0.0, {}, 1 / max(units, 1)
        for batch in micro:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.launch.autocast():
                terms = self.objective.loss(self.model, batch, training=True)
            loss = terms.loss * scale
            loss.backward()
            total += loss.item()
            for key, value in terms.sums.items():
                sums[key] = sums.get(key, 0.0) + float(value) * scale
        return total, sums

    def _skip(self, run: _Run, problem: str) -> None:
        """A non-finite step: stop (the default), or drop its batches and go on."""
        state = self.state
        run.optimizer.zero_grad(set_to_none=True)
        run.skips_in_a_row += 1
        if self.args.nonfinite == "stop" or run.skips_in_a_row > MAX_SKIPS_IN_A_ROW:
            in_a_row = f" ({run.skips_in_a_row} steps in a row)" if run.skips_in_a_row > 1 else ""
            raise TrainingDivergedError(
                f"{problem} at step {state.step + 1}{in_a_row}; stopped before updating the "
                f"weights. Latest checkpoint: {latest_checkpoint(run.out)}. Try a lower learning "
                "rate or max_grad_norm, or training.nonfinite=skip to skip such batches."
            )
        state.skipped_steps += 1
        self._say(f"step {state.step + 1}: {problem}; batches skipped")
        self._record({"step": state.step + 1, "skipped": problem}, run.metrics_file, None)

    def _log(self, run: _Run, control: TrainerControl) -> None:
        """The window's mean loss and metrics, learning rate, gradient norm and throughput."""
        if not (self._every(self.args.logging_steps) or self.state.step == run.total):
            if not control.should_log:
                return
        state, w, now = self.state, run.window, time.perf_counter()
        state.tokens_seen += w.tokens
        epoch = state.epoch + state.batch_index / max(1, self._batches_per_epoch())
        record = {"step": state.step, "epoch": round(epoch, 4), "loss": round(w.loss / w.steps, 6)}
        means = self.objective.log_metrics({k: v / w.steps for k, v in w.sums.items()})
        record |= {k: round(v, 6) for k, v in means.items()}
        record |= {
            "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": round(run.grad_norm, 4),
            "tokens_per_s": round(w.tokens / (now - w.since), 1),
        }
        self._record(record, run.metrics_file, run.bar)
        run.window = _Window(since=now)

    def _evaluate(self, run: _Run) -> dict[str, float]:
        """Evaluate on the eval data, record it (on_log, then on_evaluate, as in HF)."""
        metrics = self._eval_metrics()
        record = {"step": self.state.step} | {
            k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()
        }
        self._record(record, run.metrics_file, run.bar)
        self.callback_handler.fire("on_evaluate", self.args, self.state, metrics=metrics)
        return metrics

    def _save(self, run: _Run, control: TrainerControl) -> bool:
        """A checkpoint on schedule, when asked, or before stopping; True ends the loop (a
        signal, or a callback's should_training_stop on any rank)."""
        state, group = self.state, self.group
        stopping = group.should_stop(run.stop_agreed, self._stop_signal is not None)
        # a callback's stop ends the run as max_steps would (ranks: if any rank asks)
        asked = bool(self.callback_handler) and group.any_rank(control.should_training_stop)
        if self._every(self.args.save_steps) or stopping or control.should_save:
            run.last_checkpoint = self._save_checkpoint(run)
        if run.bar is not None:
            run.bar.update(1)
        if stopping:
            self._say(
                f"stopped by signal {self._stop_signal} at step {state.step}; "
                f"checkpoint saved to {run.last_checkpoint}"
            )
        elif asked:
            self._say(f"stopped by a callback at step {state.step}")
        return stopping or asked

    def _finish(self, run: _Run) -> TrainResult:
        """Unless interrupted: a last evaluation and checkpoint (where the schedule did not just
        make them) and the adapter. Then the result."""
        args, state = self.args, self.state
        if run.bar is not None:
            run.bar.close()
        interrupted = self.group.any_rank(self._stop_signal is not None)
        if not interrupted:
            if self.eval_data is not None and not self._every(args.eval_steps):
                run.last_eval = self._evaluate(run)
            if (
                run.last_checkpoint is None
                or run.last_checkpoint.name != f"checkpoint-{state.step}"
            ):
                run.last_checkpoint = self._save_checkpoint(run)
            self._on_main_then_wait(lambda: self._save_adapter(run.out / "adapter"))
        self.callback_handler.fire("on_train_end", args, state)
        self.model.eval()
        seconds = time.perf_counter() - run.started
        train_losses = [r["loss"] for r in state.log_history if "loss" in r]
        return TrainResult(
            global_step=state.step,
            train_loss=train_losses[-1] if train_losses else float("nan"),
            metrics=run.last_eval,
            seconds=seconds,
            tokens_per_second=(state.tokens_seen - run.tokens_at_start) / max(seconds, 1e-9),
            peak_memory_mb=peak_memory_mb(self.device),
            checkpoint=str(run.last_checkpoint) if run.last_checkpoint else None,
            interrupted=interrupted,
        )

    def _every(self, steps: int | None) -> bool:
        return bool(steps) and self.state.step % steps == 0

    # -- data -----------------------------------------------------------------------------------
    def _global_batches(self) -> Iterator[list[Batch]]:
        """This rank's micro-batches of each global batch, from the run's data position onwards,
        epoch after epoch."""
        launch, state, data = self.launch, self.state, self.train_data
        sampler = LengthGroupedBatches(
            data.lengths,
            launch.global_batch,
            seed=launch.seed,
            shuffle=self.args.train_sampling_strategy == "random",
            mega_batches=50 if self.args.group_by_length else 1,
        )
        while True:
            batches = sampler.batches(state.epoch)
            while state.batch_index < len(batches):
                idx = batches[state.batch_index]
                state.batch_index += 1
                shares = split_global_batch(idx, launch.per_rank_batch, self.world_size, self.rank)
                yield [collate_share(self.objective, data, share) for share in shares]
            state.epoch, state.batch_index = state.epoch + 1, 0

    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.launch.global_batch)

    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self._batches_per_epoch() * self.args.num_train_epochs))

    # -- optimizer and checkpoints --------------------------------------------------------------
    def _optimizer(self, total: int) -> tuple[torch.optim.Optimizer, Any, list[torch.Tensor]]:
        """AdamW over the adapters' parameter groups, its schedule, and the trained tensors."""
        args = self.args
        groups = adapter_param_groups(
            self.model, args.learning_rate, args.weight_decay, args.loraplus_lr_ratio
        )
        # fused: one kernel for all adapter tensors instead of ~10 ops per tensor (420 tensors
        # for all-linear SmolLM2: 31 -> 6 ms a step on CPU); sharded (DTensor) params stay unfused
        fused = self.device.type in ("cpu", "cuda") and self.group.mode != "fsdp2"
        optimizer = torch.optim.AdamW(
            groups,
            lr=args.learning_rate,
            eps=args.adam_epsilon,
            betas=(args.adam_beta1, args.adam_beta2),
            fused=fused,
        )
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(args.lr_scheduler_type, warmup, total)
        )
        return optimizer, scheduler, [p for g in groups for p in g["params"]]

    def _resume(
        self, resume: str | bool | None, out: Path, optimizer, scheduler, config: dict[str, Any]
    ) -> tuple[TrainState, Path | None, Path | None]:
        """A fresh state, or the checkpoint's (weights, optimizer, schedule and data position),
        the checkpoint if it is of the state's last step, and the checkpoint resumed from.
        `True` with no checkpoint in `out` yet (a run killed before its first one) starts from
        step 0: the same command always continues."""
        if not resume:
            return TrainState(global_batch=self.launch.global_batch), None, None
        path, changed = self.checkpoint_to_resume(resume, config)
        # every rank reads it: the same one, or all stop here
        self.group.check_same("the checkpoint to resume from", path and str(path))
        if path is None:
            self._say(f"no checkpoint in {out} yet: starting at step 0")
            return TrainState(global_batch=self.launch.global_batch), None, None
        if changed:
            self._say(f"resuming with other training settings: {', '.join(changed)}")
        wanted = _hyperparameters(optimizer, scheduler)  # this run's, before the checkpoint's
        state = load_checkpoint(path, self.model, optimizer, scheduler)
        if state.global_batch != self.launch.global_batch:
            raise CheckpointError(
                f"cannot resume from {path}: its data position counts global batches of "
                f"{state.global_batch or 'micro-batches (an earlier lorakit)'}, this run draws "
                f"{self.launch.global_batch}; resume with the same batch size, accumulation "
                "and number of processes"
            )
        if _hyperparameters(optimizer, scheduler) != wanted:
            _set_hyperparameters(optimizer, scheduler, wanted)
        self._say(f"resumed from {path} at step {state.step}")
        # the checkpoint of the last step needs no second copy: only the adapter is missing
        return state, path if path.name == f"checkpoint-{state.step}" else None, path

    def checkpoint_to_resume(
        self, resume_from_checkpoint: str | bool, run_config: dict[str, Any] | None = None
    ) -> tuple[Path | None, list[str]]:
        """The checkpoint `resume_from_checkpoint` names (True: the latest in output_dir; None
        when there is none yet) and the training settings it differs in; InputNotFoundError or
        CheckpointError if it cannot continue this run. Reads two small files: callers (the
        recipe) check before they write anything."""
        out = Path(self.args.output_dir)
        path = (
            latest_checkpoint(out)
            if resume_from_checkpoint is True
            else Path(resume_from_checkpoint)
        )
        if path is None:
            return None, []
        if not (path / "trainer_state.json").is_file():
            raise InputNotFoundError(f"{path} is not a lorakit checkpoint (no trainer_state.json)")
        config = run_config if run_config is not None else self.run_config(self.total_steps())
        return path, check_resumable(path, config)

    def _save_checkpoint(self, run: _Run) -> Path:
        path = self._on_main_then_wait(
            lambda: save_checkpoint(
                run.out,
                self.model,
                run.optimizer,
                run.scheduler,
                self.state,
                run.config,
                self.args.save_total_limit,
                self.objective.extra_state(),
            )
        )
        self.callback_handler.fire("on_save", self.args, self.state)
        return path or run.out / f"checkpoint-{self.state.step}"

    def _save_adapter(self, directory: Path) -> None:
        """The final adapter(s), as one directory that appears whole (a kill leaves none)."""
        with atomic_directory(directory) as tmp:
            self.model.save_pretrained(tmp)

    def _on_main_then_wait(self, write):
        """Files are written by rank 0 alone; the other ranks wait until they are complete."""
        result = write() if self.is_main else None
        self.group.barrier()
        return result

    # -- the public rest ------------------------------------------------------------------------
    def add_callback(self, callback: Any) -> None:
        """One more callback (an object, or a class to instantiate), as in HF Trainer."""
        self.callback_handler.add(callback)

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The adapter(s), PEFT format, into `output_dir` (default: args.output_dir); written
        by the main process (TRL's name)."""
        self._on_main_then_wait(
            lambda: self.model.save_pretrained(output_dir or self.args.output_dir)
        )

    def evaluate(self, eval_data: Any = None) -> dict[str, float]:
        """The objective's evaluation metrics (SFT: eval_loss, perplexity, token accuracy);
        callbacks' on_evaluate gets them as `metrics=`."""
        metrics = self._eval_metrics(eval_data)
        self.callback_handler.fire("on_evaluate", self.args, self.state, metrics=metrics)
        return metrics

    def _eval_metrics(self, eval_data: Any = None) -> dict[str, float]:
        data = (
            self.objective.prepare(eval_data, "eval") if eval_data is not None else self.eval_data
        )
        if data is None:
            raise ValueError("no eval data")
        batch_size = self.args.per_device_eval_batch_size
        return evaluate(self.model, self.objective, data, self.launch, batch_size)

    # the adapters' configs and trainable count, as last seen while the model had adapters
    _adapters_seen: dict[str, Any] | None = None

    def run_config(self, total_steps: int) -> dict[str, Any]:
        """Everything that defines the run, saved with it (and with every checkpoint).

        The adapters and trainable count are those last seen while the model had adapters
        (train() records them at its start): after `merge_and_unload()`, as in the demo before
        its report, the bare model would give no adapters and 0 trainable parameters."""
        if self.model.peft_config or self._adapters_seen is None:
            self._adapters_seen = {
                "adapters": {n: c.to_dict() for n, c in self.model.peft_config.items()},
                "trainable_parameters": self.model.get_nb_trainable_parameters()[0],
                "experts": self.model.expert_adapter_summary(),
            }
        return (
            {
                "train": self.args.to_dict(),
                "adapters": self._adapters_seen["adapters"],
                "base_model": getattr(self.model.model, "name_or_path", None),
                "base_architecture": base_architecture(self.model.model),
                "total_steps": total_steps,
                "bf16": self.bf16,
                "device": str(self.device),
            }
            | self.objective.run_config(self.train_data, self.eval_data)
            | {"trainable_parameters": self._adapters_seen["trainable_parameters"]}
            | ({"trainable_experts": e} if (e := self._adapters_seen.get("experts")) else {})
            | self.group.run_config(self.batch_size, self.args.gradient_accumulation_steps)
        )

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, record: dict[str, Any], metrics_file: Path, bar) -> None:
        self.state.log_history.append(record)
        # a copy: a callback may edit its logs
        self.callback_handler.fire("on_log", self.args, self.state, logs=dict(record))
        if not self.is_main:
            return
        with writing(metrics_file), open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._trackers.log(record)
        # metrics.jsonl above keeps every digit; people read 4 significant ones
        if bar is not None:
            shown = ("loss", "tokens_per_s", "eval_loss")
            bar.set_postfix(
                {k: short_number(v) for k, v in record.items() if k in shown}, refresh=False
            )
        else:
            self._say(" ".join(f"{k}={short_number(v)}" for k, v in record.items()))

    def _progress_bar(self, total: int):
        show = sys.stderr.isatty() if self.args.disable_tqdm is None else not self.args.disable_tqdm
        if not show or not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True
        )

    def _say(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM: finish the current step, save a checkpoint, return. A second SIGINT
        stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._say(
                f"signal {signum}: saving a checkpoint after this step "
                "(send it again to stop at once)"
            )

        self._stop_signal = None
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


_GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")


def _hyperparameters(optimizer, scheduler) -> dict[str, Any]:
    """What the run's settings put into the optimizer and schedule (not their state)."""
    groups = [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(scheduler.base_lrs)}


def _set_hyperparameters(optimizer, scheduler, wanted: dict[str, Any]) -> None:
    """A checkpoint restores its own learning rate, weight decay and betas with the optimizer
    state: put this run's back (e.g. a lower learning rate after a divergence), the schedule at
    the checkpoint's step."""
    scheduler.base_lrs = list(wanted["base_lrs"])
    for group, settings, base, f in zip(
        optimizer.param_groups, wanted["groups"], scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group.update(settings)
        group["lr"] = base * f(scheduler.last_epoch)


def _nonfinite(loss: float, grad_norm: torch.Tensor) -> str | None:
    """What is not finite in a step (None: both are)."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(float(grad_norm)):
        return f"gradient norm is {float(grad_norm)}"
    return None
