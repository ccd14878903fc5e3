"""Shared-prefix forward: a prompt prefix common to every row of a batch is computed once.

Chat SFT rows usually open with the same tokens (chat template, system prompt, instruction).
Causal attention makes those positions' hidden states identical in every row, so the batch is
repacked as one sequence: the prefix once, then each row's remaining tokens (without padding),
their position ids continuing from the prefix, and a 4-D attention mask that lets each row see
the prefix and its own earlier tokens and nothing else. One forward call runs every linear layer
over all tokens at once (big matrix products), and the gradient that reaches the prefix is
summed over the rows by autograd, so the loss and every gradient are those of the plain forward
up to float rounding (tests/test_training_speed.py). It works under gradient checkpointing like
any other forward.

Only positions whose next token is not trained go into the prefix, so the output head never
needs the prefix's hidden states. The price is attention over the whole packed sequence (the
mask is arbitrary, so every query/key pair is computed); `pack_on_shared_prefix` packs only
when the linear-layer work saved outweighs that.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lorakit import compat
from lorakit.base.capabilities import mask_builder_problem
from lorakit.data.dataset import IGNORE_INDEX

MIN_SHARED_TOKENS = 8  # below this the repacking costs more than it saves
MAX_PACKED_TOKENS = 4096  # the mask is tokens² booleans: 16 MiB at most
_ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
_CUSTOM_MASK_IMPLS = ("sdpa", "eager")  # attention functions that apply a 4-D mask as given


@dataclass
class PackedRows:
    """A batch repacked on its shared prefix: backbone inputs of one row, and the next-token
    target of every packed position (IGNORE_INDEX where none is trained)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    prefix: int


def prefix_sharing_problem(model: nn.Module, training: bool = True) -> str | None:
    """Why a transformers causal LM cannot run shared-prefix forwards exactly, or None.
    training: dropout counts (the prefix would get one mask instead of one per row)."""
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
    impl = compat.attn_implementation(config)
    if impl not in _CUSTOM_MASK_IMPLS:  # flash attention takes no mask: rows would see each other
        return f"attention implementation {impl!r} does not apply a custom 4-D mask"
    problem = mask_builder_problem(model)
    if problem:
        return problem
    if "position_ids" not in inspect.signature(type(model).forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids"
    try:  # a 4-D mask is used as given, so a sliding window would be dropped: full layers only
        layers = DynamicCache(config=config).layers
    except Exception as e:  # noqa: BLE001 - an unknown model or transformers version: opt out
        return f"cannot tell the model's attention layer kinds ({e})"
    if any(type(layer) is not DynamicLayer for layer in layers):
        return "the model has sliding-window or other non-full attention layers"
    return None


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Leading positions identical in all rows, unpadded, with no trained next token (0 if
    sharing would not pay: one row, packed rows, or fewer than MIN_SHARED_TOKENS)."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if ids.shape[0] < 2 or "position_ids" in batch or ids.shape[1] < 2:
        return 0
    same = (ids == ids[:1]).all(0)[:-1]  # position t: same token in every row
    if mask is not None:
        same &= (mask == 1).all(0)[:-1]
    same &= (labels[:, 1:] == IGNORE_INDEX).all(0)  # and the token after t is not trained
    p = int(same.int().cumprod(0).sum())  # leading run; at most width - 1: one position per row
    return p if p >= MIN_SHARED_TOKENS else 0  # stays outside the prefix


def pack_on_shared_prefix(
    batch: dict[str, torch.Tensor], prefix: int, backbone: nn.Module
) -> PackedRows | None:
    """`batch` (right-padded rows whose first `prefix` tokens are shared) as one packed row for
    `backbone`, or None where the extra attention would cost more than the rows' copies of the
    prefix (long rows with a short prefix)."""
    if set(batch) - {"input_ids", "attention_mask", "labels"}:
        return None  # other per-token inputs would need repacking too
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask == 1
    real[:, :prefix] = False  # each row keeps its tokens after the prefix
    tokens = prefix + int(real.sum())
    if tokens > MAX_PACKED_TOKENS or not _packing_pays(backbone, rows, width, tokens):
        return None
    # segment -1 = the prefix, r = row r's own tokens; rows stay in order, so causal + same
    # segment (or the prefix) is each row's plain causal mask
    where = real.nonzero(as_tuple=True)  # row-major: row 0's tokens, then row 1's, ...
    segment = torch.cat([ids.new_full((prefix,), -1), where[0]])
    seen = (segment[None, :] == segment[:, None]) | (segment[None, :] == -1)  # [query, key]
    seen &= torch.ones(tokens, tokens, dtype=torch.bool, device=ids.device).tril()
    next_label = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)
    inputs = {
        "input_ids": torch.cat([ids[0, :prefix], ids[where]])[None],
        "position_ids": torch.cat([torch.arange(prefix, device=ids.device), where[1]])[None],
        "attention_mask": as_attention_mask(seen, backbone)[None, None],
    }
    # by the prefix rule no prefix position has a trained next token
    targets = torch.cat([labels.new_full((prefix,), IGNORE_INDEX), next_label[where]])
    return PackedRows(inputs, targets, prefix)


def as_attention_mask(seen: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """sdpa takes booleans (True = attend); eager adds the mask to the scores."""
    if compat.attn_implementation(backbone.config) == "sdpa":
        return seen
    dtype = backbone.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(
        ~seen, torch.finfo(dtype).min
    )


def _packing_pays(backbone: nn.Module, rows: int, width: int, tokens: int) -> bool:
    """Whether the linear-layer work saved (the rows' copies of the prefix, and the padding)
    outweighs the extra attention: every query/key pair of the packed row against the causal
    half of each padded row. Forward FLOPs; the backward scales both alike."""
    config = backbone.config.get_text_config()
    embeddings = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Embedding)}
    weights_per_token = sum(
        p.numel() for p in backbone.parameters() if p.dim() == 2 and id(p) not in embeddings
    )
    saved = (rows * width - tokens) * 2 * weights_per_token
    extra_pairs = tokens**2 - rows * width**2 // 2
    cost = extra_pairs * 4 * config.hidden_size * config.num_hidden_layers  # QKᵀ and PV
    return cost < saved
