"""`SFTTrainer`: supervised fine-tuning of a LoraModel. The whole loop is in `train()`.

    trainer = SFTTrainer(model, TrainConfig(output_dir="out", max_steps=200), train_data=rows,
                         eval_data=held_out, tokenizer=tokenizer)
    result = trainer.train()            # or train(resume_from_checkpoint=True)
    metrics = trainer.evaluate()

The loop always talks to a process group (lorakit.training.distributed). Without torchrun it is
a group of one whose collectives change nothing; launched by torchrun (WORLD_SIZE set), the same
loop trains on several processes: each rank takes its share of every global batch, and the group
sums the token counts and the adapter gradients over the ranks, so that they compute the
1-process step. Only rank 0 writes files and logs.
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
from lorakit.base.capabilities import check_packing_supported
from lorakit.base.loading import bf16_is_fast, resolve_device
from lorakit.base.quantize import enable_checkpointing
from lorakit.data import (
    IGNORE_INDEX,
    DataError,
    LengthGroupedBatches,
    SFTData,
    collate,
    pack,
    prepare_dataset,
)
from lorakit.errors import ConfigError, InputNotFoundError, UserError
from lorakit.training import trl_call
from lorakit.training.callbacks import CallbackList
from lorakit.training.checkpoint import (
    TrainState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lorakit.training.config import TrainConfig
from lorakit.training.distributed import ProcessGroup, per_rank_batch_size, process_group
from lorakit.training.loss import causal_lm_loss
from lorakit.training.optim import adapter_param_groups
from lorakit.training.prefix import prefix_sharing_problem


class TrainingDivergedError(UserError, RuntimeError):
    """The loss or the gradient became NaN/inf (the data, or too high a learning rate); the
    weights and the last checkpoint are left as they were. The message names the step."""


# nonfinite="skip" gives up when this many steps in a row are not finite: the weights, not a
# batch, are the problem then
MAX_SKIPS_IN_A_ROW = 10


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


def base_architecture(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {k: getattr(config, k) for k in _ARCHITECTURE_KEYS if hasattr(config, k)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class SFTTrainer:
    def __init__(
        self,
        model,
        args: TrainConfig | None = None,
        train_data: Any = None,
        eval_data: Any = None,
        tokenizer: Any = None,
        group: ProcessGroup | None = None,
        *,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        """group: the process group, when the caller (the SFT recipe) has resolved it already;
        otherwise read from torchrun's environment (a group of one without torchrun).

        TRL's call works too (lorakit.training.trl_call): `model` as an id or path,
        `args=SFTConfig(...)`, `train_dataset`, `eval_dataset`, `processing_class`,
        `peft_config` (adapters injected here, after seeding) and `formatting_func`.
        `callbacks`: HF TrainerCallback-style objects (lorakit.training.callbacks)."""
        args = args or TrainConfig()
        if train_data is not None and train_dataset is not None:
            raise ConfigError("pass train_data or train_dataset (TRL's name), not both")
        tokenizer = tokenizer if tokenizer is not None else processing_class
        model, tokenizer = trl_call.lora_model_for(model, args, peft_config, tokenizer)
        if train_dataset is not None or eval_dataset is not None:
            trl_call.report_differences(args, train_dataset)
            train_data = trl_call.rows_for(train_dataset, args, formatting_func)
            eval_data = trl_call.rows_for(eval_dataset, args, formatting_func)
        self.model = model
        self.args = args
        self.tokenizer = tokenizer
        self.state = TrainState()  # where the last train() got to (log_history, as in TRL)
        self.callback_handler = CallbackList(callbacks)
        self.group = group = group if group is not None else process_group(args)
        self.rank, self.world_size, self.is_main = group.rank, group.world_size, group.is_main
        self.device = group.local_device(resolve_device(args.device))
        self.batch_size = per_rank_batch_size(args, self.world_size)  # examples per rank
        self.bf16 = bf16_is_fast(self.device) if args.bf16 is None else args.bf16
        # Read and tokenize everything up front: bad data fails here, before any training.
        self.train_data = self._prepare(train_data, "train") if train_data is not None else None
        self.eval_data = self._prepare(eval_data, "eval") if eval_data is not None else None
        self.pad_id = self._pad_id()
        # why shared-prompt-prefix forwards are off for training / evaluation (None: they are on)
        self.prefix_off = {mode: self._prefix_sharing_problem(mode) for mode in ("train", "eval")}
        self._stop_signal: int | None = None
        group.check_model(model)  # fail alike on every rank, before any collective
        if self.train_data is not None:
            group.check_data(len(self.train_data))

    # -- data ---------------------------------------------------------------------------------
    def _prepare(self, data: Any, split: str) -> SFTData:
        if isinstance(data, SFTData):
            prepared = data
        elif self.tokenizer is None:
            raise ValueError(f"{split} data is not tokenized yet: pass tokenizer=")
        else:
            prepared = prepare_dataset(
                data,
                self.tokenizer,
                self.args.max_length,
                format=self.args.dataset_format,
                chat_template=self.args.chat_template,
            )
        if len(prepared) == 0:
            where = f" ({data})" if isinstance(data, (str, Path)) else ""
            stats = prepared.stats
            why = (
                f"every row is cut to its prompt at max_length={self.args.max_length}, leaving "
                "nothing to train on (raise max_length)"
                if stats.truncated == stats.rows
                else "no row has a token to train on"
            )
            raise DataError(f"{split} data{where} has no usable rows: {why}; {stats.as_dict()}")
        if self.args.packing and split == "train":
            # a KV cache would switch off transformers' packed-sequence isolation: the loss's
            # forwards pass use_cache=False (the model's config is left as the user set it)
            check_packing_supported(self.model.model, use_cache=False)
            prepared = SFTData(
                pack(prepared.examples, self.args.max_length), prepared.stats, prepared.format
            )
        return prepared

    def _prefix_sharing_problem(self, mode: str) -> str | None:
        if not self.args.share_prefix:
            return "share_prefix=False"
        if mode == "train" and self.args.packing:
            return "packed rows"
        if self.group.mode == "fsdp2":  # ranks must call alike
            return "fsdp2 gathers weights per forward call"
        return prefix_sharing_problem(self.model.model, training=mode == "train")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None and tok is not None:
            pad = tok.eos_token_id
        return 0 if pad is None else pad  # padding is masked out, its id never matters

    def _batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the run's data position onwards, epoch after epoch: this rank's
        share (examples rank, rank + ranks, ...) of each global micro-batch."""
        sampler = LengthGroupedBatches(
            self.train_data.lengths,
            self.batch_size * self.world_size,
            seed=self.args.seed,
            shuffle=True,
            mega_batches=50 if self.args.group_by_length else 1,
        )
        while True:
            batches = sampler.batches(state.epoch)
            while state.batch_index < len(batches):
                idx = batches[state.batch_index]
                state.batch_index += 1
                yield self._collate(self.train_data, idx[self.rank :: self.world_size])
            state.epoch, state.batch_index = state.epoch + 1, 0

    def _collate(self, data: SFTData, idx: list[int]) -> dict[str, torch.Tensor]:
        if not idx:  # a short last batch left this rank nothing: a 2-token forward that trains
            # and scores nothing keeps the ranks' collectives in step (FSDP2 gathers per forward)
            ids = data[0]["input_ids"][:2]
            return collate(
                [{k: v[:2] for k, v in data[0].items()} | {"labels": [IGNORE_INDEX] * len(ids)}],
                self.pad_id,
            )
        return collate([data[i] for i in idx], self.pad_id)

    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = self._batches_per_epoch()
        return max(
            1,
            math.ceil(
                per_epoch * self.args.num_train_epochs / self.args.gradient_accumulation_steps
            ),
        )

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        args, model, device, group = self.args, self.model, self.device, self.group
        if self.train_data is None:
            raise ValueError("no train_data was given")
        out = Path(args.output_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        if self.is_main:  # what a killed run was writing: the run continues from whole files
            remove_temporaries(out)
        torch.manual_seed(args.seed)
        # several ranks: join them; replicate: the whole model here, fsdp2: the base sharded;
        # every rank starts from rank 0's adapters
        group.prepare_model(model, device)
        if launch := group.describe(self.batch_size, args.gradient_accumulation_steps):
            self._log(launch)
        if args.gradient_checkpointing:
            enable_checkpointing(model.model, getattr(args, "gradient_checkpointing_kwargs", None))

        total = self.total_steps()
        optimizer, scheduler, trainable = self._optimizer(total)
        run_config = self.run_config(total)
        state, last_ckpt = self._resume(
            resume_from_checkpoint, out, optimizer, scheduler, run_config
        )
        self.state = state
        state.max_steps, state.is_world_process_zero = total, self.is_main
        callbacks = self.callback_handler
        callbacks.context = {
            "model": model,
            "processing_class": self.tokenizer,
            "optimizer": optimizer,
            "lr_scheduler": scheduler,
        }
        metrics_file = out / "metrics.jsonl"
        if self.is_main:
            text = json.dumps(run_config, indent=2, default=str)
            atomic_write_bytes(out / "run_config.json", text.encode())
            text = "".join(json.dumps(r) + "\n" for r in state.log_history)
            atomic_write_bytes(metrics_file, text.encode())

        batches = self._batches(state)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        bar = self._progress_bar(total, state.step)
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        t_start = t_window = time.perf_counter()
        tokens_start, last_eval, skips_in_a_row = state.tokens_seen, {}, 0
        model.train()
        callbacks.fire("on_train_begin", args, state)
        with self._stop_on_signals():
            while state.step < total:
                group.seed_step(args.seed, state.step)  # ranks: masks from (seed, step, rank)
                callbacks.fire("on_step_begin", args, state)
                # one optimizer step = gradient_accumulation_steps micro-batches, and the loss is
                # the mean over all their trained tokens (not a mean of per-batch means), on all
                # ranks together
                micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
                n_label, n_tokens = self._count_tokens(micro)
                step_loss = 0.0
                for batch in micro:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast:
                        parts = causal_lm_loss(
                            model.model, batch, share_prefix=self.prefix_off["train"] is None
                        )
                    loss = parts.loss_sum / max(n_label, 1)
                    loss.backward()
                    step_loss += loss.item()
                window_tokens += n_tokens
                # every rank: the 1-process gradient and loss, and one decision about stopping
                # (a signal may reach the ranks at other steps)
                step_loss, stop_agreed = group.reduce_step(
                    trainable, step_loss, self._stop_signal is not None
                )
                if stop_agreed and self._stop_signal is None:
                    self._stop_signal = 0  # another rank was signalled
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    trainable, args.max_grad_norm if args.max_grad_norm else float("inf")
                )
                # a NaN/inf loss or gradient would poison the weights: stop before the update,
                # or (nonfinite="skip") drop this step's batches and go on
                problem = _nonfinite(step_loss, grad_norm)
                if problem:
                    optimizer.zero_grad(set_to_none=True)
                    skips_in_a_row += 1
                    if args.nonfinite == "stop" or skips_in_a_row > MAX_SKIPS_IN_A_ROW:
                        raise TrainingDivergedError(
                            f"{problem} at step {state.step + 1}"
                            + (f" ({skips_in_a_row} steps in a row)" if skips_in_a_row > 1 else "")
                            + "; stopped before updating the weights. Latest checkpoint: "
                            f"{latest_checkpoint(out)}. Try a lower learning rate or "
                            "max_grad_norm, or training.nonfinite=skip to skip such batches."
                        )
                    state.skipped_steps += 1
                    self._log(f"step {state.step + 1}: {problem}; batches skipped")
                    self._record(
                        {"step": state.step + 1, "skipped": problem}, state, metrics_file, None
                    )
                    continue
                skips_in_a_row = 0
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                window_loss, window_steps = window_loss + step_loss, window_steps + 1
                control = callbacks.fire("on_step_end", args, state)

                if (
                    state.step % args.logging_steps == 0
                    or state.step == total
                    or control.should_log
                ):
                    now = time.perf_counter()
                    state.tokens_seen += window_tokens
                    record = {
                        "step": state.step,
                        "epoch": round(
                            state.epoch + state.batch_index / max(1, self._batches_per_epoch()), 4
                        ),
                        "loss": round(window_loss / window_steps, 6),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": round(float(grad_norm), 4),
                        "tokens_per_s": round(window_tokens / (now - t_window), 1),
                    }
                    self._record(record, state, metrics_file, bar)
                    window_loss, window_steps, window_tokens, t_window = 0.0, 0, 0, now
                if self.eval_data is not None and (
                    (args.eval_steps and state.step % args.eval_steps == 0)
                    or control.should_evaluate
                ):
                    last_eval = self._evaluate_and_record(state, metrics_file, bar)
                stopping = group.should_stop(stop_agreed, self._stop_signal is not None)
                # a callback's stop ends the run as max_steps would (ranks: if any rank asks)
                asked = bool(callbacks) and group.any_rank(control.should_training_stop)
                if (
                    (args.save_steps and state.step % args.save_steps == 0)
                    or stopping
                    or control.should_save
                ):
                    last_ckpt = self._save_checkpoint(out, optimizer, scheduler, state, run_config)
                if bar is not None:
                    bar.update(1)
                if stopping:
                    self._log(
                        f"stopped by signal {self._stop_signal} at step {state.step}; "
                        f"checkpoint saved to {last_ckpt}"
                    )
                    break
                if asked:
                    self._log(f"stopped by a callback at step {state.step}")
                    break
        if bar is not None:
            bar.close()
        interrupted = group.any_rank(self._stop_signal is not None)
        if not interrupted:
            if self.eval_data is not None and (not args.eval_steps or state.step % args.eval_steps):
                last_eval = self._evaluate_and_record(state, metrics_file, None)
            if last_ckpt is None or not last_ckpt.name.endswith(f"-{state.step}"):
                last_ckpt = self._save_checkpoint(out, optimizer, scheduler, state, run_config)
            self._on_main_then_wait(lambda: self._save_adapter(out / "adapter"))
        callbacks.fire("on_train_end", args, state)
        model.eval()
        seconds = time.perf_counter() - t_start
        train_losses = [r["loss"] for r in state.log_history if "loss" in r]
        return TrainResult(
            global_step=state.step,
            train_loss=train_losses[-1] if train_losses else float("nan"),
            metrics=last_eval,
            seconds=seconds,
            tokens_per_second=(state.tokens_seen - tokens_start) / max(seconds, 1e-9),
            peak_memory_mb=peak_memory_mb(device),
            checkpoint=str(last_ckpt) if last_ckpt else None,
            interrupted=interrupted,
        )

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
        self,
        resume_from_checkpoint: str | bool | None,
        out: Path,
        optimizer,
        scheduler,
        run_config: dict[str, Any],
    ) -> tuple[TrainState, Path | None]:
        """A fresh state, or the checkpoint's (weights, optimizer, schedule and data position),
        and the checkpoint. `True` with no checkpoint in `out` yet (a run killed before its
        first one) starts from step 0: the same command always continues."""
        if not resume_from_checkpoint:
            return TrainState(), None
        path, changed = self.checkpoint_to_resume(resume_from_checkpoint, run_config)
        # every rank reads it: the same one, or all stop here
        self.group.check_same("the checkpoint to resume from", path and str(path))
        if path is None:
            self._log(f"no checkpoint in {out} yet: starting at step 0")
            return TrainState(), None
        if changed:
            self._log(f"resuming with other training settings: {', '.join(changed)}")
        wanted = _hyperparameters(optimizer, scheduler)  # this run's, before the checkpoint's
        state = load_checkpoint(path, self.model, optimizer, scheduler)
        if _hyperparameters(optimizer, scheduler) != wanted:
            _set_hyperparameters(optimizer, scheduler, wanted)
        self._log(f"resumed from {path} at step {state.step}")
        # the checkpoint of the last step needs no second copy: only the adapter is missing
        return state, path if path.name == f"checkpoint-{state.step}" else None

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

    def _save_adapter(self, directory: Path) -> None:
        """The final adapter(s), as one directory that appears whole (a kill leaves none)."""
        with atomic_directory(directory) as tmp:
            self.model.save_pretrained(tmp)

    def add_callback(self, callback: Any) -> None:
        """One more callback (an object, or a class to instantiate), as in HF Trainer."""
        self.callback_handler.add(callback)

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The adapter(s), PEFT format, into `output_dir` (default: args.output_dir); written
        by the main process (TRL's name)."""
        self._on_main_then_wait(
            lambda: self.model.save_pretrained(output_dir or self.args.output_dir)
        )

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_data: Any = None) -> dict[str, float]:
        """eval_loss (mean token cross-entropy), perplexity and next-token accuracy; callbacks'
        on_evaluate gets them as `metrics=`."""
        metrics = self._eval_metrics(eval_data)
        self.callback_handler.fire("on_evaluate", self.args, self.state, metrics=metrics)
        return metrics

    @torch.no_grad()
    def _eval_metrics(self, eval_data: Any = None) -> dict[str, float]:
        data = self._prepare(eval_data, "eval") if eval_data is not None else self.eval_data
        if data is None:
            raise ValueError("no eval data")
        model, was_training = self.model, self.model.training
        self.group.prepare_model(model, self.device)  # several ranks: joins them, once
        model.eval()
        order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
        bs = self.args.per_device_eval_batch_size
        chunks = [order[lo : lo + bs] for lo in range(0, len(order), bs)]
        # under torchrun: chunks rank, rank + ranks, ...; the same number of forwards everywhere
        mine = chunks[self.rank :: self.world_size]
        mine += [[]] * (-(-len(chunks) // self.world_size) - len(mine))
        loss_sum, n_tok, n_ok = 0.0, 0, 0
        for idx in mine:
            batch = self._collate(data, idx)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                parts = causal_lm_loss(
                    model.model,
                    batch,
                    count_correct=True,
                    share_prefix=self.prefix_off["eval"] is None,
                )
            loss_sum += float(parts.loss_sum)
            n_tok += parts.n_tokens
            n_ok += parts.n_correct
        loss_sum, n_tok, n_ok = self.group.sum_floats(loss_sum, n_tok, n_ok)
        n_tok, n_ok = int(n_tok), int(n_ok)
        model.train(was_training)
        loss = loss_sum / max(n_tok, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": n_ok / max(n_tok, 1),
            "eval_tokens": n_tok,
        }

    def _evaluate_and_record(self, state: TrainState, metrics_file: Path, bar) -> dict[str, float]:
        metrics = self._eval_metrics()
        record = {"step": state.step} | {
            k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()
        }
        self._record(record, state, metrics_file, bar)  # on_log, then on_evaluate, as in HF
        self.callback_handler.fire("on_evaluate", self.args, state, metrics=metrics)
        return metrics

    # -- bookkeeping --------------------------------------------------------------------------
    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / (self.batch_size * self.world_size))

    def _count_tokens(self, micro: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
        """Trained (next-token label) and non-pad tokens of a step's micro-batches, all ranks'."""
        n_label = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        n_tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for b in micro
        )
        n_label, n_tokens = self.group.sum_ints(n_label, n_tokens)
        return n_label, n_tokens

    def _on_main_then_wait(self, write):
        """Files are written by rank 0 alone; the other ranks wait until they are complete."""
        result = write() if self.is_main else None
        self.group.barrier()
        return result

    def _save_checkpoint(
        self, out: Path, optimizer, scheduler, state: TrainState, run_config: dict[str, Any]
    ) -> Path:
        path = self._on_main_then_wait(
            lambda: save_checkpoint(
                out, self.model, optimizer, scheduler, state, run_config, self.args.save_total_limit
            )
        )
        self.callback_handler.fire("on_save", self.args, state)
        return path or out / f"checkpoint-{state.step}"

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
            }
        return {
            "train": self.args.to_dict(),
            "adapters": self._adapters_seen["adapters"],
            "base_model": getattr(self.model.model, "name_or_path", None),
            "base_architecture": base_architecture(self.model.model),
            "total_steps": total_steps,
            "bf16": self.bf16,
            "device": str(self.device),
            "shared_prefix_off": self.prefix_off,
            "train_data": self.train_data.stats.as_dict() if self.train_data else None,
            "eval_data": self.eval_data.stats.as_dict() if self.eval_data else None,
            "trainable_parameters": self._adapters_seen["trainable_parameters"],
        } | self.group.run_config(self.batch_size, self.args.gradient_accumulation_steps)

    def _record(self, record: dict[str, Any], state: TrainState, metrics_file: Path, bar) -> None:
        state.log_history.append(record)
        # a copy: a callback may edit its logs
        self.callback_handler.fire("on_log", self.args, state, logs=dict(record))
        if not self.is_main:
            return
        with writing(metrics_file), open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        # metrics.jsonl above keeps every digit; people read 4 significant ones
        if bar is not None:
            bar.set_postfix(
                {
                    k: self._short(v)
                    for k, v in record.items()
                    if k in ("loss", "tokens_per_s", "eval_loss")
                },
                refresh=False,
            )
        else:
            self._log(" ".join(f"{k}={self._short(v)}" for k, v in record.items()))

    @staticmethod
    def _short(value: Any) -> str:
        """A float to 4 significant digits (lr=0.001997, 5e-05); from 10^4 on, whole numbers
        (tokens_per_s=12085, not 1.209e+04). Anything else as str()."""
        if not isinstance(value, float) or not math.isfinite(value):
            return str(value)
        short = f"{value:.4g}"
        return f"{value:.0f}" if "e+" in short else short

    def _progress_bar(self, total: int, initial: int):
        show = sys.stderr.isatty() if self.args.disable_tqdm is None else not self.args.disable_tqdm
        if not show or not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"lorakit: {msg}", flush=True)

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
            self._log(
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
