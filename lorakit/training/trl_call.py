"""TRL's way of calling `SFTTrainer`, translated into lorakit's: a model id or path is loaded,
`peft_config` adapters are injected after seeding (as TRL does), `train_dataset` /
`eval_dataset` / `processing_class` / `formatting_func` / `dataset_text_field` become the rows
and tokenizer lorakit's trainer takes. Nothing here trains: it only prepares the arguments.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from lorakit.base import load_model
from lorakit.errors import ConfigError
from lorakit.lora import LoraModel, get_lora_model
from lorakit.training.config import SFTConfig, TrainConfig, TRLConfig, set_seed


def _load_kwargs(args: TrainConfig) -> dict[str, Any]:
    """load_model's arguments for a model id / path. TRL's configs: as TRL loads it, fp32 unless
    `model_init_kwargs` names a dtype ("auto" as lorakit's loader reads it: bf16 where fast);
    its other keys go to `from_pretrained`. TrainConfig: lorakit's "auto" dtype."""
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    default = "float32" if isinstance(args, TRLConfig) else "auto"
    kwargs["dtype"] = kwargs.pop("dtype", kwargs.pop("torch_dtype", default))
    if args.device != "auto":
        kwargs["device"] = args.device
    return kwargs


def lora_model_for(model: Any, args: TrainConfig, peft_config: Any, tokenizer: Any):
    """(LoraModel, tokenizer) from TRL's `model` (object, id or path) and `peft_config`."""
    if isinstance(model, (str, os.PathLike)):
        model, loaded = load_model(model, **_load_kwargs(args))
        tokenizer = tokenizer if tokenizer is not None else loaded
    if peft_config is not None:
        if isinstance(model, LoraModel):
            raise ConfigError(
                "the model already has adapters: pass peft_config only with a "
                "plain transformers model (or a model id / path)"
            )
        set_seed(args.seed)  # TRL seeds before it builds the adapters: the same adapter each run
        model = get_lora_model(model, peft_config)
    elif not isinstance(model, LoraModel):
        raise ConfigError(
            "lorakit trains adapters: pass peft_config=LoraConfig(...), or a model "
            "from get_peft_model / get_lora_model"
        )
    return model, tokenizer


def rows_for(dataset: Any, args: TrainConfig, formatting_func=None) -> Any:
    """The rows lorakit reads from a TRL `train_dataset` / `eval_dataset`: `formatting_func`
    applied (each row becomes {"text": ...}), or `dataset_text_field` renamed to "text"."""
    if dataset is None:
        return None
    if formatting_func is not None:
        return [{"text": formatting_func(row)} for row in dataset]
    field = getattr(args, "dataset_text_field", "text")
    columns = getattr(dataset, "column_names", None)
    if field != "text" and columns is not None and field in columns:
        return dataset.rename_column(field, "text")
    if field != "text" and isinstance(dataset, list):
        return [{"text": r[field]} | {k: v for k, v in r.items() if k != field} for r in dataset]
    return dataset


def report_differences(args: TrainConfig, dataset: Any) -> None:
    """Warn once about SFTConfig settings lorakit accepts but does not follow for this data
    (the options it never uses are reported by SFTConfig itself)."""
    if not isinstance(args, SFTConfig):
        return
    columns = getattr(dataset, "column_names", None) or (
        list(dataset[0]) if isinstance(dataset, list) and dataset else []
    )
    if not args.assistant_only_loss and "messages" in columns:
        warnings.warn(
            "assistant_only_loss=False: lorakit trains chat rows on their assistant "
            "turns only (as assistant_only_loss=True)",
            stacklevel=3,
        )
