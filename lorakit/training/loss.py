"""Causal-LM loss computed only where it is needed.

transformers' forward with labels builds fp32 logits for every position (batch × seq × 49k vocab
for SmolLM2) and then throws most of them away when prompts and padding are masked. Here the
backbone returns hidden states, and the output head runs only on the positions whose next token
is trained. Same numbers, a fraction of the memory and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Configs whose models post-process logits (soft-capping, scaling): use their own forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "output_multiplier_scale")


@dataclass
class LossParts:
    """Summed token loss and counts, so accumulation and ranks can be combined exactly."""

    loss_sum: torch.Tensor
    n_tokens: int
    n_correct: int


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) of a transformers causal LM, or None where that is unsafe."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if head is None or backbone is None or backbone is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
        return None
    return backbone, head


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   count_correct: bool = False) -> LossParts:
    """Sum of next-token cross-entropy over labelled positions (labels unshifted, -100 = skip)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _split_head(model)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep]).float()
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float()
    y = targets[keep]
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    n_correct = int((logits.argmax(-1) == y).sum()) if count_correct else 0
    return LossParts(loss_sum, int(keep.sum()), n_correct)
