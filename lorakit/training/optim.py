"""Optimisers for adapters: plain AdamW groups, and LoRA+ (B learns `ratio` × faster than A)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adapter_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_lr_ratio: float | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in groups: LoRA B matrices get `lr × ratio` under LoRA+ (Hayou et
    al., 2024); biases and 1-d tensors get no weight decay; everything else `lr`."""
    ratio = loraplus_lr_ratio or 1.0
    groups: dict[str, dict[str, Any]] = {
        "A": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "B": {"params": [], "lr": lr * ratio, "weight_decay": weight_decay},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("lora_B"):
            groups["B"]["params"].append(p)
        elif p.ndim < 2:
            groups["no_decay"]["params"].append(p)
        else:
            groups["A"]["params"].append(p)
    found = [g for g in groups.values() if g["params"]]
    if not found:
        raise ValueError(
            "the model has no trainable parameters: were adapters injected and is "
            "the adapter loaded with is_trainable=True?"
        )
    return found


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer whose LoRA B matrices learn `loraplus_lr_ratio` times faster than A."""
    groups = adapter_param_groups(model, lr, weight_decay, loraplus_lr_ratio)
    return optimizer_cls(groups, lr=lr, **kwargs)
