"""SFT data formats: detect them, check rows, render rows to text + the character spans to train.

Four formats, told apart by their fields (`detect_format`), or forced with `format=`:

    text               {"text": str}                    loss on every token; EOS appended
    messages           {"messages": [{role, content}]}  chat template; loss on assistant turns
    prompt_completion  {"prompt", "completion"}         loss on the completion only. Both plain
                                                        strings (EOS appended), or both lists of
                                                        messages (chat template; loss on the
                                                        completion's assistant turns)
    alpaca             {"instruction", "input",         prompt from ALPACA_PROMPT; loss on the
                        "output"}                       output; EOS appended ("input" may be
                                                        missing, None or "")

Rendering produces one string per row plus the character spans that carry loss; the tokenizer
turns it into tokens once, with offsets, and a token is trained on when its characters overlap
a span (see dataset.py). Working on characters of one rendering, rather than tokenizing prompt
and answer separately, keeps the tokens exactly those the model sees for the whole text.

Chat rows are masked from the template rendering itself, so any template works, with or without
`{% generation %}` tags: for the assistant message at index i, the rendering of messages[:i] with
the generation prompt ends where the answer starts, and the rendering of messages[:i+1] ends where
it stops. That needs the template to be prefix-stable (rendering a conversation's first messages
gives a prefix of rendering all of them); `ChatTemplateError` says so when it is not. The span keeps
the template's end-of-turn token (e.g. `<|im_end|>`), so the model learns to stop; whitespace the
template writes after that special token (ChatML's "\n") is not trained on. A template with no
special end-of-turn token keeps its trailing whitespace in the span: there it is the delimiter.
Templates without a generation prompt put the assistant's role header in the difference between
renderings; the span then starts at the message content, located by rendering the message with a
probe string as its content.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2

from .errors import ChatTemplateError, DataError

FORMATS = ("text", "messages", "prompt_completion", "alpaca")

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca), verbatim, so adapters trained
# here answer prompts written for other Alpaca-style fine-tunes.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict) -> str:
    """An alpaca row's prompt: with its "input" when that is non-blank, else the shorter form."""
    inp = record.get("input") or ""
    template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=inp)


def detect_format(fields: Mapping[str, Any] | Iterable[str]) -> str:
    """The format named by a row's (or a dataset's) field names.

    When several match, the more structured wins: messages, prompt_completion, alpaca, text.
    """
    cols = set(fields.keys() if isinstance(fields, Mapping) else fields)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise DataError(
        f"cannot tell the data format from the fields {sorted(cols)}: expected 'text', "
        "'messages', 'prompt'+'completion' or 'instruction'+'input'+'output' (or pass format=)"
    )


# ---------------------------------------------------------------------------------------- checks


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages_problem(field: str, value: Any, need_assistant: bool) -> str | None:
    if not isinstance(value, list):
        return f"field '{field}' must be a list of {{role, content}} dicts, got {_type_name(value)}"
    if not value:
        return f"field '{field}' is an empty list"
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            return (
                f"field '{field}' must be a list of {{role, content}} dicts; "
                f"item {j} is {_type_name(m)}"
            )
        for key in ("role", "content"):
            if key not in m:
                return f"field '{field}': message {j} has no '{key}'"
            if not isinstance(m[key], str):
                return (
                    f"field '{field}': message {j} '{key}' must be a string, "
                    f"got {_type_name(m[key])}"
                )
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return f"field '{field}' has no assistant message, so nothing to train on"
    return None


def _string_problem(record: dict, field: str, optional: bool = False) -> str | None:
    if field not in record:
        return None if optional else f"missing field '{field}'"
    value = record[field]
    if isinstance(value, str) or (optional and value is None):
        return None
    return f"field '{field}' must be a string, got {_type_name(value)}"


def record_problem(record: Any, fmt: str) -> str | None:
    """What is wrong with one row for `fmt`, or None when it is usable."""
    if not isinstance(record, dict):
        return f"expected an object with named fields, got {_type_name(record)}"
    if fmt == "text":
        return _string_problem(record, "text")
    if fmt == "messages":
        if "messages" not in record:
            return "missing field 'messages'"
        return _messages_problem("messages", record["messages"], need_assistant=True)
    if fmt == "alpaca":
        return (
            _string_problem(record, "instruction")
            or _string_problem(record, "output")
            or _string_problem(record, "input", optional=True)
        )
    if fmt == "prompt_completion":
        for field in ("prompt", "completion"):
            if field not in record:
                return f"missing field '{field}'"
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return None
        if isinstance(prompt, list) and isinstance(completion, list):
            return _messages_problem("prompt", prompt, need_assistant=False) or _messages_problem(
                "completion", completion, need_assistant=True
            )
        return (
            "fields 'prompt' and 'completion' must both be strings or both lists of "
            f"{{role, content}} dicts, got {_type_name(prompt)} and {_type_name(completion)}"
        )
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# ------------------------------------------------------------------------------------- rendering


@dataclass
class Rendered:
    """One row as text, with the character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]
    chat: bool  # rendered by a chat template, which writes its own special tokens (no BOS added)
    add_eos: bool  # append the tokenizer's EOS token, trained on


def end_of_turn_markers(tokenizer) -> tuple[str, ...]:
    """Special-token strings that can close a turn (EOS, <|im_end|>, <|eot_id|>, ...)."""
    marks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            marks.add(str(tok))
    return tuple(m for m in marks if m)


def render(
    record: dict,
    fmt: str,
    tokenizer,
    chat_template: str | None = None,
    markers: tuple[str, ...] = (),
) -> Rendered:
    """Render a validated row. `markers`: `end_of_turn_markers(tokenizer)`, computed once."""
    if fmt == "text":
        text = record["text"]
        return Rendered(text, [(0, len(text))], chat=False, add_eos=True)
    if fmt == "alpaca":
        prompt = alpaca_prompt(record)
        text = prompt + record["output"]
        return Rendered(text, [(len(prompt), len(text))], chat=False, add_eos=True)
    if fmt == "prompt_completion" and isinstance(record["prompt"], str):
        prompt, text = record["prompt"], record["prompt"] + record["completion"]
        return Rendered(text, [(len(prompt), len(text))], chat=False, add_eos=True)
    if fmt == "prompt_completion":
        messages = record["prompt"] + record["completion"]
        text, spans = render_chat(
            messages, tokenizer, chat_template, markers, train_from=len(record["prompt"])
        )
        return Rendered(text, spans, chat=True, add_eos=False)
    if fmt == "messages":
        text, spans = render_chat(record["messages"], tokenizer, chat_template, markers)
        return Rendered(text, spans, chat=True, add_eos=False)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def render_chat(
    messages: list[dict],
    tokenizer,
    chat_template: str | None = None,
    markers: tuple[str, ...] = (),
    train_from: int = 0,
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the char spans of its assistant turns at index >= train_from."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat template; pass chat_template= (a Jinja string)"
        )

    def apply(msgs: list[dict], gen_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, chat_template=chat_template, tokenize=False, add_generation_prompt=gen_prompt
            )
        except jinja2.TemplateError as e:  # includes the template's raise_exception()
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None

    cache: dict[tuple[int, bool], str] = {}

    def rendered(n: int, gen_prompt: bool) -> str:
        """The first n messages, rendered (each prefix once: rendering is the slow part)."""
        if (n, gen_prompt) not in cache:
            cache[n, gen_prompt] = apply(messages[:n], gen_prompt)
        return cache[n, gen_prompt]

    full = rendered(len(messages), False)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < train_from:
            continue
        upto = rendered(i + 1, False)
        if not full.startswith(upto):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable: rendering messages 0..{i} is not a "
                "prefix of rendering the whole conversation (templates that rewrite earlier "
                "turns, e.g. drop their reasoning, cannot be masked from their rendering)"
            )
        # Where the answer starts: after the generation prompt when the template has one;
        # otherwise after the previous messages, skipping the role header to the content.
        if i == 0:  # transformers refuses to render an empty conversation
            before, header_done = "", False
        else:
            with_prompt, without = rendered(i, True), rendered(i, False)
            if upto.startswith(with_prompt):
                before, header_done = with_prompt, with_prompt != without
            elif upto.startswith(without):
                before, header_done = without, False
            else:
                raise ChatTemplateError(
                    f"the chat template is not prefix-stable: rendering messages 0..{i - 1} is "
                    f"not a prefix of rendering messages 0..{i}"
                )
        start, end = len(before), len(upto)
        if not header_done:
            start = _content_start(apply, messages, i, before, full, start)
        # Keep the end-of-turn token, not the whitespace the template writes after it.
        trimmed = full[start:end].rstrip()
        if trimmed and any(trimmed.endswith(m) for m in markers):
            end = start + len(trimmed)
        if spans and start < spans[-1][1]:
            raise ChatTemplateError(f"assistant message {i} overlaps the previous one")
        spans.append((start, end))
    return full, spans


_PROBE = "\u2063lorakit-probe\u2063"  # content no real message holds; no whitespace to trim


def _content_start(apply, messages: list[dict], i: int, before: str, full: str, start: int) -> int:
    """Where assistant message i's content starts in `full`, past the role header the template
    writes after `before`: found by rendering the message with a probe as its content. Searching
    for the content itself could hit the header or the end-of-turn token ("end" in "<|im_end|>").
    """
    probed = apply(messages[:i] + [{**messages[i], "content": _PROBE}], False)
    at = probed.find(_PROBE, len(before))
    if at >= 0 and probed.startswith(before) and full.startswith(probed[:at]):
        return at
    return start  # the header could not be told apart: train on it too, rather than guess
