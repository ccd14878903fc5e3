"""Batching: padding collate, a length-grouped batch sampler, and opt-in packing.

Packing puts several examples in one row with position_ids restarting at 0 for each. transformers
(>= 4.56's masking_utils) then keeps them apart when the model is called with those position_ids
and *no* attention_mask: `find_packed_sequence_indices` turns each restart into a new sequence and
the causal mask gets a block per sequence. That holds for the "eager", "sdpa" and "flex_attention"
implementations. Flash attention instead reads sequence starts from position_ids only when the
batch has one row. Two ways to lose the isolation silently, both checked by
`lorakit.base.capabilities.packing_supported`:
- an attention_mask is passed (so `collate` returns none for packed rows), and
- the model builds a KV cache in the forward (`config.use_cache=True`, transformers' default):
  with a cache, transformers skips the packed-sequence detection.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .dataset import IGNORE_INDEX


def collate(
    examples: Sequence[dict], pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad examples into tensors: input_ids, attention_mask, labels (padding: -100).

    Padding is told apart by length (hence by attention_mask), never by token id: the pad token
    is often EOS, which the labels train on.

    Packed examples (with position_ids, from `pack`) give input_ids, labels and position_ids and
    *no* attention_mask, which would switch off transformers' packed-sequence isolation. Their
    padding gets its own position_ids 0, 1, ..., so it forms a separate sequence that real tokens
    never attend to.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (EOS is a fine choice)")
    packed = "position_ids" in examples[0]
    if any(("position_ids" in e) != packed for e in examples):
        raise ValueError("cannot mix packed (with position_ids) and unpacked examples in a batch")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["labels"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(e['labels'])} labels")
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e["position_ids"], dtype=torch.long)
            positions[i, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------- sampler


class LengthGroupedBatches:
    """Batches of indices of similar length, to waste little compute on padding.

    Per epoch: shuffle all indices, cut them into mega-chunks of `mega_batches` batches, sort each
    chunk by length (longest first), cut it into batches, and shuffle the order of the batches.
    Batches are random but each holds similar lengths. The order depends only on (seed, epoch),
    so a run resumes exactly with `iter_from(epoch, batch_index)`. With shuffle=False nothing is
    shuffled: chunks follow the data order and batches their chunk order.

    Use as a DataLoader `batch_sampler` (call `set_epoch` each epoch), or iterate `iter_from`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mega_batches: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last, self.mega_batches = shuffle, drop_last, mega_batches
        self.epoch = 0

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that `iter(self)` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch_index: int = 0) -> Iterator[list[int]]:
        """Batches of `epoch`, starting at `batch_index` (to resume mid-epoch)."""
        yield from self.batches(epoch)[batch_index:]

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order."""
        n, b = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        chunk = b * self.mega_batches
        batches: list[list[int]] = []
        for lo in range(0, n, chunk):
            part = order[lo : lo + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + b].tolist() for i in range(0, len(part), b)]
        # Chunks hold whole batches, so only the very last batch can be short.
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


# --------------------------------------------------------------------------------------- packing


def pack(examples: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most `max_length` tokens, with position_ids per example.

    Best-fit decreasing: longest examples first, each into the fullest row it still fits. Within
    a row the examples keep their data order; rows are ordered by their first example. Each
    example's first label becomes -100, so no example is trained to follow its neighbour.
    Feed the rows through `collate` and call the model without attention_mask (see the module doc
    and `packing_supported`).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_length={max_length}; "
                "truncate first (prepare_dataset does)"
            )
        if n == 0:
            raise ValueError(f"example {i} is empty")
    rows: list[list[int]] = []
    free: list[int] = []  # free space of the open rows, ascending; `owner` is their row index
    owner: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):  # stable: ties keep order
        k = bisect.bisect_left(free, lengths[i])
        if k < len(free):
            row, space = owner.pop(k), free.pop(k)
        else:
            row, space = len(rows), max_length
            rows.append([])
        rows[row].append(i)
        space -= lengths[i]
        k = bisect.bisect_left(free, space)
        free.insert(k, space)
        owner.insert(k, row)

    packed = []
    for members in sorted((sorted(r) for r in rows), key=lambda r: r[0]):
        ids, labels, positions = [], [], []
        for i in members:
            e = examples[i]
            ids += e["input_ids"]
            labels += [IGNORE_INDEX] + list(e["labels"][1:])
            positions += range(lengths[i])
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed
