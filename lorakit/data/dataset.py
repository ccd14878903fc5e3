"""Turn SFT rows into token ids and labels: `prepare_dataset`.

Each row is rendered to text plus the character spans that carry loss (formats.py), tokenized once
with offsets, and a token is trained on when its characters overlap a span. Labels are aligned
with input_ids (the model shifts them, as transformers' causal LMs do) and hold -100 where no loss
is taken. labels[0] is always -100: no token predicts the first one, and when examples are packed
the previous example's last token would otherwise be trained to predict it.

Rows longer than `max_length` tokens are cut at the end (right truncation: the beginning is kept,
which for prompt/answer data keeps the prompt and loses the answer's tail, EOS included). Rows
with no trained token left are dropped. `SFTData.stats` counts both.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from .errors import ChatTemplateError
from .formats import Rendered, end_of_turn_markers, render
from .sources import Source, read_records

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value transformers' losses skip
_TOKENIZE_CHUNK = 1000  # rows per tokenizer call: batch calls run in Rust, without Python overhead


@dataclass
class SFTStats:
    rows: int = 0  # rows read from the source
    examples: int = 0  # rows kept
    truncated: int = 0  # rows longer than max_length, cut at the end (kept or dropped)
    dropped: int = 0  # rows with no trained token left after truncation
    tokens: int = 0  # tokens in the kept examples
    label_tokens: int = 0  # trained tokens (labels != -100) in the kept examples

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TokenizedExamples:
    """A list of tokenized examples (dicts of lists of python ints), as the loop's sampler and
    an objective's collate read them."""

    examples: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


@dataclass
class SFTData(TokenizedExamples):
    """Tokenized SFT examples: dicts of `input_ids` and `labels` (lists of python ints)."""

    examples: list[dict[str, list[int]]]
    stats: SFTStats = field(default_factory=SFTStats)
    format: str = ""

    @property
    def lengths(self) -> list[int]:
        """Token count of each example, for `LengthGroupedBatches`."""
        return [len(e["input_ids"]) for e in self.examples]


def prepare_dataset(
    source: Source,
    tokenizer,
    max_length: int,
    format: str | None = None,
    chat_template: str | None = None,
) -> SFTData:
    """Read, check, render and tokenize `source` into examples of at most `max_length` tokens.

    format: "text", "messages", "prompt_completion" or "alpaca"; detected from the fields if None.
    chat_template: a Jinja chat template replacing the tokenizer's own (chat rows only).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "prepare_dataset needs a fast (Rust `tokenizers`) tokenizer: it maps "
            "characters to tokens with the tokenizer's offset mapping"
        )
    records, origin, fmt = read_records(source, format)

    markers = end_of_turn_markers(tokenizer)
    rendered: list[Rendered] = []
    for i, record in enumerate(records):
        try:
            rendered.append(render(record, fmt, tokenizer, chat_template, markers))
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{origin(i)}: {e}") from None
    if any(r.add_eos for r in rendered) and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, needed to end text and completions")

    stats = SFTStats(rows=len(records))
    examples = []
    for ids, labels in _tokenize(rendered, tokenizer):
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(1 for t in labels if t != IGNORE_INDEX)
        if trained == 0:
            stats.dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.tokens += len(ids)
        stats.label_tokens += trained
    stats.examples = len(examples)
    log.debug("SFT data (%s): %s", fmt, stats.as_dict())
    return SFTData(examples, stats, fmt)


def _tokenize(rendered: list[Rendered], tokenizer):
    """(input_ids, labels) per rendered row, in order."""
    eos = tokenizer.eos_token_id
    for lo in range(0, len(rendered), _TOKENIZE_CHUNK):
        chunk = rendered[lo : lo + _TOKENIZE_CHUNK]
        encoded: list = [None] * len(chunk)
        # Chat templates write their own special tokens (BOS included), so the tokenizer adds
        # none, as apply_chat_template does; plain text gets the tokenizer's usual ones.
        for chat in (False, True):
            idx = [j for j, r in enumerate(chunk) if r.chat == chat]
            if not idx:
                continue
            enc = tokenizer(
                [chunk[j].text for j in idx],
                add_special_tokens=not chat,
                return_offsets_mapping=True,
                return_attention_mask=False,
                truncation=False,
            )
            for k, j in enumerate(idx):
                encoded[j] = (enc["input_ids"][k], enc["offset_mapping"][k])
        for r, (ids, offsets) in zip(chunk, encoded):
            ids = list(ids)
            labels = token_labels(ids, offsets, r.spans)
            if r.add_eos:
                if ids and ids[-1] == eos:  # the text ends with EOS, or the tokenizer added it
                    labels[-1] = eos
                else:
                    ids.append(eos)
                    labels.append(eos)
            if labels:
                labels[0] = IGNORE_INDEX
            yield ids, labels


def token_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels: the token id where the token's characters overlap a span, else -100.

    Tokens without characters (special tokens the tokenizer adds, e.g. BOS) are never trained.
    Offsets and spans are both in text order, so one pass over each suffices.
    """
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for t, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            break
        if spans[j][0] < end:
            labels[t] = ids[t]
    return labels
