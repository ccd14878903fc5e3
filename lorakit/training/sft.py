"""Supervised fine-tuning as an objective: next-token cross-entropy on the trained tokens.

Rows become token ids and labels (lorakit.data), optionally packed; the loss is summed over the
labelled tokens and normalised by their count over the whole step; evaluation reports loss,
perplexity and next-token accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.base.capabilities import check_packing_supported
from lorakit.data import IGNORE_INDEX, DataError, SFTData, collate, pack, prepare_dataset
from lorakit.training.config import TrainConfig
from lorakit.training.loss import causal_lm_loss
from lorakit.training.objective import Batch, Objective, Terms
from lorakit.training.prefix import prefix_sharing_problem


class SFTObjective(Objective):
    def __init__(
        self, model: nn.Module, tokenizer: Any, args: TrainConfig, sharded: bool = False
    ) -> None:
        """model: the LoraModel; sharded: the base is sharded over ranks (fsdp2), whose ranks
        must run alike forwards."""
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.pad_id = _pad_id(tokenizer)
        # why shared-prompt-prefix forwards are off for training / evaluation (None: they are on)
        self.prefix_off = {
            mode: self._prefix_sharing_problem(mode, sharded) for mode in ("train", "eval")
        }

    def prepare(self, data: Any, split: str) -> SFTData:
        args = self.args
        if isinstance(data, SFTData):
            prepared = data
        elif self.tokenizer is None:
            raise ValueError(f"{split} data is not tokenized yet: pass tokenizer=")
        else:
            prepared = prepare_dataset(
                data,
                self.tokenizer,
                args.max_length,
                format=args.dataset_format,
                chat_template=args.chat_template,
            )
        if len(prepared) == 0:
            raise DataError(_no_usable_rows(data, split, prepared, args.max_length))
        if args.packing and split == "train":
            # a KV cache would switch off transformers' packed-sequence isolation: the loss's
            # forwards pass use_cache=False (the model's config is left as the user set it)
            check_packing_supported(self.model.model, use_cache=False)
            prepared = SFTData(
                pack(prepared.examples, args.max_length), prepared.stats, prepared.format
            )
        return prepared

    def collate(self, examples: list[dict]) -> Batch:
        return collate(examples, self.pad_id)

    def filler(self, data: SFTData) -> Batch:
        first = data[0]
        return collate(
            [{k: v[:2] for k, v in first.items()} | {"labels": [IGNORE_INDEX] * 2}], self.pad_id
        )

    def count(self, batch: Batch) -> tuple[int, int]:
        """(labelled next tokens, non-pad tokens)."""
        n_label = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        mask = batch.get("attention_mask")
        return n_label, int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        mode = "train" if training else "eval"
        parts = causal_lm_loss(
            model.model,
            batch,
            count_correct=not training,  # a pass over the vocabulary: evaluation only
            share_prefix=self.prefix_off[mode] is None,
        )
        return Terms(parts.loss_sum, {} if training else {"correct": parts.n_correct})

    def eval_metrics(self, loss: float, count: int, sums: dict[str, float]) -> dict[str, float]:
        mean = loss / max(count, 1)
        return {
            "eval_loss": mean,
            "eval_perplexity": math.exp(min(mean, 50.0)),
            "eval_token_accuracy": int(sums.get("correct", 0)) / max(count, 1),
            "eval_tokens": count,
        }

    def run_config(self, train: SFTData | None, eval: SFTData | None) -> dict[str, Any]:
        return {
            "shared_prefix_off": self.prefix_off,
            "train_data": train.stats.as_dict() if train is not None else None,
            "eval_data": eval.stats.as_dict() if eval is not None else None,
        }

    def _prefix_sharing_problem(self, mode: str, sharded: bool) -> str | None:
        if not self.args.share_prefix:
            return "share_prefix=False"
        if mode == "train" and self.args.packing:
            return "packed rows"
        if sharded:  # ranks must call alike
            return "fsdp2 gathers weights per forward call"
        return prefix_sharing_problem(self.model.model, training=mode == "train")


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None and tokenizer is not None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else pad  # padding is masked out, its id never matters


def _no_usable_rows(data: Any, split: str, prepared: SFTData, max_length: int) -> str:
    where = f" ({data})" if isinstance(data, (str, Path)) else ""
    stats = prepared.stats
    why = (
        f"every row is cut to its prompt at max_length={max_length}, leaving nothing to "
        "train on (raise max_length)"
        if stats.truncated == stats.rows
        else "no row has a token to train on"
    )
    return f"{split} data{where} has no usable rows: {why}; {stats.as_dict()}"
