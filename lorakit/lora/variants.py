"""LoRA variants as small strategy objects.

A variant answers, for one adapter on one layer: what to set up once A and B are initialised
(`init`), how the adapter changes the layer's output (`forward`), what merging does to the dense
frozen weight (`merge` / `unmerge` / `delta_weight`), which extra tensors it saves
(`peft_tensors`), and how it enters a mixed-adapter batch (`output_scale`). The layer class never
branches on the variant; it asks the adapter's variant object.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora import backends


class AdapterParts(Protocol):
    """What variants and PiSSA read and set on an adapter (`lorakit.lora.layer.LoraAdapter`
    is the one; this module sits below it)."""

    r: int
    scaling: float
    lora_A: nn.Parameter  # [r, in]
    lora_B: nn.Parameter  # [out, r]
    dropout: nn.Module
    training: bool
    magnitude: nn.Parameter  # DoRA's, set by `DoraVariant.init`
    merged_norm: torch.Tensor  # DoRA's, while merged

    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None: ...


class LoraVariant:
    """Plain LoRA: y = base(x) + s · B A dropout(x)."""

    name = "lora"

    def init(self, adapter: AdapterParts, base_layer: nn.Module) -> None:
        """Called once A and B hold their initial values (plain LoRA needs nothing more)."""

    def forward(
        self, adapter: AdapterParts, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        a, b = adapter.lora_A, adapter.lora_B
        h = F.linear(adapter.dropout(x.to(a.dtype)), a)
        if h.dtype == result.dtype:
            # result + s·h·Bᵀ as one fused kernel instead of matmul, scale and add
            out = torch.addmm(
                result.reshape(-1, result.shape[-1]),
                h.reshape(-1, h.shape[-1]),
                b.t(),
                alpha=adapter.scaling,
            )
            return out.view(result.shape)
        # adapters kept in fp32 on a bf16/fp16 base outside autocast: compute the delta in the
        # adapter dtype, then cast it to the base output's dtype (the base is never upcast)
        return result + (F.linear(h, b) * adapter.scaling).to(result.dtype)

    def lora_delta(self, adapter: AdapterParts) -> torch.Tensor:
        """s · B A as an fp32 (out, in) matrix."""
        a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
        return (b @ a) * adapter.scaling

    def delta_weight(self, adapter: AdapterParts, base_weight: torch.Tensor) -> torch.Tensor:
        """What merging this adapter alone adds to the dense (out, in) fp32 base weight."""
        return self.lora_delta(adapter)

    def merge(
        self, adapter: AdapterParts, weight: torch.Tensor, base_weight: torch.Tensor
    ) -> torch.Tensor:
        """The dense weight with this adapter merged into `weight` (which may already hold other
        merged adapters; `base_weight` is the weight with none merged). Returns a new tensor."""
        return weight + self.lora_delta(adapter)

    def unmerge(self, adapter: AdapterParts, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with this (merged) adapter taken out; a new tensor, no state changes."""
        return weight - self.lora_delta(adapter)

    def output_scale(self, adapter: AdapterParts, base_layer: nn.Module) -> torch.Tensor | None:
        """For grouped (mixed-batch) inference: a per-output factor g with
        y = base(x) + (g - 1)·(base(x) - bias) + g·s·B A x, or None when g = 1."""
        return None

    def peft_tensors(self, adapter: AdapterParts) -> dict[str, nn.Parameter]:
        """Tensors beyond A and B, under PEFT's key suffixes."""
        return {}


class DoraVariant(LoraVariant):
    """DoRA (Liu et al., 2024): W' = m ⊙ (W + s·B A) / ‖W + s·B A‖, the norm taken over the input
    dimension for each output row and treated as a constant in training (paper §4.3, and PEFT).

    Forward follows PEFT's dora.py: with y0 = base(x) - bias and f = m / ‖W + s·B A‖,
    y = base(x) + (f - 1)·y0 + f·s·B A x. With active dropout, y0 is recomputed as W·dropout(x)
    and the LoRA path also sees dropout(x), as in PEFT.
    """

    name = "dora"

    def init(self, adapter: AdapterParts, base_layer: nn.Module) -> None:
        # the magnitude starts at the column norm of the weight the adapter starts from
        with torch.no_grad():
            norm = self._norm(backends.dense_weight(base_layer), self.lora_delta(adapter))
        adapter.magnitude = nn.Parameter(norm.to(adapter.lora_A.dtype))

    @staticmethod
    def _norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + delta, dim=1)

    def _factor(
        self, adapter: AdapterParts, base_layer: nn.Module, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f = m / ‖W + s·B A‖ with the norm detached, W in `dtype`)."""
        w = backends.weight_matrix(base_layer).to(dtype)
        with torch.no_grad():
            a, b = adapter.lora_A, adapter.lora_B
            norm = torch.linalg.norm(w + adapter.scaling * (b @ a), dim=1)
        return adapter.magnitude / norm, w

    def forward(
        self, adapter: AdapterParts, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        a, b = adapter.lora_A, adapter.lora_B
        x = x.to(a.dtype)
        f, w = self._factor(adapter, base_layer, a.dtype)
        if adapter.training and not isinstance(adapter.dropout, nn.Identity):
            x = adapter.dropout(x)
            base_result = F.linear(x, w)
        else:
            # reuse the base output; as in PEFT this is the running result, so with several
            # active adapters a DoRA adapter rescales what the earlier ones added
            bias = getattr(base_layer, "bias", None)
            base_result = result if bias is None else result - bias
        lora_result = F.linear(F.linear(x, a), b)
        out = result + (f - 1) * base_result + f * lora_result * adapter.scaling
        return out.to(result.dtype)

    def delta_weight(self, adapter: AdapterParts, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merge(adapter, base_weight, base_weight) - base_weight

    def merge(
        self, adapter: AdapterParts, weight: torch.Tensor, base_weight: torch.Tensor
    ) -> torch.Tensor:
        delta = self.lora_delta(adapter)
        # the norm is the one forward uses (of the unmerged weight); keep it, since after merging
        # it can no longer be recomputed from the layer
        norm = self._norm(base_weight, delta)
        adapter.merged_norm = norm
        f = adapter.magnitude.detach().float() / norm
        return f.unsqueeze(1) * (weight + delta)

    def unmerge(self, adapter: AdapterParts, weight: torch.Tensor) -> torch.Tensor:
        f = adapter.magnitude.detach().float() / adapter.merged_norm
        return weight / f.unsqueeze(1) - self.lora_delta(adapter)

    @torch.no_grad()
    def output_scale(self, adapter: AdapterParts, base_layer: nn.Module) -> torch.Tensor:
        return self._factor(adapter, base_layer, adapter.lora_A.dtype)[0]

    def peft_tensors(self, adapter: AdapterParts) -> dict[str, nn.Parameter]:
        return {"lora_magnitude_vector": adapter.magnitude}


PLAIN = LoraVariant()
DORA = DoraVariant()


def variant_for(use_dora: bool) -> LoraVariant:
    return DORA if use_dora else PLAIN
