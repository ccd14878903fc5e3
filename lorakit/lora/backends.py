"""The one dispatch point for frozen base layers.

A LoRA layer always computes `base_layer(x) + delta(x)`; the base layer's own forward applies
the frozen weight, whatever its storage (fp32/bf16 `nn.Linear`, GPT-2's transposed `Conv1D`,
bitsandbytes 4-bit). Backends differ only in how that weight is read as a dense matrix and
written back (merge / unmerge / PiSSA), which is what this module answers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _bnb_linear4bit_cls():
    # bitsandbytes is only imported by code that quantizes; if it is not loaded, no module can be
    # one of its layers, and we avoid its import cost for plain models.
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def is_linear4bit(module: nn.Module) -> bool:
    cls = _bnb_linear4bit_cls()
    return cls is not None and isinstance(module, cls)


def is_packed_4bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit parameter: two weights per stored byte."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def is_supported(module: nn.Module) -> bool:
    """Layers a LoRA adapter can wrap: nn.Linear (incl. bnb 4-bit) and transformers Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """Conv1D stores its weight as (in, out), the transpose of nn.Linear."""
    return isinstance(module, Conv1D)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight as an fp32 (out, in) matrix: a copy, never a view of the stored one."""
    if is_linear4bit(module):
        import bitsandbytes.functional as bnbf
        w = module.weight
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    w = module.weight.detach()
    w = w.t() if is_fan_in_fan_out(module) else w
    return w.to(torch.float32, copy=True)


def write_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store an fp32 (out, in) matrix as the frozen weight, in the layer's own format."""
    if is_linear4bit(module):
        _requantize_linear4bit(module, weight)
        return
    stored = module.weight
    new = weight.t() if is_fan_in_fan_out(module) else weight
    with torch.no_grad():
        stored.copy_(new.to(stored.dtype))


def _requantize_linear4bit(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    qs = old.quant_state
    dtype = qs.dtype if qs is not None else torch.bfloat16
    new = bnb.nn.Params4bit(weight.to(dtype).cpu(), requires_grad=False, quant_type=qs.quant_type,
                            blocksize=qs.blocksize, compress_statistics=qs.nested is not None
                            and bool(qs.nested) if hasattr(qs, "nested") else True)
    module.weight = new.to(old.device)
