"""The SFT data pipeline: read rows, render and mask them, tokenize, batch or pack.

Owns: rows to tensors. May import compat, atomic, errors and base (model capabilities).

    data = prepare_dataset("train.jsonl", tokenizer, max_length=1024)
    sampler = LengthGroupedBatches(data.lengths, batch_size=8, seed=0)
    for idx in sampler.iter_from(epoch=0):
        batch = collate([data[i] for i in idx], tokenizer.pad_token_id)
"""

from .collate import LengthGroupedBatches, collate, pack
from .dataset import IGNORE_INDEX, SFTData, SFTStats, prepare_dataset
from .errors import ChatTemplateError, DataError
from .formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FORMATS, detect_format
from .sources import load_records

__all__ = [
    "load_records",
    "prepare_dataset",
    "SFTData",
    "SFTStats",
    "DataError",
    "ChatTemplateError",
    "collate",
    "LengthGroupedBatches",
    "pack",
    "detect_format",
    "FORMATS",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
]
