"""PiSSA initialisation (Meng et al., 2024) and its conversion to a plain LoRA adapter.

PiSSA starts A and B from the top-r singular triplets of the frozen weight W and keeps only the
residual W - s·B₀A₀ in the base layer, so the model is unchanged at step 0 but training moves the
principal directions. A trained PiSSA adapter needs that residual base; to use it on the original
base instead, `to_lora_tensors` rewrites it as a rank-2r LoRA (as PEFT does):
    ΔW = s·(B A − B₀ A₀) = s·[B, −B₀] · [A; A₀].
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from lorakit.lora import backends
from lorakit.lora.variants import AdapterParts


def is_pissa(init: bool | str) -> bool:
    return isinstance(init, str) and init.startswith("pissa")


@torch.no_grad()
def pissa_init(adapter: AdapterParts, base_layer: nn.Module, init: str) -> None:
    """Set A, B from the SVD of the base weight and write the residual into the base layer."""
    if backends.is_linear4bit(base_layer):
        warnings.warn(
            "PiSSA on a 4-bit base re-quantizes the residual weight, which is lossy; "
            "initialise PiSSA on a bf16/fp32 base and quantize the residual instead",
            stacklevel=4,
        )
    weight = backends.dense_weight(base_layer)  # fp32 (out, in), as PEFT computes it
    r = adapter.r
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r] / adapter.scaling, vh[:r]
    else:
        niter = int(re.fullmatch(r"pissa_niter_(\d+)", init).group(1))
        ur, sr, v = torch.svd_lowrank(weight, q=r, niter=niter)
        sr, vhr = sr / adapter.scaling, v.t()
    root = torch.sqrt(sr)
    lora_a = root.unsqueeze(1) * vhr
    lora_b = ur * root.unsqueeze(0)
    adapter.lora_A.copy_(lora_a)
    adapter.lora_B.copy_(lora_b)
    # the residual from the values the adapter actually holds (its dtype may round them)
    a, b = adapter.lora_A.float(), adapter.lora_B.float()
    backends.write_dense_weight(base_layer, weight - adapter.scaling * (b @ a))
    # kept to express the trained adapter relative to the original base later
    adapter.register_buffer("pissa_A0", adapter.lora_A.detach().clone(), persistent=False)
    adapter.register_buffer("pissa_B0", adapter.lora_B.detach().clone(), persistent=False)


def to_lora_tensors(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with B'A' = B A − B₀ A₀."""
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)
