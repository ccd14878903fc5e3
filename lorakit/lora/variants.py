"""LoRA variants as small strategy objects.

A variant answers two questions for one adapter on one layer: how the adapter changes the layer's
output in the forward pass, and what it adds to the frozen weight when merged. The layer class
never branches on the variant; it asks the adapter's variant object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lorakit.lora.layer import LoraAdapter


class LoraVariant:
    """Plain LoRA: y = base(x) + s · B A dropout(x)."""

    name = "lora"

    def forward(self, adapter: "LoraAdapter", x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, b = adapter.lora_A, adapter.lora_B
        h = F.linear(adapter.dropout(x.to(a.dtype)), a)
        if h.dtype == result.dtype:
            # result + s·h·Bᵀ as one fused kernel instead of matmul, scale and add
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                              b.t(), alpha=adapter.scaling)
            return out.view(result.shape)
        # adapters kept in fp32 on a bf16/fp16 base outside autocast: compute the delta in the
        # adapter dtype, then cast it to the base output's dtype (the base is never upcast)
        return result + (F.linear(h, b) * adapter.scaling).to(result.dtype)

    def delta_weight(self, adapter: "LoraAdapter", base_weight: torch.Tensor) -> torch.Tensor:
        """What merging adds to the dense (out, in) fp32 base weight."""
        a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
        return (b @ a) * adapter.scaling


PLAIN = LoraVariant()


def variant_for(use_dora: bool) -> LoraVariant:
    if use_dora:
        raise NotImplementedError("DoRA (use_dora=True) is not available in this version of "
                                  "lorakit yet")
    return PLAIN
