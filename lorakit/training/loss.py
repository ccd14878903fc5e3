"""Causal-LM loss computed only where it is needed.

transformers' forward with labels builds fp32 logits for every position (batch × seq × 49k vocab
for SmolLM2) and then throws most of them away when prompts and padding are masked. Here the
backbone returns hidden states, and the output head runs only on the positions whose next token
is trained, a chunk of rows at a time: the full logits never exist, and the gradients are
computed chunk by chunk in the forward (as Liger's fused linear cross-entropy does). Same
numbers, a fraction of the memory and time. A prompt prefix shared by the whole batch is
computed once (lorakit.training.prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import compat
from lorakit.data.dataset import IGNORE_INDEX
from lorakit.training.prefix import pack_on_shared_prefix, shared_prefix_length

# Configs whose models post-process logits (soft-capping, scaling): use their own forward.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)
# fp32 logits held at once by the chunked head: 2**24 elements = 64 MiB (341 rows of a 49k vocab)
CHUNK_ELEMENTS = 2**24


@dataclass
class LossParts:
    """Summed token loss and counts, so accumulation and ranks can be combined exactly."""

    loss_sum: torch.Tensor
    n_tokens: int
    n_correct: int


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) of a transformers causal LM, or None where that is unsafe."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if head is None or backbone is None or backbone is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
        return None
    return backbone, head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(hidden @ weightᵀ + bias, targets) and the count of correct argmaxes,
    `rows` rows at a time (the count only with `count_correct`). The forward also computes the
    gradients (softmax − one-hot, pushed through the head) chunk by chunk; the backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int, count_correct: bool):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        losses = []
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # gradient sums: fp32 at least
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for lo in range(0, hidden.shape[0], rows):
            h, y = hidden[lo : lo + rows], targets[lo : lo + rows]
            raw = F.linear(h, weight, bias)  # the head's dtype, or autocast's
            logits = raw.to(torch.promote_types(raw.dtype, torch.float32))  # fp32 at least
            lse = torch.logsumexp(logits, dim=-1)
            losses.append((lse - logits.gather(1, y[:, None]).squeeze(1)).sum())
            if count_correct:  # a pass over the vocabulary: evaluation only
                correct += (logits.argmax(-1) == y).sum()
            if need_h or need_w or need_b:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] -= 1
                g = g.to(raw.dtype)  # the precision the plain path's backward uses
                if need_h:
                    grad_h[lo : lo + rows] = g @ weight.to(g.dtype)
                if need_w:
                    grad_w += (g.t() @ h.to(g.dtype)).to(acc)
                if need_b:
                    grad_b += g.to(acc).sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        loss = torch.stack(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_loss).to(dtype) if has else None
            for has, dtype in zip(ctx.has, ctx.dtypes)
        ]
        return grads[0], grads[1], grads[2], None, None, None


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ + bias)[target] for each row, `rows` rows at a time, for a
    frozen head: the forward keeps, per row, the gradient of its log-prob with respect to its
    hidden state ((one-hot − softmax) @ weight, [n, d]); the backward scales it by each row's
    incoming gradient. The full logits never exist."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for lo in range(0, hidden.shape[0], rows):
            h, y = hidden[lo : lo + rows], targets[lo : lo + rows]
            raw = F.linear(h, weight, bias)
            logits = raw.to(torch.promote_types(raw.dtype, torch.float32))
            lse = torch.logsumexp(logits, dim=-1)
            out[lo : lo + rows] = logits.gather(1, y[:, None]).squeeze(1) - lse
            if grad_h is not None:
                g = logits.sub_(lse[:, None]).exp_().neg_()  # −softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] += 1
                grad_h[lo : lo + rows] = g.to(raw.dtype) @ weight.to(raw.dtype)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        grad = None if grad_h is None else grad_h * grad_out[:, None].to(grad_h.dtype)
        return grad, None, None, None, None


def head_token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each hidden row [n, d] under `head`, in fp32. A frozen plain linear
    head runs chunked (_ChunkedTokenLogProbs); any other head, its own forward."""
    frozen = not any(p.requires_grad for p in head.parameters())
    if type(head) is nn.Linear and frozen and not compat.has_forward_hooks(head):
        rows = max(1, CHUNK_ELEMENTS // head.out_features)
        return _ChunkedTokenLogProbs.apply(hidden, head.weight, head.bias, targets, rows)
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _logits_loss(
    logits: torch.Tensor, targets: torch.Tensor, count_correct: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy, correct argmaxes or 0) of materialised logits, in fp32."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum() if count_correct else torch.zeros(())
    return loss, correct


def head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    count_correct: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token cross-entropy, count of correct argmaxes; 0 without `count_correct`) of `head`
    on hidden rows [n, d]."""
    plain_linear = type(head) is nn.Linear and not compat.has_forward_hooks(head)
    if not plain_linear:  # a LoRA-wrapped or sharded head: its own forward, full logits
        return _logits_loss(head(hidden), targets, count_correct)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // head.out_features)
    return _ChunkedLinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, rows, count_correct
    )


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    count_correct: bool = False,
    share_prefix: bool = False,
) -> LossParts:
    """Sum of next-token cross-entropy over labelled positions (labels unshifted, -100 = skip).

    share_prefix: compute a prompt prefix common to all rows once (the caller checks the model
    with `prefix_sharing_problem`)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    parts = split_head(model)
    if parts is None:  # the model's own forward, full logits
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
        loss_sum, n_correct = _logits_loss(logits, targets[keep], count_correct)
        return LossParts(loss_sum, int(keep.sum()), int(n_correct))
    backbone, head = parts
    prefix = shared_prefix_length(batch) if share_prefix else 0
    packed = pack_on_shared_prefix(batch, prefix, backbone) if prefix else None
    if packed is not None:  # one packed row: the prefix once, then each row's own tokens
        hidden = backbone(**packed.inputs, use_cache=False).last_hidden_state[0]
        targets = packed.targets
    else:
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    loss_sum, n_correct = head_loss(hidden[keep], head, targets[keep], count_correct=count_correct)
    return LossParts(loss_sum, int(keep.sum()), int(n_correct))
