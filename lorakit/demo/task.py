"""The demo task: normalise free-form dates to ISO 8601 (YYYY-MM-DD).

Each row shows one calendar date, written in one of ten everyday styles
("5th of March '21", "03/05/2021 (US)", "5-Mar-21", ...), and asks for it as "2021-03-05".
The answer is one exact string, so exact match is a fair metric. The base SmolLM2-135M-Instruct
mostly echoes the input, wraps the answer in prose ("The date is 1955-06-") or gets a field
wrong (3-6% exact match); a few minutes of LoRA teach it the
mapping, since every piece (month names, ordinals, day/month order, the two-digit-year pivot)
is learnable from a few hundred examples.

Rows are conversational prompt/completion dicts (the `prompt_completion` format of
`lorakit.data`), so the chat template of the instruct model frames them exactly as it does at
inference time:

    {"prompt": [{"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": "5th of March '21"}],
     "completion": [{"role": "assistant", "content": "2021-03-05"}]}

A short system message of our own carries the instruction: without one, SmolLM2's template
inserts its 17-token default system prompt, and prompt tokens are most of the training compute.

Dates come from 1950-01-01 .. 2049-12-31, so a two-digit year is unambiguous (yy < 50 means
20yy). Held-out rows are disjoint from training rows by the underlying date: one seeded
permutation of all dates gives the eval dates first and the training dates after them. Eval rows
depend only on (n_eval, seed), not on n_train.

Feasibility (measured 2026-11-29 on the real default model, 2-core AVX2 CPU, fp32, PEFT LoRA
r=16 alpha=32 "all-linear" dropout 0, AdamW, completion-only loss, a plain PyTorch loop; scratch
script, not in the repo). bf16 autocast is not an option here: without AVX512-BF16 one step took
211 s against ~4 s in fp32. Batch 16, lr 2e-3, 3 warmup steps, 64 steps = 1024 rows seen once
(~47 tokens a row, 47.8k tokens):

    schedule                       seed  base EM   tuned EM   train s   tok/s
    linear to 10%, no clipping        0   3.5%      95.5%       241      199
    linear to 10%, no clipping        1   6.0%      94.0%       240      199
    cosine to 0, no clipping          0   3.5%      93.0%       228      210
    cosine to 0, no clipping          1   6.0%      92.5%       233      205
    cosine to 0, clip grad norm 1.0   0   3.5%      89.0%       232      207

on 200 held-out rows. Evaluation: 23-26 s for the base model (it never stops early, so it always
runs all 12 new tokens) and 24-27 s for the tuned one, batch 50. Shorter runs fall short: 24 steps
at lr 1e-3 reached 80%, 32 steps at 2e-3 87%, 48 steps at 2e-3 92% (on 100 rows). Most errors
left after 64 steps are slash dates whose day and month are both <= 12, i.e. the (US)/(EU) rule.
These times are for an otherwise idle machine; with other jobs on the two cores every number
above grows several-fold (24 of these steps took 27 minutes at load average 6-8).
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

INSTRUCTION = "Write the date as YYYY-MM-DD."

FIRST_DATE = _dt.date(1950, 1, 1)
LAST_DATE = _dt.date(2049, 12, 31)
YY_PIVOT = 50  # two-digit years below this are 20yy, the rest 19yy (matches the date range)

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
MONTHS_ABBR = tuple(m[:3] for m in MONTHS)

# What the demo runs, from the feasibility runs above. The extra keys (after max_new_tokens)
# map onto lorakit's TrainConfig; with them the runs measured 93.0% / 92.5% (seeds 0 / 1).
DEMO_DEFAULTS: dict[str, Any] = {
    "n_train": 768,  # = max_steps * batch_size: every row seen once
    "n_eval": 100,
    "max_steps": 48,
    # (64 steps / 1024 rows / 200 eval rows measured 92.5-95.5% with PEFT; the demo keeps the
    # 48/768/100 setting that lorakit's own trainer was run with for the README: 3% -> 87-90%)
    "lr": 2e-3,
    "batch_size": 16,
    "max_length": 64,  # rows are 41-51 tokens; nothing is ever truncated
    "r": 16,
    "alpha": 32,
    "max_new_tokens": 12,  # 10 answer tokens (digits are single tokens) + end of turn + 1 spare
    "eval_batch_size": 50,
    "warmup_steps": 3,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": None,  # clipping at 1.0 cost ~4 points (89%) for no stability gain here
    "seed": 0,
}


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _yy(d: _dt.date) -> str:
    return f"{d.year % 100:02d}"


# Surface styles: name -> renderer. Names are stable (tests parse each style back).
STYLES: dict[str, Callable[[_dt.date], str]] = {
    "month_d_yyyy": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 5, 2021
    "d_month_yyyy": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 5 March 2021
    "ord_of_month_yy": lambda d: (
        f"{ordinal(d.day)} of {MONTHS[d.month - 1]} '{_yy(d)}"
    ),  # 5th of March '21
    "mon_ord_yyyy": lambda d: (
        f"{MONTHS_ABBR[d.month - 1]} {ordinal(d.day)}, {d.year}"
    ),  # Mar 5th, 2021
    "us_slash": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US)",  # 03/05/2021 (US)
    "eu_slash": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (EU)",  # 05/03/2021 (EU)
    "dot_dmy": lambda d: f"{d.day}.{d.month}.{d.year}",  # 5.3.2021
    "d_mon_yy": lambda d: f"{d.day}-{MONTHS_ABBR[d.month - 1]}-{_yy(d)}",  # 5-Mar-21
    "compact": lambda d: f"{d.year}{d.month:02d}{d.day:02d}",  # 20210305
    "month_yyyy_ord": lambda d: (
        f"{MONTHS[d.month - 1].lower()} {ordinal(d.day)} {d.year}"
    ),  # march 5th 2021
}


@dataclass(frozen=True)
class DateExample:
    """One row before formatting: the underlying date and how it is written."""

    date: _dt.date
    style: str
    text: str

    @property
    def answer(self) -> str:
        return self.date.isoformat()


def all_dates() -> list[_dt.date]:
    """Every date the task draws from, in calendar order."""
    n = (LAST_DATE - FIRST_DATE).days + 1
    return [FIRST_DATE + _dt.timedelta(days=i) for i in range(n)]


def _example(d: _dt.date, seed: int, styles: Sequence[str]) -> DateExample:
    # One RNG per (seed, date): a row does not depend on which other rows were drawn, and str
    # seeds are hashed with SHA-512, so this is stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"lorakit-demo-dates:{seed}:{d.isoformat()}")
    style = rng.choice(list(styles))
    return DateExample(d, style, STYLES[style](d))


def make_examples(
    n_train: int, n_eval: int, seed: int = 0, styles: Sequence[str] | None = None
) -> tuple[list[DateExample], list[DateExample]]:
    """(train, eval) examples over disjoint dates; eval comes first in the permutation."""
    styles = list(styles) if styles is not None else list(STYLES)
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown styles {unknown}; choose from {list(STYLES)}")
    dates = all_dates()
    if n_train < 0 or n_eval < 0 or n_train + n_eval > len(dates):
        raise ValueError(
            f"need 0 <= n_train + n_eval <= {len(dates)}, got n_train={n_train}, n_eval={n_eval}"
        )
    random.Random(f"lorakit-demo-split:{seed}").shuffle(dates)
    eval_dates, train_dates = dates[:n_eval], dates[n_eval : n_eval + n_train]
    return (
        [_example(d, seed, styles) for d in train_dates],
        [_example(d, seed, styles) for d in eval_dates],
    )


def to_row(ex: DateExample) -> dict[str, list[dict[str, str]]]:
    """A conversational prompt/completion row."""
    return {
        "prompt": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": ex.text},
        ],
        "completion": [{"role": "assistant", "content": ex.answer}],
    }


def make_task(
    n_train: int, n_eval: int, seed: int = 0, styles: Sequence[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows) of the date task; see the module docstring for the row shape."""
    train, held_out = make_examples(n_train, n_eval, seed, styles)
    return [to_row(ex) for ex in train], [to_row(ex) for ex in held_out]


def reference(row: dict) -> str:
    """The expected answer of a row (conversational or plain-string)."""
    completion = row["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]
