"""Batched generation and exact-match evaluation, shared by the CLI, the demo and reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from lorakit.data.formats import alpaca_prompt, detect_format

Prompt = Union[str, list[dict[str, str]]]  # plain text, or chat messages


@dataclass
class Example:
    """A prompt and the completion it should produce (for exact-match scoring)."""

    prompt: Prompt
    reference: str


def render_prompt(prompt: Prompt, tokenizer, chat_template: str | None = None) -> tuple[str, bool]:
    """Text to feed the model, and whether it came from a chat template (no extra BOS then)."""
    if isinstance(prompt, str):
        return prompt, False
    text = tokenizer.apply_chat_template(
        prompt, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    return text, True


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat_template: str | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Completions for `prompts` (greedy unless do_sample), decoded without special tokens.

    Prompts are sorted by length and left-padded in batches, so little compute goes to padding.
    """
    rendered = [render_prompt(p, tokenizer, chat_template) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i][0]))
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues right after each prompt
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            chat = rendered[idx[0]][1]
            enc = tokenizer(
                [rendered[i][0] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not chat,
            ).to(device)
            sampling = (
                dict(do_sample=True, temperature=temperature, top_p=top_p)
                if do_sample
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                **sampling,
                **generate_kwargs,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace; nothing more lenient."""
    return prediction.strip() == reference.strip()


def completion_examples(records: Sequence[dict], format: str | None = None) -> list[Example]:
    """(prompt, reference) pairs from rows that have a completion to compare against.

    prompt_completion and alpaca rows, and chat rows ending with an assistant turn. Plain text
    rows have none: the result is then empty.
    """
    examples = []
    for record in records:
        fmt = format or detect_format(record)
        if fmt == "prompt_completion":
            comp = record["completion"]
            ref = (
                comp
                if isinstance(comp, str)
                else "".join(m["content"] for m in comp if m["role"] == "assistant")
            )
            examples.append(Example(record["prompt"], ref))
        elif fmt == "alpaca":
            examples.append(Example(alpaca_prompt(record), record["output"]))
        elif (
            fmt == "messages"
            and record["messages"]
            and record["messages"][-1]["role"] == "assistant"
        ):
            examples.append(Example(record["messages"][:-1], record["messages"][-1]["content"]))
    return examples


def exact_match_rate(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: str | None = None,
) -> tuple[float, list[str]]:
    """Share of examples whose greedy completion equals the reference, and the predictions."""
    if not examples:
        return float("nan"), []
    preds = generate_texts(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens,
        batch_size,
        chat_template=chat_template,
    )
    hits = sum(exact_match(p, e.reference) for p, e in zip(preds, examples))
    return hits / len(examples), preds
