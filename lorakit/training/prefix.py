"""Shared-prefix forward: a prompt prefix common to every row of a batch is computed once.

Chat SFT rows usually open with the same tokens (chat template, system prompt, instruction).
Causal attention makes those positions' hidden states identical in every row, so the backbone
runs the prefix once (batch of one), keeps its keys and values, and runs only the rest of each
row on top of them. The gradient that reaches the shared keys and values is summed over the rows
by autograd (the backward of `expand`), so the loss and every gradient are those of the plain
forward, up to float rounding (tests/test_training_speed.py).

Only positions whose next token is not trained go into the prefix, so the output head never
needs the prefix's hidden states. The keys and values travel through transformers' public cache
interface: one cache object records them during the prefix pass, a second one serves them,
read-only, to the rest of the batch. Neither changes state when gradient checkpointing re-runs
a layer in the backward pass, so both work with it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_SHARED_TOKENS = 8  # below this the second forward call costs more than it saves
_ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


class _CaptureLayer(DynamicLayer):
    """Records the prefix's keys and values (a re-run records the same again)."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class _SharedPrefixLayer(DynamicLayer):
    """Serves recorded prefix keys/values to every row, stores nothing of the rows."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def update(self, key_states, value_states, *args, **kwargs):
        rows = key_states.shape[0]
        keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
        return keys, values


def prefix_sharing_problem(model: nn.Module, training: bool = True) -> str | None:
    """Why a transformers causal LM cannot run shared-prefix forwards exactly, or None.
    training: dropout counts (one mask would be drawn for the prefix instead of one per row)."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no transformers config"
    if training:
        for m in model.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return "the model has dropout (lora_dropout or the model's own) above 0"
        text_config = config.get_text_config()
        for key in _ATTENTION_DROPOUT_KEYS:  # applied inside the attention function
            value = getattr(text_config, key, None)
            if isinstance(value, float) and value > 0:
                return f"config.{key}={value} (attention dropout)"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as e:  # noqa: BLE001 - an unknown model or transformers version: opt out
        return f"no dynamic KV cache for this model ({e})"
    if any(type(layer) is not DynamicLayer for layer in layers):
        return "the model uses sliding-window or other non-plain cache layers"
    return None


def shared_prefix_length(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> int:
    """Leading positions identical in all rows, unpadded, with no trained next token (0 if
    sharing would not pay: one row, packed rows, or fewer than MIN_SHARED_TOKENS)."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if ids.shape[0] < 2 or "position_ids" in batch or ids.shape[1] < 2:
        return 0
    same = (ids == ids[:1]).all(0)[:-1]  # position t: same token in every row
    if mask is not None:
        same &= (mask == 1).all(0)[:-1]
    same &= (labels[:, 1:] == ignore_index).all(0)  # and the token after t is not trained
    p = int(same.int().cumprod(0).sum())  # leading run; at most width - 1: one position per row
    return p if p >= MIN_SHARED_TOKENS else 0  # stays outside the prefix


def forward_with_shared_prefix(backbone: nn.Module, inputs: dict[str, torch.Tensor],
                               prefix: int) -> torch.Tensor | None:
    """Hidden states of positions prefix.. of every row, computing positions ..prefix once;
    None (with a warning) where the model ignored the cache, so the caller runs the plain forward.
    """
    ids = inputs["input_ids"]
    key = _cache_argument(type(backbone))
    with _cache_kept_under_checkpointing(backbone):
        record = Cache(layer_class_to_replicate=_CaptureLayer)
        backbone(input_ids=ids[:1, :prefix], use_cache=True, **{key: record})
        if len(record.layers) == 0 or any(not layer.is_initialized for layer in record.layers):
            # e.g. GPT-2 passes no cache to its blocks under gradient checkpointing
            warnings.warn(f"{type(backbone).__name__} ignored the KV cache (gradient "
                          "checkpointing?): shared prompt prefixes are computed per row",
                          stacklevel=3)
            return None
        shared = Cache(layers=[_SharedPrefixLayer(layer.keys, layer.values)
                               for layer in record.layers])
        out = backbone(input_ids=ids[:, prefix:], attention_mask=inputs.get("attention_mask"),
                       use_cache=True, **{key: shared})
    return out.last_hidden_state


@functools.lru_cache(maxsize=None)
def _cache_argument(cls: type) -> str:
    """The forward's name for the KV cache (looked up once per model class): `cache` from
    transformers 5.2x, `past_key_values` before (accepted, deprecated, until 5.40)."""
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def _cache_kept_under_checkpointing(backbone: nn.Module) -> Iterator[None]:
    """transformers drops the cache of checkpointed layers, because a re-run would append to it
    twice, unless a layer declares `_can_checkpoint_with_cache`. Both caches here are safe to
    re-run (see the module doc), so checkpointed layers declare it while the forward runs; the
    re-runs in the backward keep the arguments the forward chose."""
    layers = [m for m in backbone.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_can_checkpoint_with_cache")]
    for m in layers:
        m._can_checkpoint_with_cache = True  # instance attribute, shadows the class default
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache
