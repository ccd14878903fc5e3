"""`TrainConfig`: the SFT run's knobs, named as in TRL's SFTConfig where the concept is the same."""

from __future__ import annotations

import dataclasses
import functools
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorakit.data.formats import FORMATS
from lorakit.errors import ConfigError
from lorakit.training.trackers import resolve_report_to

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "sft")  # lorakit.training.dpo
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # lorakit.training.kto
PREFERENCE_OBJECTIVES = ("dpo", "kto", "orpo")  # each has its options section of that name
OBJECTIVES = ("sft", *PREFERENCE_OBJECTIVES)
SAMPLING = ("random", "sequential")

SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")  # what a NaN/inf step does
DISTRIBUTED_MODES = ("replicate", "fsdp2")
# "ddp" was the first name of "replicate"; torch's DistributedDataParallel is not what runs
MODE_ALIASES = {"ddp": "replicate"}


def canonical_mode(mode: str) -> str:
    """The distributed mode that `mode` names ("ddp" -> "replicate"); ValueError if none."""
    mode = MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"must be one of {DISTRIBUTED_MODES} ('ddp' is an alias of 'replicate')")
    return mode


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and CUDA), as transformers' `set_seed`
    does (without importing its trainer utilities, which import bitsandbytes and more)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    output_dir: str = "lorakit-out"
    # how long
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    # batches
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    # Off by default: measured on the demo task, grouping by length put rows of one written style
    # into each batch (length follows the style) and ended 20 steps at a 21% higher eval loss
    # than random batches (bench/train_vs_trl.py, 2026-11-29). Turn it on for long, varied rows.
    group_by_length: bool = False
    packing: bool = False
    # Compute a prompt prefix that every row of a batch shares (chat template, system prompt)
    # once per batch instead of once per row: same loss and gradients (lorakit.training.prefix).
    # Applies where it is exact (no dropout, packing, fsdp2, flash attention or sliding windows)
    # and pays (a batch runs as one packed row, so long rows with a short prefix do not).
    share_prefix: bool = True
    dataset_format: str | None = None  # "text" | "messages" | "prompt_completion" | "alpaca"
    chat_template: str | None = None
    # optimiser and schedule
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate = ratio × A's
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # a step whose loss or gradient is NaN/inf: "stop" (TrainingDivergedError naming the step,
    # before the weights change) or "skip" (its batches are dropped, the run goes on)
    nonfinite: str = "stop"
    # precision and memory
    bf16: bool | None = None  # None: autocast to bf16 where the device computes it fast
    gradient_checkpointing: bool = False
    device: str = "auto"
    # logging, evaluation, checkpoints
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only (if eval data is given)
    save_steps: int | None = 500  # None: save at the end only
    save_total_limit: int | None = 2
    seed: int = 42
    disable_tqdm: bool | None = None  # None: a bar on a terminal, log lines otherwise
    # experiment trackers that get what metrics.jsonl gets (lorakit.training.trackers):
    # "tensorboard", "mlflow", "trackio", a list or "a,b" of them, "all" (the installed ones) or
    # "none"; read into a list. run_name: the run's name there; project: trackio's project
    report_to: str | list[str] | None = None
    run_name: str | None = None
    project: str = "lorakit"
    # several processes (torchrun; see lorakit.training.distributed); no effect on one process
    # "replicate" (alias "ddp"): a whole base per rank | "fsdp2": base sharded per layer
    distributed_mode: str = "replicate"
    global_batch_size: int | None = None  # examples per optimizer step over all ranks; sets the
    # per-rank batch to global / (ranks × gradient_accumulation_steps), which must divide evenly
    ddp_timeout: int = 1800  # seconds a rank waits for the others, to join and in each collective
    # what the run trains for: "sft" (next-token loss), or a preference objective ("dpo", "kto",
    # "orpo"), whose settings are the run config's section of that name (DPOOptions, ...)
    objective: str = "sft"
    # "random": each epoch in a new order (seeded); "sequential": the data's order (TRL's KTO)
    train_sampling_strategy: str = "random"

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "logging_steps",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if self.max_length < 2:
            raise bad("max_length", "must be at least 2")
        for name in ("max_steps", "warmup_steps", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, "must be an integer")
        for name in ("group_by_length", "packing", "share_prefix", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name in ("bf16", "disable_tqdm"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true, false or None")
        if self.dataset_format is not None and self.dataset_format not in FORMATS:
            raise bad("dataset_format", f"must be one of {FORMATS}, or None to detect it")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise bad("max_steps", "set max_steps > 0 or num_train_epochs > 0")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"must be one of {OBJECTIVES}")
        if self.train_sampling_strategy not in SAMPLING:
            raise bad("train_sampling_strategy", f"must be one of {SAMPLING}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise bad("lr_scheduler_type", f"must be one of {SCHEDULES}")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise bad("loraplus_lr_ratio", "must be > 0")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, "must be an integer >= 1, or None")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "must be > 0, or None for no clipping")
        if self.nonfinite not in NONFINITE:
            raise bad("nonfinite", f"must be one of {NONFINITE}")
        try:
            self.distributed_mode = canonical_mode(self.distributed_mode)
        except ValueError as e:
            raise bad("distributed_mode", str(e)) from None
        if self.global_batch_size is not None and (
            not isinstance(self.global_batch_size, int) or self.global_batch_size < 1
        ):
            raise bad("global_batch_size", "must be an integer >= 1, or None")
        if not isinstance(self.ddp_timeout, int) or self.ddp_timeout < 1:
            raise bad("ddp_timeout", "must be an integer >= 1 (seconds)")
        self.report_to = resolve_report_to(self.report_to)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class UnsupportedOptionError(ConfigError, TypeError):
    """An SFTConfig option lorakit does not have (also a TypeError, as for any unknown keyword)."""


# TRL options that TRL itself renamed: the name to use now
_RENAMED = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy"}
# accepted and not used, each reported once: what the option does under TRL
_UNUSED = {
    "tf32": "TF32 matmuls on NVIDIA GPUs",
    "dataloader_pin_memory": "pinned host memory for GPU copies",
    "use_liger_kernel": "Liger's Triton GPU kernels",
}
# transformers' optimizer names for what lorakit runs (AdamW; "paged" only pages GPU memory)
ADAMW_NAMES = ("adamw_torch_fused", "adamw_torch", "paged_adamw_32bit")
_REPORTED: set[str] = set()


def _refuse_unknown_options(cls):
    """Make `cls(...)` with a keyword that is not a field fail by name, in one line."""
    init, names = cls.__init__, {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            named = [f"{k} (TRL renamed it {_RENAMED[k]})" if k in _RENAMED else k for k in unknown]
            raise UnsupportedOptionError(
                f"{cls.__name__}: lorakit does not support {', '.join(named)}; "
                f"help(lorakit.{cls.__name__}) lists the options it takes"
            )
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


@dataclass
class TRLConfig(TrainConfig):
    """What TRL's trainer configs share, with TRL's defaults where they differ from lorakit's
    (a linear schedule, 3 epochs, gradient checkpointing on, every checkpoint kept): the fields
    below with a lorakit meaning. GPU options (tf32, dataloader_pin_memory, use_liger_kernel) are
    accepted and reported once as unused.

    eval_strategy: "no" (evaluate at the end, if there is eval data) or "steps" (every
        `eval_steps`, default `logging_steps`); "epoch" is not supported.
    save_strategy: "steps" (every `save_steps`) or "no" (lorakit still writes the last step's
        checkpoint and adapter/ at the end); "epoch" and "best" are not supported.
    optim: AdamW under one of transformers' names for it (ADAMW_NAMES); others are refused.
    gradient_checkpointing_kwargs: passed to the model's checkpointing (non-reentrant unless
        {"use_reentrant": True}).
    use_cpu: train on the CPU (device="cpu").
    model_init_kwargs: for a model id / path, `from_pretrained`'s keywords; its "dtype" (or
        "torch_dtype") defaults to float32, as in TRL ("auto": bf16 where the device is fast).
    """

    lr_scheduler_type: str = "linear"
    num_train_epochs: float = 3.0
    gradient_checkpointing: bool = True
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    save_strategy: str = "steps"
    optim: str = "adamw_torch_fused"
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    use_cpu: bool = False
    model_init_kwargs: dict[str, Any] | None = None
    tf32: bool | None = None
    dataloader_pin_memory: bool | None = None
    use_liger_kernel: bool | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name, allowed in (
            ("eval_strategy", ("no", "steps")),
            ("save_strategy", ("steps", "no")),
        ):
            if getattr(self, field_name) not in allowed:
                raise ConfigError(
                    f"{name}.{field_name}={getattr(self, field_name)!r} is not supported: use "
                    + " or ".join(repr(a) for a in allowed)
                )
        if self.optim not in ADAMW_NAMES:
            raise ConfigError(
                f"{name}.optim={self.optim!r} is not supported: lorakit trains with AdamW "
                f"(fp32 states); use one of {ADAMW_NAMES}"
            )
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.eval_strategy == "no":
            self.eval_steps = None
        if self.save_strategy == "no":
            self.save_steps = None
        if self.use_cpu:
            self.device = "cpu"
        super().__post_init__()
        unused = [f"{k} ({why})" for k, why in _UNUSED.items() if self._set(k)]
        if self.optim.startswith("paged_"):
            unused.append(f"optim={self.optim!r} (paging is for GPU memory; AdamW runs)")
        message = f"{name}: accepted and not used by lorakit: {'; '.join(unused)}"
        if unused and message not in _REPORTED:  # once per process, however many configs
            _REPORTED.add(message)
            warnings.warn(message, stacklevel=5)

    def _set(self, name: str) -> bool:
        value = getattr(self, name)
        return value not in (None, "none", [], (), ["none"])


@_refuse_unknown_options
@dataclass
class SFTConfig(TRLConfig):
    """TRL's `SFTConfig` for scripts written against TRL: TRLConfig's fields (learning_rate
    2e-5, as TRL) plus SFT's with a lorakit meaning. Any other option fails by name
    (UnsupportedOptionError, a TypeError and a ConfigError).

    dataset_text_field: the column holding plain text rows (TRL's default "text").
    completion_only_loss: None or True: prompt/completion rows train on the completion, as in
        lorakit; False (loss on the prompt too) is not supported.
    assistant_only_loss: lorakit trains chat rows on their assistant turns whatever this says;
        False (TRL's default: every token) is reported once as a difference.
    """

    learning_rate: float = 2e-5
    dataset_text_field: str = "text"
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False

    def __post_init__(self) -> None:
        if self.completion_only_loss is False:
            raise ConfigError(
                "SFTConfig.completion_only_loss=False is not supported: lorakit "
                "trains prompt/completion rows on the completion"
            )
        super().__post_init__()


@dataclass
class DPOOptions:
    """DPO's own settings (TRL 1.16's names and defaults): the `dpo` section of a run config, and
    DPOConfig's fields.

    beta: how far the policy may move from the reference (the rewards are β·log-ratios).
    loss_type: one of, or a list of, "sigmoid", "hinge", "ipo", "robust", "sft" (the chosen
        answers' NLL; ["sigmoid", "sft"] is RPO).
    loss_weights: one weight per loss_type (default 1 each); the loss is Σ weight · loss.
    label_smoothing: ε of the robust loss (the probability that a pair's labels are flipped).
    precompute_ref_log_probs: the reference's log-probs of every pair computed once, before
        the first step (in batches of precompute_ref_batch_size, default the eval batch size),
        and kept in each checkpoint: a resumed run does not compute them again.
    """

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None

    def __post_init__(self) -> None:
        self.check_options()

    def check_options(self) -> None:
        name = type(self).__name__
        kinds = self.loss_type  # a list, one name, or names joined by commas (a CLI flag)
        self.loss_type = kinds.split(",") if isinstance(kinds, str) else list(kinds)
        if not self.loss_type or any(k not in DPO_LOSS_TYPES for k in self.loss_type):
            raise ConfigError(
                f"{name}.loss_type={kinds!r}: lorakit has {', '.join(DPO_LOSS_TYPES)}"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"{name}.loss_weights has {len(self.loss_weights)} weights for "
                f"{len(self.loss_type)} loss types: give one per loss_type"
            )
        _check_beta(self)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{name}.label_smoothing={self.label_smoothing!r}: use [0, 0.5)")


@dataclass
class KTOOptions:
    """KTO's own settings (TRL 1.16's names and defaults): the `kto` section of a run config, and
    KTOConfig's fields. Rows are answers marked desirable or not, one at a time.

    beta: how far the policy may move from the reference.
    loss_type: "kto" (rewards measured against a KL estimate from mismatched prompt/answer
        pairs) or "apo_zero_unpaired" (no KL term).
    desirable_weight / undesirable_weight: the loss weight of desirable / undesirable rows
        (TRL suggests keeping weight × count of the two classes within 1:1 to 4:3).
    precompute_ref_log_probs / precompute_ref_batch_size: as DPOOptions'.
    """

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None

    def __post_init__(self) -> None:
        self.check_options()

    def check_options(self) -> None:
        name = type(self).__name__
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ConfigError(
                f"{name}.loss_type={self.loss_type!r}: lorakit has {', '.join(KTO_LOSS_TYPES)}"
            )
        _check_beta(self)
        for weight in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, weight) > 0:
                raise ConfigError(f"{name}.{weight}={getattr(self, weight)!r}: must be > 0")


@dataclass
class ORPOOptions:
    """ORPO's own setting (TRL's name and default): the `orpo` section of a run config.

    beta: λ of the paper, the weight of the odds-ratio term next to the chosen answers' NLL.
    ORPO has no reference model: the loss compares the policy's odds of the two answers.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        self.check_options()

    def check_options(self) -> None:
        _check_beta(self)


def _check_beta(options: Any) -> None:
    if not options.beta > 0:
        raise ConfigError(f"{type(options).__name__}.beta={options.beta!r}: must be > 0")


@_refuse_unknown_options
@dataclass
class DPOConfig(TRLConfig, DPOOptions):
    """TRL's `DPOConfig`: TRLConfig's fields and DPOOptions' with TRL 1.16's defaults (learning
    rate 1e-6, beta 0.1, the sigmoid loss, max_length 1024 over prompt + answer, dropout off).
    Any other option fails by name.

    truncation_mode: "keep_start" (an answer is cut at max_length; a row whose prompt fills it
        is dropped). disable_dropout: every dropout of the model off, as TRL does.
    """

    learning_rate: float = 1e-6
    truncation_mode: str = "keep_start"
    disable_dropout: bool = True
    objective: str = "dpo"

    def __post_init__(self) -> None:
        self.check_options()
        if self.truncation_mode != "keep_start":
            raise ConfigError(
                f"DPOConfig.truncation_mode={self.truncation_mode!r}: lorakit cuts answers at "
                "max_length ('keep_start'; TRL deprecates 'keep_end')"
            )
        super().__post_init__()


@_refuse_unknown_options
@dataclass
class KTOConfig(TRLConfig, KTOOptions):
    """TRL's `KTOConfig`: TRLConfig's fields and KTOOptions' with TRL 1.16's defaults (learning
    rate 1e-6, beta 0.1, the kto loss, max_length 1024, dropout off, the data in its order).
    Any other option fails by name.

    train_sampling_strategy: "sequential" as TRL's KTO (which requires it), or "random".
    disable_dropout: every dropout of the model off, as TRL does.
    """

    learning_rate: float = 1e-6
    train_sampling_strategy: str = "sequential"
    disable_dropout: bool = True
    objective: str = "kto"

    def __post_init__(self) -> None:
        self.check_options()
        super().__post_init__()


@_refuse_unknown_options
@dataclass
class ORPOConfig(TRLConfig, ORPOOptions):
    """TRL's `ORPOConfig` (trl.experimental.orpo): TRLConfig's fields and ORPOOptions' with TRL's
    defaults (learning rate 1e-6, beta 0.1, max_length 1024, dropout off). Any other option
    fails by name; `padding_value` is accepted (padding does not change the loss),
    `max_completion_length` and `is_encoder_decoder` are for encoder-decoder models, which
    lorakit does not train, and `generate_during_eval` needs a tracker.
    """

    learning_rate: float = 1e-6
    disable_dropout: bool = True
    padding_value: int | None = None
    max_completion_length: int | None = None
    is_encoder_decoder: bool | None = None
    generate_during_eval: bool = False
    objective: str = "orpo"

    def __post_init__(self) -> None:
        self.check_options()
        for key, why in (
            ("max_completion_length", "it applies to encoder-decoder models; use max_length"),
            ("is_encoder_decoder", "lorakit trains causal language models"),
            ("generate_during_eval", "the run's report.md shows generations before and after"),
        ):
            if getattr(self, key):
                raise ConfigError(f"ORPOConfig.{key}={getattr(self, key)!r}: not supported: {why}")
        super().__post_init__()
