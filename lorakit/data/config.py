"""`DataConfig`: where a run's rows come from (the run config's `data` section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    train: str | None = None  # a .jsonl/.json/.csv/.parquet file or a datasets directory
    eval: str | None = None  # held-out rows: eval loss, and the report's sample prompts
