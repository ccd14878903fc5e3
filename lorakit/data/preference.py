"""Preference rows (a better and a worse answer to one prompt) as token ids, as TRL reads them.

Rows: `prompt` / `chosen` / `rejected` as text or as chat messages; without `prompt`, the prompt
is what chosen and rejected share at their start (TRL's implicit prompt). Chat rows are rendered
by the tokenizer's chat template: the prompt with the generation prompt, then prompt + answer,
and the answer starts where the two token sequences diverge (TRL's rule). Text answers get the
EOS token appended, as TRL does. A row whose prompt alone fills `max_length` is dropped (nothing
of its answers would be scored); longer sequences are cut at `max_length` when batched.

Unpaired rows (KTO's): `prompt` / `completion` / `label` (true: a desirable answer). Pairs are
accepted too and unpaired as TRL does: in blocks of 1000 pairs, the block's chosen answers
(desirable), then its rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.dataset import TokenizedExamples
from lorakit.data.errors import DataError
from lorakit.data.sources import Source, read_rows

KEYS = ("chosen", "rejected")
UNPAIR_BLOCK = 1000  # TRL unpairs pairs in `datasets.map` batches of this many


@dataclass
class PreferenceData(TokenizedExamples):
    """Token ids of each pair: prompt_ids, chosen_ids, rejected_ids (lists of ints)."""

    examples: list[dict[str, list[int]]]
    rows: int  # rows read
    dropped: int  # rows whose prompt alone fills max_length
    format: str  # "chat" or "text"

    @property
    def lengths(self) -> list[int]:
        return [
            len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
            for e in self.examples
        ]

    def stats(self) -> dict[str, Any]:
        return {"rows": self.rows, "pairs": len(self), "dropped": self.dropped}

    def describe(self) -> str:
        return f"{self.rows} rows -> {len(self)} pairs ({self.dropped} dropped)"


def read_preferences(source: Source) -> tuple[list[dict], bool, Any]:
    """(rows with explicit prompts, whether they are chat rows, their origin); a bad row fails
    naming it (DataError)."""
    records, origin = read_rows(source)
    chat = isinstance(records[0].get("chosen"), list)
    rows = []
    for i, record in enumerate(records):
        try:
            rows.append(_checked(record, chat))
        except DataError as e:
            raise DataError(f"{origin(i)}: {e}") from None
    return rows, chat, origin


def prepare_preferences(source: Source, tokenizer: Any, max_length: int) -> PreferenceData:
    """Read and tokenize preference rows; a bad row fails naming it (DataError)."""
    rows, chat, origin = read_preferences(source)
    examples, dropped = [], 0
    for row in rows:
        prompt, (chosen, rejected) = _tokenized(row, tokenizer, chat)
        if len(prompt) >= max_length:
            dropped += 1
            continue
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    if not examples:
        raise DataError(
            f"{origin.name}: no usable pairs: every prompt fills max_length={max_length}"
        )
    return PreferenceData(examples, len(rows), dropped, "chat" if chat else "text")


@dataclass
class UnpairedData(TokenizedExamples):
    """Token ids of answers marked desirable or not: prompt_ids, completion_ids, label."""

    examples: list[dict[str, Any]]
    rows: int  # rows read (pairs count twice)
    dropped: int  # rows whose prompt alone fills max_length
    format: str  # "chat" or "text"

    @property
    def lengths(self) -> list[int]:
        return [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in self.examples]

    def stats(self) -> dict[str, Any]:
        desirable = sum(e["label"] for e in self.examples)
        return {
            "rows": self.rows,
            "desirable": desirable,
            "undesirable": len(self) - desirable,
            "dropped": self.dropped,
        }

    def describe(self) -> str:
        s = self.stats()
        return (
            f"{s['rows']} rows ({s['desirable']} desirable, {s['undesirable']} undesirable, "
            f"{s['dropped']} dropped)"
        )


def read_unpaired(source: Source) -> tuple[list[dict], bool, Any]:
    """(rows of prompt, completion and a bool label, whether they are chat rows, their origin):
    KTO's rows, or pairs unpaired as TRL unpairs them; a bad row fails naming it."""
    records, origin = read_rows(source)
    if "completion" not in records[0]:  # pairs: TRL's unpair_preference_dataset
        pairs, chat, origin = read_preferences(source)
        rows = []
        for lo in range(0, len(pairs), UNPAIR_BLOCK):
            block = pairs[lo : lo + UNPAIR_BLOCK]
            for key, label in (("chosen", True), ("rejected", False)):
                rows += [
                    {"prompt": r["prompt"], "completion": r[key], "label": label} for r in block
                ]
        return rows, chat, origin
    chat = isinstance(records[0].get("completion"), list)
    for i, record in enumerate(records):
        if problem := _unpaired_problem(record, chat):
            raise DataError(f"{origin(i)}: {problem}")
    return [{**r, "label": bool(r["label"])} for r in records], chat, origin


def prepare_unpaired(
    source: Source, tokenizer: Any, max_length: int, both_labels: bool = True
) -> UnpairedData:
    """Read and tokenize KTO's rows; a bad row fails naming it, and so does data with one label
    only where `both_labels` (training data: KTO learns from the contrast)."""
    rows, chat, origin = read_unpaired(source)
    labels = {r["label"] for r in rows}
    if both_labels and len(labels) < 2:
        raise DataError(
            f"{origin.name}: every row has label={labels.pop()}: KTO needs desirable (true) and "
            "undesirable (false) answers"
        )
    examples, dropped = [], 0
    for row in rows:
        prompt, (completion,) = _tokenized(row, tokenizer, chat, ("completion",))
        if len(prompt) >= max_length:
            dropped += 1
            continue
        examples.append({"prompt_ids": prompt, "completion_ids": completion, "label": row["label"]})
    if not examples:
        raise DataError(
            f"{origin.name}: no usable rows: every prompt fills max_length={max_length}"
        )
    return UnpairedData(examples, len(rows), dropped, "chat" if chat else "text")


def _unpaired_problem(record: dict, chat: bool) -> str | None:
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        return (
            f"no {' and '.join(repr(k) for k in missing)}: KTO rows need 'prompt', 'completion' "
            f"and 'label' (or 'chosen' / 'rejected' pairs); have {sorted(record)}"
        )
    kind = list if chat else str
    for key in ("prompt", "completion"):
        if not isinstance(record[key], kind):
            return (
                f"'{key}' is a {type(record[key]).__name__}; this file's rows are "
                f"{'chat messages (lists)' if chat else 'text'}, like its first row"
            )
    if not record["completion"]:
        return "an empty 'completion'"
    if not isinstance(record["label"], bool) and record["label"] not in (0, 1):
        return f"'label' is {record['label']!r}: use true (desirable) or false"
    return None


def prompts_and_chosen(source: Source) -> list[tuple[Any, str]]:
    """(prompt, a preferred answer as text) of each pair, or of each desirable row of KTO's
    data: what a report compares generations to."""
    records, _ = read_rows(source)
    if "completion" in records[0]:
        rows, chat, _ = read_unpaired(source)
        rows = [{"prompt": r["prompt"], "chosen": r["completion"]} for r in rows if r["label"]]
    else:
        rows, chat, _ = read_preferences(source)
    if not chat:
        return [(r["prompt"], r["chosen"]) for r in rows]
    return [(r["prompt"], "".join(m.get("content") or "" for m in r["chosen"])) for r in rows]


def read_any(source: Source, objective: str) -> None:
    """Read and check an objective's rows (KTO's, or pairs); a bad row fails naming it."""
    (read_unpaired if objective == "kto" else read_preferences)(source)


def _checked(record: dict, chat: bool) -> dict:
    """The row with its prompt made explicit, or a DataError saying what is wrong with it."""
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise DataError(
            f"no {' and '.join(repr(k) for k in missing)}: preference rows need 'chosen' and "
            f"'rejected' (and 'prompt', unless both answers start with it); have {sorted(record)}"
        )
    kind = list if chat else str
    for key in ("prompt", *KEYS):
        if key in record and not isinstance(record[key], kind):
            raise DataError(
                f"'{key}' is a {type(record[key]).__name__}; this file's rows are "
                f"{'chat messages (lists)' if chat else 'text'}, like its first row"
            )
    row = dict(record) if "prompt" in record else _split_implicit_prompt(record)
    if row["chosen"] == row["rejected"]:
        raise DataError("'chosen' equals 'rejected': a pair must prefer one answer to another")
    if not row["chosen"] or not row["rejected"]:
        raise DataError("an empty answer: 'chosen' and 'rejected' need content")
    return row


def _split_implicit_prompt(record: dict) -> dict:
    """TRL's implicit prompt: the longest shared start of chosen and rejected (whole messages,
    or characters, leaving a space before the answers with the answers)."""
    chosen, rejected = record["chosen"], record["rejected"]
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    if idx == 0:
        raise DataError(
            "no 'prompt', and 'chosen' and 'rejected' share no start to take as the prompt: "
            "give the prompt as its own field"
        )
    return {**record, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _tokenized(
    row: dict, tokenizer: Any, chat: bool, keys: tuple[str, ...] = KEYS
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, the ids of each answer in `keys`), as TRL's preference trainers cut them."""
    if chat:
        kw = {"tools": row.get("tools")} if row.get("tools") else {}
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **kw)
        full = [_chat_ids(tokenizer, row["prompt"] + row[k], **kw) for k in keys]
    else:
        eos = tokenizer.eos_token or ""
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        answers = [row[k] if row[k].endswith(eos) else row[k] + eos for k in keys]
        full = [tokenizer(text=row["prompt"] + a)["input_ids"] for a in answers]
    # the answers start where prompt and prompt + answer diverge (a template may render the
    # prompt alone differently, or tokens merge across the boundary)
    start = min(_common_prefix(prompt, ids) for ids in full)
    return prompt[:start], [ids[start:] for ids in full]


def _chat_ids(tokenizer: Any, messages: list, **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
