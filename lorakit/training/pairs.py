"""Preference pairs packed on their prompts: each prompt computed once, not once per answer.

A pair's chosen and rejected answers follow the same prompt, and a batch's prompts usually open
with the same tokens (chat template, system prompt). A batch of pairs is packed as one row: the
tokens all prompts share, then for each pair the rest of its prompt, its chosen answer and its
rejected answer. A 4-D mask lets each answer see the shared tokens, its own pair's prompt and its
own earlier tokens; both answers' position ids continue from the end of their prompt. Causal
attention makes every hidden state the one the padded [chosen; rejected] batch computes (to float
rounding), with about half the tokens through the linear layers. The output head then runs only
on the positions that predict an answer token (`pred`): a first answer token is predicted from
its prompt's last token.

Used where the model applies such masks as given (lorakit.training.prefix's conditions: sdpa or
eager attention, position ids, no dropout, no sliding windows); otherwise the padded batch runs.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_PACKED_TOKENS = 4096  # the mask is tokens² booleans: 16 MiB at most


def pack_pairs(
    examples: list[dict[str, Any]],
    max_length: int,
    answers: tuple[str, str] = ("chosen_ids", "rejected_ids"),
    prompt_targets: bool = False,
) -> dict[str, torch.Tensor] | None:
    """The packed batch (see the module docstring), or None if it would exceed
    MAX_PACKED_TOKENS. Rows of the [first; second] layout: example p's `answers[0]` is row p,
    its `answers[1]` row B + p; `n` holds each row's answer tokens (answers cut at max_length).
    prompt_targets: each prompt's own tokens are scored too, for its first row (ORPO's NLL
    over the whole chosen sequence); `answer` marks which scored tokens are answer tokens."""
    n_pairs = len(examples)
    prompts = [e["prompt_ids"] for e in examples]
    shared = _common_prefix(prompts)
    ids, pos, seg = list(prompts[0][:shared]), list(range(shared)), [-1] * shared
    pred, targets, rows, answer, n = [], [], [], [], [0] * (2 * n_pairs)
    for p, e in enumerate(examples):
        plen = len(e["prompt_ids"])
        own = e["prompt_ids"][shared:]
        if prompt_targets:  # token t of the prompt is predicted at t - 1 (shared or own)
            at = list(range(shared)) + list(range(len(ids), len(ids) + len(own)))
            pred += at[:-1]
            targets += e["prompt_ids"][1:]
            rows += [p] * (plen - 1)
            answer += [False] * (plen - 1)
        ids += own
        pos += range(shared, plen)
        seg += [3 * p] * len(own)
        last_prompt = len(ids) - 1 if own else shared - 1
        for k, key in enumerate(answers):
            tokens = e[key][: max(max_length - plen, 0)]
            first = len(ids)
            ids += tokens
            pos += range(plen, plen + len(tokens))
            seg += [3 * p + 1 + k] * len(tokens)
            pred += ([last_prompt] + list(range(first, first + len(tokens) - 1)))[: len(tokens)]
            targets += tokens
            rows += [k * n_pairs + p] * len(tokens)
            answer += [True] * len(tokens)
            n[k * n_pairs + p] = len(tokens)
    if len(ids) > MAX_PACKED_TOKENS:
        return None
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "seen": _visibility(torch.tensor(seg)),
        "pred": torch.tensor(pred, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "rows": torch.tensor(rows, dtype=torch.long),
        "answer": torch.tensor(answer, dtype=torch.bool),
        "n": torch.tensor(n),
    }


def _visibility(seg: torch.Tensor) -> torch.Tensor:
    """[query, key] True where the key is visible: earlier or the same position, and shared
    (segment -1), or its own pair's prompt (segment 3p), or its own answer."""
    pair = torch.where(seg >= 0, seg // 3, -1)
    prompt = seg % 3 == 0
    same_pair = pair[:, None] == pair[None, :]
    seen = (seg[None, :] == -1) | (same_pair & (prompt[None, :] | (seg[:, None] == seg[None, :])))
    return seen & torch.ones(len(seg), len(seg), dtype=torch.bool).tril()


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n
