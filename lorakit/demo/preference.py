"""`lorakit demo --objective dpo`: preference tuning fixes what SFT learnt from its data.

The SFT rows carry an annotator's habit: for three of the ten date styles (HABIT_STYLES) the
answer is written "The date is 2021-03-05." instead of "2021-03-05". SFT learns the habit, so
those rows miss exact match. The DPO step then trains on fresh rows of every style, each a pair
preferring the bare date to the habit's sentence, starting from the SFT adapter with that adapter
as the reference (its log-probs computed once): the habit goes, the dates stay.

The README's demo section has the measured figures.
"""

from __future__ import annotations

from typing import Any

from lorakit.demo.task import DateExample, to_row
from lorakit.training import DPOTrainer, TrainConfig, TrainResult
from lorakit.training.config import DPOOptions

HABIT_STYLES = ("compact", "dot_dmy", "month_yyyy_ord")
DPO_DEFAULTS: dict[str, Any] = {
    "max_steps": 24,
    "batch_size": 8,  # pairs per step; every pair is seen once
    "lr": 1e-4,
    "beta": 0.1,
}


def habit(answer: str) -> str:
    return f"The date is {answer}."


def habit_rows(examples: list[DateExample]) -> list[dict]:
    """SFT rows, the answers of HABIT_STYLES' rows written as the annotator's sentence."""
    rows = []
    for ex in examples:
        row = to_row(ex)
        if ex.style in HABIT_STYLES:
            row["completion"] = [{"role": "assistant", "content": habit(ex.answer)}]
        rows.append(row)
    return rows


def preference_pairs(examples: list[DateExample]) -> list[dict]:
    """One pair per row: the bare date chosen over the habit's sentence."""
    return [
        {
            "prompt": to_row(ex)["prompt"],
            "chosen": [{"role": "assistant", "content": ex.answer}],
            "rejected": [{"role": "assistant", "content": habit(ex.answer)}],
        }
        for ex in examples
    ]


def dpo_step(model: Any, tokenizer: Any, pairs: list[dict], output_dir: str, launch: Any,
             seed: int) -> TrainResult:  # fmt: skip
    """DPO from the model's adapter as it is (the reference: its log-probs computed once)."""
    d = DPO_DEFAULTS
    args = TrainConfig(
        output_dir=output_dir,
        objective="dpo",
        max_steps=d["max_steps"],
        per_device_train_batch_size=d["batch_size"],
        learning_rate=d["lr"],
        lr_scheduler_type="cosine",
        max_length=64,
        logging_steps=4,
        save_steps=None,
        seed=seed,
    )
    trainer = DPOTrainer(
        model, args=args, options=DPOOptions(beta=d["beta"]), train_dataset=pairs,
        processing_class=tokenizer, launch=launch, reference="start",
    )  # fmt: skip
    return trainer.train()
