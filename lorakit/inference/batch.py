"""The rows that decode together: one KV cache left-padded to a common length, plus the
attention mask and next position of every row.

Rows join after their prefill (their cache is left-padded, or the batch is, to the longer
length) and leave when they finish (their rows are dropped, then columns that are padding in
every remaining row). The model sees what `generate` gives it for a left-padded batch: a 2-D
attention mask with zeros over the padding and explicit position ids, so each row computes
what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.compat import kv_layers


@dataclass
class Prefilled:
    """Prompts after their prefill, together: their cache (left-padded to the longest prompt),
    its attention mask [rows, length] and the logits of each row's last position."""

    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor  # [rows, vocab]


def join_prefilled(parts: list[Prefilled]) -> Prefilled:
    """Prompts prefilled in separate forwards as one `Prefilled` (left-padded to the longest),
    so that the running batch's cache is extended once."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.mask.shape[1] for p in parts)
    layers = [kv_layers(p.cache) for p in parts]
    for i, layer in enumerate(layers[0]):
        layer.keys = torch.cat([_pad_left(ls[i].keys, length) for ls in layers])
        layer.values = torch.cat([_pad_left(ls[i].values, length) for ls in layers])
    mask = torch.cat([_pad_left(p.mask, length, 1) for p in parts])
    return Prefilled(parts[0].cache, mask, torch.cat([p.logits for p in parts]))


def length_groups(lengths: list[int], slack: int) -> list[list[int]]:
    """Indices of prompts grouped by length (shortest first) so that left-padding a group to
    its longest prompt adds at most `slack` tokens."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]
        if groups and n * (len(groups[-1]) + 1) - (real + n) <= slack:
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


@dataclass
class DecodeBatch:
    """KV cache, attention mask [rows, length] and next position [rows] of the running rows."""

    cache: Any = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rows: list[Any] = field(default_factory=list)  # the requests, in row order

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, rows: list[Any], prefilled: Prefilled) -> None:
        """Append prefilled rows, left-padding them or the batch to the longer length."""
        mask = prefilled.mask
        positions = mask.sum(1)  # each row's next position: its prompt length
        if self.cache is None:
            self.cache, self.mask, self.positions = prefilled.cache, mask, positions
            self.rows = list(rows)
            return
        length = max(self.length, mask.shape[1])
        own, new = kv_layers(self.cache), kv_layers(prefilled.cache)
        for a, b in zip(own, new):
            a.keys = torch.cat([_pad_left(a.keys, length), _pad_left(b.keys, length)])
            a.values = torch.cat([_pad_left(a.values, length), _pad_left(b.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows.extend(rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding in all."""
        if not indices:
            self.cache = self.mask = self.positions = None
            self.rows = []
            return
        if indices == list(range(len(self.rows))):
            return
        index = torch.tensor(indices)
        mask = self.mask[index]
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        for layer in kv_layers(self.cache):
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions[index]
        self.rows = [self.rows[i] for i in indices]

    def step_inputs(self, tokens: list[int], cache_argument: str) -> dict[str, Any]:
        """Model inputs for one decoding step: each row's last token at its next position."""
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        inputs = dict(
            input_ids=torch.tensor(tokens).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.positions.unsqueeze(1),
            **{cache_argument: self.cache},
            use_cache=True,
        )
        self.positions = self.positions + 1
        return inputs


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)
